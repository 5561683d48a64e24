"""The GPU step bench (bench/gpu_step_bench.py) runs end to end on the CPU with tiny sizes: every mode either measures
the trainer's own step or says why it cannot run here, each row carries what bench/README's figures are read from, and
the JSON file holds every row."""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ('device', 'decoder', 'precision', 'mode', 'jobs', 'images_per_sec', 'status')


def test_smoke(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_step_bench.py'), '--smoke', '--out', str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc['torch'] and doc['commit'] and doc['card']
    rows = {(x['mode'], x['decoder'], x['precision']): x for x in doc['rows']}
    assert len(rows) == 6
    for x in doc['rows']: assert all(k in x for k in NEEDED), x
    for key in [('eager', 'light', 'fp32'), ('prefetched', 'light', 'fp32'), ('compiled', 'light', 'fp32'), ('eager', 'paper', 'bf16')]:
        x = rows[key]
        assert x['status'] == 'ok', x
        assert x['images_per_sec'] > 0 and x['images_per_sec_min'] <= x['images_per_sec'] <= x['images_per_sec_max']
        assert len(x['images_per_sec_all']) == 2 and x['kernels_per_step'] > 100 and x['top_kernels']
        assert x['jobs'] == 1 and x['device'] == doc['card']
    for key in [('compiled-ro', 'light', 'fp32'), ('graphed', 'light', 'fp32')]:
        assert rows[key]['status'] == 'skipped: needs CUDA' and rows[key]['images_per_sec'] is None
    assert '| mode | decoder | precision |' in r.stdout and 'rows in' in r.stdout


def test_bad_variant_is_one_line():
    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_step_bench.py'), '--variants', 'eager:huge:bf16'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--variants: 'eager:huge:bf16' is not mode:decoder:precision" in r.stderr
    assert 'Traceback' not in r.stderr
