"""Data-pipeline benchmark (issue 4): augmented images per second on CPU, not a test.

Compares magma's tensor pipeline (uint8 cache + batched augmentations) with torchvision's per-image PIL path
(ImageFolder + transforms.v2 + DataLoader workers) on the CIFAR-10 subset at ../shared/data/cifar10-mini.

usage: .venv/bin/python bench/data_bench.py [--data ../shared/data/cifar10-mini] [--root DATA_ROOT] [--workers 2] [--threads 0]
"""
import argparse, os, time, tempfile
import torch
import torchvision.transforms.v2 as v2
from torchvision.datasets import ImageFolder
from magma.datasets import get_dataset, compute_stats
from magma.augment import TensorAugment
from magma.loader import make_loader
from magma.methods import METHODS

def rate(n, fn, reps=1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps): fn()
    return n * reps / (time.perf_counter() - t)

def tensor_epoch(ds, kind, bs):
    ld = make_loader(ds, bs, METHODS[kind].views, 'cpu', seed=0)
    def run():
        for b in ld: pass
    return len(ld) * bs, run

def pil_epoch(path, kind, bs, workers, mean, std):
    crop = [v2.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC), v2.RandomHorizontalFlip()]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if kind == 'mae': tf = v2.Compose(crop + tail)
    else:
        one = v2.Compose(crop + [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                                 v2.RandomApply([v2.GaussianBlur(3, (0.1, 2.0))], p=0.5)] + tail)
        tf = lambda im: (one(im), one(im))
    ds = ImageFolder(os.path.join(path, 'train'), transform=tf)
    dl = torch.utils.data.DataLoader(ds, bs, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    def run():
        for b in dl: pass
    return len(dl) * bs, run

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', default=os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-mini'))
    p.add_argument('--root', default=None, help='data root for the tensor cache (default: a temporary directory)')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default); make_loader augments with 1 thread on CPU regardless')
    p.add_argument('--bs', type=int, default=256)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    tmp = None if a.root else tempfile.TemporaryDirectory()
    path, root = os.path.abspath(a.data), a.root or tmp.name
    print(f"data {path}; cache root {root}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")

    t = time.perf_counter(); ds = get_dataset(f'folder:{path}', 'train', root); t_build = time.perf_counter() - t
    t = time.perf_counter(); ds = get_dataset(f'folder:{path}', 'train', root); t_load = time.perf_counter() - t
    print(f"cache: decode {len(ds)} images once {t_build:.2f}s ({len(ds)/t_build:.0f} img/s), reload {t_load*1e3:.0f} ms (from_cache={ds.from_cache}); "
          f"mean {tuple(round(x, 4) for x in ds.mean)} std {tuple(round(x, 4) for x in ds.std)}")

    print(f"{'pipeline':72s} {'images/s':>9s}")
    res = {}
    for kind in ('mae', 'simclr'):
        aug, x = TensorAugment(METHODS[kind].views, 32, ds.mean, ds.std), ds.images[:a.bs].clone()
        g = torch.Generator().manual_seed(0)
        res['aug', kind] = rate(a.bs, lambda: aug(x, g), reps=20)
        res['tensor', kind] = rate(*tensor_epoch(ds, kind, a.bs))
        res['pil', kind] = rate(*pil_epoch(path, kind, a.bs, a.workers, ds.mean, ds.std))
        views = ' (2 views each)' if kind == 'simclr' else ''
        print(f"{'tensor: TensorAugment ' + kind + ', one batch, ' + str(torch.get_num_threads()) + ' thread(s)' + views:72s} {res['aug', kind]:9.0f}")
        print(f"{'tensor: make_loader ' + kind + ' epoch (augments on 1 thread)' + views:72s} {res['tensor', kind]:9.0f}")
        print(f"{'torchvision PIL + DataLoader(' + str(a.workers) + ' workers) ' + kind + views:72s} {res['pil', kind]:9.0f}")
    print(f"speed-up of the tensor loader over PIL+workers: mae {res['tensor', 'mae']/res['pil', 'mae']:.1f}x, "
          f"simclr {res['tensor', 'simclr']/res['pil', 'simclr']:.1f}x; MAE target >= 2200 img/s: "
          f"{'met' if res['tensor', 'mae'] >= 2200 else 'NOT met'}")
    if tmp: tmp.cleanup()

if __name__ == '__main__': main()
