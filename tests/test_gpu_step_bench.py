"""The GPU check's plumbing on the CPU (what `make gpu-check` runs on a GPU): bench/gpu_check.py and
bench/gpu_step_bench.py run from a plain checkout with tiny sizes (`--smoke`), with magma importable only through the
scripts' own path and without nbdev, fastcore or IPython; every row carries the schema's fields; the exit status says
when baseline rows fail; the budget skips what does not fit; the dry run prints the plan, the estimate and the schema."""
import importlib.util, json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
BENCH, CHECK = ROOT / 'bench' / 'gpu_step_bench.py', ROOT / 'bench' / 'gpu_check.py'
NEEDED = ('device', 'decoder', 'precision', 'mode', 'jobs', 'images_per_sec', 'status', 'commit', 'torch', 'est_seconds')
# A GPU box has torch, timm and safetensors, not magma (installed) nor nbdev, fastcore or IPython: hide them all.
BLOCKER = '''
import sys, importlib.abc
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fastcore', 'IPython', 'nbdev', 'execnb', 'papermill'):
            raise ImportError(f"{name}: not installed on a GPU box (tests/test_gpu_step_bench.py)")
sys.meta_path[:] = [_Absent()] + [f for f in sys.meta_path if 'editable' not in (getattr(f, '__module__', '') or '')]
'''


def plain_env(tmp_path) -> dict:
    "The environment of a plain checkout on a GPU box: no PYTHONPATH to the repo, no installed magma, no notebook tools."
    site = tmp_path / 'site'; site.mkdir(exist_ok=True)
    (site / 'sitecustomize.py').write_text(textwrap.dedent(BLOCKER))
    return dict(os.environ, PYTHONPATH=str(site))


def run(args, tmp_path, timeout=900):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=plain_env(tmp_path))


def load_bench():
    spec = importlib.util.spec_from_file_location('gpu_step_bench_t', BENCH)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m


