"""The README's "MAGMA in your own training loop" example, run as written (CPU, offline), and the same code on the docs home page."""
import json, math, re, socket
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = '## MAGMA in your own training loop'


def _first_python_block(markdown: str, where: str) -> str:
    m = re.search(r'```python\n(.*?)```', markdown, re.S)
    assert m, f'no ```python block in {where}'
    return m.group(1)


def readme_example() -> str:
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert SECTION in text, f'README.md has no section {SECTION!r}'
    start = text.index(SECTION)
    end = text.find('\n## ', start + len(SECTION))
    return _first_python_block(text[start:end if end >= 0 else None], f'README.md {SECTION!r}')


def index_example() -> str:
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))
    md = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown']
    sec = [s for s in md if s.startswith(SECTION)]
    assert sec, f'nbs/index.ipynb has no markdown cell starting with {SECTION!r}'
    return _first_python_block(sec[0], 'nbs/index.ipynb')


def test_example_is_short_and_the_same_on_the_docs_home_page():
    code = readme_example()
    lines = [l for l in code.splitlines() if l.strip()]
    assert len(lines) <= 12, f'the example has {len(lines)} lines; the README promises about 10'
    assert index_example() == code, 'nbs/index.ipynb and README.md show different examples'


def test_readme_example_runs_offline_and_backpropagates(monkeypatch):
    def no_network(*a, **k): raise AssertionError('the README example opened a network connection')
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    torch.manual_seed(0)
    ns = {}
    exec(compile(readme_example(), 'README.md:example', 'exec'), ns)
    loss, ssl_loss, model, taps, magma = (ns[k] for k in ('loss', 'ssl_loss', 'model', 'taps', 'magma'))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    term = (loss - ssl_loss).item() / 0.1                     # the MAGMA term itself, recovered from the sum
    assert term > 0 and math.isclose(term, magma(taps).item(), rel_tol=1e-5), term
    assert sorted(taps) == [10, 11] and taps[10].shape == (16, model.embed_dim)
    grads = [p.grad for p in model.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0
    got = dict(taps); taps.remove()                          # the example's taps, before another forward replaces them
    # they are patch means with CLS left out: timm's own intermediates (prefix split off by timm), the same float32 ops
    ref = model.forward_intermediates(ns['x'], indices=[10, 11], output_fmt='NLC', intermediates_only=True)
    for b, y in zip((10, 11), ref): torch.testing.assert_close(got[b], y.mean(1), rtol=1e-5, atol=1e-6)
