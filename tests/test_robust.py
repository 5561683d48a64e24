"""Issue 14 at the entry points that only a real papermill run exercises: nothing in a checkpoint chooses the files
that are read (a crafted CIFAR batch in the checkpoint's `data_dir` used to run code), and a bad papermill parameter
stops the notebook with one line naming it."""
import os, pickle, subprocess, sys
from dataclasses import asdict, replace
from pathlib import Path


from magma.configs import resolve_config
from magma.checkpoints import save_checkpoint
from magma.train import build_method, load_pretrained

ROOT = Path(__file__).resolve().parent.parent


class _Evil:
    "Unpickling this calls `exec`, which writes the marker file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'a').write('x')",))


def _papermill(nb: str, out: Path, env=None, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, '-m', 'papermill', str(ROOT / 'nbs' / nb), str(out), '-k', 'python3', '--cwd', str(ROOT / 'nbs')]
    for k, v in params.items(): args += ['-p', k, str(v)]
    env = {**os.environ, 'PATH': f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _error_line(out: Path) -> str:
    "The error the executed notebook `out` stopped with (ename: evalue)."
    import nbformat
    for c in nbformat.read(out, as_version=4).cells:
        for o in c.get('outputs', []):
            if o.get('output_type') == 'error': return f"{o['ename']}: {o['evalue']}"
    return ''


def test_evaluate_never_reads_the_checkpoints_data_dir(tmp_path):
    evil, marker = tmp_path / 'evil', tmp_path / 'marker'
    batches = evil / 'cifar10' / 'cifar-10-batches-py'; batches.mkdir(parents=True)
    for f in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch', 'batches.meta']:
        (batches / f).write_bytes(pickle.dumps({'data': _Evil(marker), 'labels': [0], 'label_names': ['a']}, protocol=2))
    cfg = resolve_config('smoke', method='mae', out_dir=str(tmp_path / 'run'))
    ck = tmp_path / 'run' / 'checkpoint.safetensors'
    save_checkpoint(ck, dict(model=build_method(cfg).state_dict(), config=asdict(replace(cfg, dataset='cifar10', data_dir=str(evil)))))
    assert load_pretrained(ck)[1].data_dir == str(evil)                 # the checkpoint does name the crafted data root
    empty = tmp_path / 'user_data'; empty.mkdir()
    out = tmp_path / 'eval.ipynb'
    r = _papermill('evaluate.ipynb', out, env={'MAGMA_DATA': str(empty)}, checkpoint=ck, task='knn')
    assert r.returncode != 0
    assert not marker.exists(), 'the crafted CIFAR batch ran code'
    err = _error_line(out)                                            # the user's (empty) data root was read instead
    assert 'FileNotFoundError' in err and str(empty / 'cifar10') in err and '\n' not in err, err


def test_papermill_bad_parameter_is_one_line(tmp_path):
    out = tmp_path / 'out.ipynb'
    r = _papermill('pretrain.ipynb', out, epochs='abc', out_dir=tmp_path / 'run')
    assert r.returncode != 0
    err = _error_line(out)
    assert err == "ValueError: epochs='abc': must be an integer", err
    assert not (tmp_path / 'run').exists()                             # refused before anything was written
