"""Issue 27 F9: `nbdev_test` on a GPU box must not turn the CPU test cells into CUDA runs, and the GPU checks live where
pytest alone runs them (tests/test_gpu.py, skipped without CUDA), not in `#| cuda` notebook cells that need nbdev,
fastcore and IPython on the GPU box. Before the fix, 41 smoke configs in 10_train's test cells had no device (so
`device='auto'`: CUDA wherever there is one) and four notebooks held `#| cuda` cells."""
import json, re
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / 'nbs'
TRAINS = ('10_train.ipynb',)                  # the notebook whose test cells train through `train(resolve_config(...))`


def notebook_cells(name=None):
    for p in sorted(NBS.glob('*.ipynb')) if name is None else [NBS / name]:
        for c in json.loads(p.read_text())['cells']:
            s = ''.join(c['source'])
            if c['cell_type'] == 'code' and not s.lstrip().startswith(('#| export', '#|export', '#| exporti')):
                yield p.name, c.get('id'), s


def test_no_cuda_notebook_cells():
    bad = [(p, i) for p, i, s in notebook_cells() if re.match(r'\s*#\|\s*cuda\b', s)]
    assert not bad, f"#| cuda cells {bad}: put GPU checks in tests/test_gpu.py (pytest, skipped without CUDA)"


def test_training_cells_name_their_device():
    bad = [(p, i, line.strip()[:100]) for name in TRAINS for p, i, s in notebook_cells(name) for line in s.splitlines()
           if re.search(r"resolve_config\('smoke'", line) and 'device=' not in line]
    assert not bad, f"{len(bad)} smoke configs without device= (a GPU box would train them on CUDA): {bad[:5]}"
