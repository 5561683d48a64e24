"""Issue 28 item 1: a run finishes without the `figures` extra (seaborn, pacmap and what pacmap brings).

A tiny smoke run of `magma.pretrain.run` in a process where seaborn, pacmap, numba and llvmlite cannot be imported (a
meta-path finder refuses them, as `tests/test_packaging.py` blocks the extras): the run trains, evaluates, writes
`results.json` (before any figure), draws the figures that need no extra, and says in ONE line which figures it skipped
and which extra draws them. Before (figures drawn before the results), the same run died with `No module named
'pacmap'` and wrote no `results.json`.
"""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import importlib.abc, sys
BLOCKED = ('seaborn', 'pacmap', 'numba', 'llvmlite')
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in BLOCKED: raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from magma.pretrain import run
res = run(method='m-mae', profile='smoke', dataset='synthetic', n_per_class=4, epochs=1, batch_size=8, linear_epochs=2,
          progress=False, loggers='none', num_workers=0, out_dir=sys.argv[1])
assert not [n for n in sys.modules if n.split('.')[0] in BLOCKED]
print('linear_acc', res['linear_acc'])
"""


def test_a_run_without_seaborn_and_pacmap_writes_its_results(tmp_path):
    out = tmp_path / 'run'
    p = subprocess.run([sys.executable, '-c', RUN, str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**__import__('os').environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / 'results.json').read_text())
    assert res['method'] == 'm-mae' and 0 <= res['linear_acc'] <= 100, res
    said = [l for l in (p.stdout + p.stderr).splitlines() if 'skipped' in l]
    assert len(said) == 1, p.stdout + p.stderr
    assert 'fig3_layer_magma.png' in said[0] and 'fig4_pacmap.png' in said[0] and "pip install 'magma-ssl[figures]'" in said[0], said
    drawn = sorted(f.name for f in out.glob('*.png'))
    assert drawn == ['fig2_training.png', 'fig5_key_pca.png', 'fig6_attention.png', 'fig_reconstruction.png'], drawn
    assert (out / 'figure_data.npz').stat().st_size > 0
