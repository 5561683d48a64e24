"""The CPU golden hashes: the state after the first three `train_step`s of five methods, hashed, so that a refactor or a
GPU-path change can show that the CPU arithmetic did not move.

    python bench/golden_steps.py            # one line per method: sha256 of model, probe and optimizer states, and of the
                                            # three steps' batches (the loader's and augmentation's output)

The hashes depend on the CPU's kernels (AMD and Intel round differently): compare two commits on one machine, never a
hash written on another.
"""
import hashlib, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from magma.configs import resolve_config
from magma.datasets import get_dataset
from magma.loader import make_loader
from magma.methods import METHODS
from magma.train import build_parts, train_step

METHOD_NAMES = ('mae', 'm-mae', 'simclr', 'm-vicreg', 'byol')


def digest(h, obj):
    "Feed every tensor of a (nested) state into `h`, in a fixed order."
    if torch.is_tensor(obj): h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str): h.update(str(k).encode()); digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for x in obj: digest(h, x)
    else: h.update(repr(obj).encode())


def golden(method: str, steps: int = 3) -> tuple[str, str]:
    torch.manual_seed(0)
    cfg = resolve_config('smoke', method=method, dataset='synthetic', device='cpu', img_size=16, batch_size=8,
                         n_per_class=2)
    ds = get_dataset('synthetic', 'train', n_per_class=2, img_size=16)
    loader = make_loader(ds, 8, METHODS[method].views, torch.device('cpu'), seed=0, img_size=16)
    p = build_parts(cfg, torch.device('cpu'), len(ds.classes))
    if METHODS[method].uses_magma: p.model.magma_weight = 1.0
    hb = hashlib.sha256()
    for i, b in zip(range(steps), iter(loader)):
        digest(hb, b)
        train_step(p, b, 1e-3, i, 100)
    hs = hashlib.sha256()
    for s in (p.model.state_dict(), p.probe.state_dict(), p.opt.state_dict()['state'], p.probe_opt.state_dict()['state']):
        digest(hs, s)
    return hs.hexdigest()[:16], hb.hexdigest()[:16]


if __name__ == '__main__':
    torch.set_num_threads(1)
    for m in METHOD_NAMES:
        s, b = golden(m)
        print(f"{m:10s} state {s} batches {b}")