def test_gpu_check_smoke(tmp_path):
    "The whole check on the CPU: tests (all skipped here), then each smoke row, printed as measured, then the verdict."
    out = tmp_path / 'check.json'
    r = run([CHECK, '--smoke', '--out', out], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc['magma'] == str(ROOT / 'magma')                          # this checkout's magma, found by the script
    assert doc['torch'] == torch.__version__ and doc['commit'] and doc['card'] and doc['exit'] == 0
    assert doc['tests']['rc'] == 0 and 'skipped' in doc['tests']['summary'], doc['tests']
    rows = {(x['mode'], x['decoder'], x['precision'], x['jobs']): x for x in doc['rows']}
    assert len(rows) == 5
    for x in doc['rows']: assert all(k in x for k in NEEDED) and x['device'] == doc['card'], x
    for key in [('eager', 'light', 'fp32', 1), ('eager', 'paper', 'bf16', 1), ('compiled', 'light', 'fp32', 1), ('eager', 'light', 'fp32', 2)]:
        x = rows[key]
        assert x['status'] == 'ok', x
        assert 0 < x['images_per_sec_min'] <= x['images_per_sec_max'] and len(x['images_per_sec_all']) == 2
        assert x['seconds'] > 0 and x['est_seconds'] > 0
    for key in [('eager', 'light', 'fp32', 1), ('compiled', 'light', 'fp32', 1)]:
        x = rows[key]
        assert x['images_per_sec_min'] <= x['images_per_sec'] <= x['images_per_sec_max'] and x['kernels_per_step'] > 100
    c = rows[('compiled', 'light', 'fp32', 1)]['compile']
    assert c['compiles_warmup'] >= 1 and c['recompiles'] == 0, c
    assert len(rows[('eager', 'light', 'fp32', 2)]['per_process']) == 2
    assert rows[('graphed', 'light', 'fp32', 1)]['status'] == 'skipped: needs CUDA'
    lines = r.stdout.splitlines()
    verdict = [i for i, x in enumerate(lines) if x.startswith('VERDICT: PASS')]
    table = [i for i, x in enumerate(lines) if x.startswith('| eager | light | fp32 | 2 |')]
    assert verdict and table and table[0] < verdict[0] and verdict[0] == len(lines) - 1, r.stdout[-2000:]
    assert 'tests: ' in lines[-1] and str(out) in lines[-1]


def test_every_row_failing_exits_nonzero(tmp_path):
    "Rows that all fail (a batch larger than the data) are results, each with its error, and the exit status is 1."
    out = tmp_path / 'fail.json'
    r = run([BENCH, '--smoke', '--batch_size', '64', '--variants', 'eager:light:fp32', 'prefetched:light:fp32', '--out', out], tmp_path)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [x['status'].split(':')[:2] for x in doc['rows']] == [['failed', ' ValueError']] * 2
    assert '--batch_size 64 exceeds' in doc['rows'][0]['status'] and r.stdout.splitlines()[-1].startswith('VERDICT: FAIL')


def test_budget_skips_and_says_so(tmp_path):
    "A budget too small for any row: each is skipped with its estimate, nothing is measured, and the exit status is 1."
    out = tmp_path / 'budget.json'
    r = run([BENCH, '--smoke', '--budget', '0.5', '--variants', 'eager:light:fp32', '--out', out], tmp_path)
    assert r.returncode == 1 and 'skipped: budget' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    x = json.loads(out.read_text())['rows'][0]
    assert x['status'].startswith('skipped: budget (estimate') and x['images_per_sec'] is None and x['est_seconds'] > 0.5


def test_budget_runs_what_fits_in_order(monkeypatch, tmp_path):
    """The budget logic with measuring stubbed out (each row takes its estimate): a cold compile that no longer fits is
    skipped, a cheaper row after it still runs, and the estimate is the prior's until a row has been measured."""
    b = load_bench()
    a = b.bench_args(['--device', 'cpu', '--variants', 'eager:paper:bf16', 'compiled:paper:bf16', 'eager:light:fp32',
                      '--budget', '80'], out=tmp_path / 'b.json', dry_run=False)
    clock = [1000.0]
    def fake(v, a, device, deadline=None):
        clock[0] += 30.0
        return dict(b.base_row(v, a), status='ok', images_per_sec=1.0, ms_per_step=1e3, warmup_seconds=1.0)
    monkeypatch.setattr(b, 'measure', fake); monkeypatch.setattr(b.time, 'time', lambda: clock[0])
    monkeypatch.setattr(b, 'write_atomic', lambda path, obj: None)
    doc = b.run(a, t0=1000.0)
    assert [x['status'].split(' (')[0] for x in doc['rows']] == ['ok', 'skipped: budget', 'ok']
    assert doc['rows'][1]['est_seconds'] > b.PRIOR['compile_s'] and doc['exit'] == 0


def test_exit_code():
    "1 when a test or a baseline (eager) row fails or nothing was measured; a failed compiled or graphed row is a diagnosis."
    b = load_bench()
    row = lambda mode, status: dict(mode=mode, status=status)
    ok, bad = row('eager', 'ok'), row('eager', 'failed: RuntimeError: x')
    assert b.exit_code([ok, row('graphed', 'failed: RuntimeError: capture')]) == 0
    assert b.exit_code([bad, row('compiled', 'ok')]) == 1
    assert b.exit_code([row('compiled', 'failed: x'), row('graphed', 'failed: y')]) == 1
    assert b.exit_code([row('eager', 'skipped: budget (estimate 9 s, 1 s left)')]) == 1
    assert b.exit_code([ok], tests_rc=1) == 1 and b.exit_code([ok], tests_rc=0) == 0
    # a failed process's row names its exception, not the advice lines a CUDA error ends with
    log = "Traceback (most recent call last):\ntorch.AcceleratorError: CUDA error: operation not permitted when stream is capturing\n" \
          "CUDA kernel errors might be asynchronously reported at some other API call.\nCompile with `TORCH_USE_CUDA_DSA`.\n"
    assert b._last_error(log) == "torch.AcceleratorError: CUDA error: operation not permitted when stream is capturing"
    assert b._last_error("no exception here\nlast words\n") == "last words"


def test_precision_is_magma_s(monkeypatch):
    """F12: a row's precision is set by `magma.train.precision_flags` (which knows torch's TF32 APIs), never by the bench
    reading `torch.backends.*.allow_tf32` itself (torch 2.14 refuses that once the fp32_precision API has been used)."""
    import contextlib, magma.train
    b, seen = load_bench(), []
    class Refuses:
        def __getattr__(self, k): raise RuntimeError(f"read of torch.backends...{k}")
        def __setattr__(self, k, v): raise RuntimeError(f"write of torch.backends...{k}")
    monkeypatch.setattr(torch.backends.cuda, 'matmul', Refuses()); monkeypatch.setattr(torch.backends, 'cudnn', Refuses())
    @contextlib.contextmanager
    def flags(precision, device): seen.append((precision, str(device))); yield
    monkeypatch.setattr(magma.train, 'precision_flags', flags)
    class Stop(Exception): pass
    def stop(*a, **k): raise Stop('set-up reached')
    monkeypatch.setattr(b, 'Bench', stop)
    a = b.bench_args(['--smoke'])
    r = b.measure(b.parse_variant('eager:light:tf32'), a, torch.device('cpu'))
    assert seen == [('tf32', 'cpu')] and r['status'] == 'failed: Stop: set-up reached', r['status']


def test_dry_run_prints_plan_estimate_schema(tmp_path):
    "The dry run needs no GPU and no --out, and prints each default row with its estimate, the total, and the JSON schema."
    r = run([CHECK, '--dry-run', '--budget', '480'], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    b = load_bench()
    for v in b.default_grid(8): assert f"| {b.variant_str(v)} |" in r.stdout
    assert '1. tests: python3 -m pytest -q tests/test_gpu.py' in r.stdout and 'estimate: ' in r.stdout
    assert 'within the budget of 480 s' in r.stdout and '"images_per_sec"' in r.stdout and 'ms a step' in r.stdout
    m = subprocess.run(['make', '-s', 'gpu-check', 'DRY_RUN=1', f'PYTHON={sys.executable}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert m.returncode == 0 and 'plan: ' in m.stdout, m.stdout[-1000:] + m.stderr[-1000:]


@pytest.mark.parametrize('args, says', [(['--variants', 'eager:huge:bf16'], "--variants: 'eager:huge:bf16' is not mode:decoder:precision"),
                                        (['--smoke'], '--out PATH is required'),
                                        (['--out', 'x.json'], 'no CUDA device here')])
def test_bad_arguments_are_one_line(tmp_path, args, says):
    if 'no CUDA' in says and torch.cuda.is_available(): pytest.skip("a CUDA device is here")
    r = run([BENCH, *args], tmp_path, timeout=120)
    assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr[-1000:]
