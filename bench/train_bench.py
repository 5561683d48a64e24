"""Training images/s of `mae` and `m-mae` at the `mini` profile on CPU, alternating, with achieved FLOP/s.

    .venv/bin/python bench/train_bench.py [--steps 6] [--precision bf16|fp32|both]

Each measured step is a full trainer step: a batch from the tensor data pipeline (MAE augmentation on the
synthetic dataset), forward under autocast, backward, fused AdamW. Steps of the two methods alternate so that
background load hits both alike. FLOPs per step are counted once with torch.utils.flop_counter (forward and
backward); the machine's matmul rate is measured with a large square matmul in the same dtype.
"""
import argparse, statistics, time, datetime, platform
import torch
from torch.utils.flop_counter import FlopCounterMode
from magma.configs import resolve_config
from magma.train import build_method
from magma.datasets import get_dataset
from magma.loader import make_loader
from magma.methods import METHODS


def matmul_rate(dtype, n=2048, reps=10):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3): a @ b
    best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(reps))
    return 2 * n**3 / best


def bench(precision, steps):
    cfg = {m: resolve_config('mini', method=m, dataset='synthetic', precision=precision) for m in ('mae', 'm-mae')}
    ds = get_dataset('synthetic', 'train', n_per_class=100)
    loader = make_loader(ds, 256, METHODS['mae'].views, 'cpu', seed=0)
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[precision]
    ac = lambda: torch.autocast('cpu', dtype=dtype, enabled=precision != 'fp32')
    models = {}
    for m, c in cfg.items():
        torch.manual_seed(0); model = build_method(c); model.magma_weight = 1.0 if m == 'm-mae' else 0.0
        models[m] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True))
    batches = iter(loader)

    def step(m, count=False):
        nonlocal batches
        try: b = next(batches)
        except StopIteration: batches = iter(loader); b = next(batches)
        model, opt = models[m]
        t = time.perf_counter()
        with FlopCounterMode(display=False) if count else _null() as fc:
            with ac(): loss = model(b)['loss']
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return time.perf_counter() - t, (fc.get_total_flops() if count else None)

    flops = {m: step(m, count=True)[1] for m in models}
    for m in models: step(m)
    times = {m: [] for m in models}
    for r in range(steps):
        for m in (list(models) if r % 2 == 0 else list(models)[::-1]): times[m].append(step(m)[0])
    rate = matmul_rate(dtype)
    print(f"\n## precision {precision}: ViT-T/4, 32 px, light decoder (128x2), batch 256, {steps} alternating steps each")
    print(f"measured {precision} matmul rate (2048^3): {rate / 1e9:.1f} GFLOP/s")
    for m in models:
        med = statistics.median(times[m])
        print(f"{m:6s} {256 / med:7.1f} images/s  {med * 1e3:7.1f} ms/step  {flops[m] / 1e9:6.1f} GFLOP/step  "
              f"{flops[m] / med / 1e9:6.1f} GFLOP/s = {100 * flops[m] / med / rate:5.1f}% of matmul rate")
    ratio = statistics.median(a / b for a, b in zip(times['m-mae'], times['mae']))
    print(f"m-mae / mae time per step: {ratio:.4f} (median of per-pair ratios); target <= 1.01")


class _null:
    def __enter__(self): return None
    def __exit__(self, *a): return False


if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--steps', type=int, default=6); ap.add_argument('--precision', default='both')
    a = ap.parse_args()
    print(f"# {datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    for p in (('fp32', 'bf16') if a.precision == 'both' else (a.precision,)): bench(p, a.steps)
