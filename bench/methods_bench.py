"""CPU cost of MAGMA on top of MAE: images/s of one training step (forward, backward, AdamW step).

ViT-T/4 (12 heads) on 32 px, light decoder (128-d, 2 blocks, 4 heads), batch 256, fp32, one fixed batch.
Steps of the compared models alternate (the order rotates every round) so that load from other processes on
a shared machine hits them alike. Models:
  mae        baseline, MAGMA term not computed at all (track_magma=False)
  mae+track  the registry's `mae`: raw MAGMA term computed under no_grad for logging (Fig. 2a)
  m-mae      MAGMA term with λ=1, backpropagated
It also times the only extra work of m-mae in isolation: MagmaLoss forward + backward on (batch, 192) taps of
blocks 10 and 11 (minimum over repetitions, robust to other load), and relates it to mae's fastest step.
Usage: python bench/methods_bench.py [--batch 256] [--rounds 8] [--warmup 2] [--threads N] [--kernel-only]
"""
import argparse, statistics, time
import torch
from magma.methods import create


def kernel_time(batch, reps=50):
    from magma.manifold import MagmaLoss
    loss, g, best = MagmaLoss(pairs=((-2, -1),)), torch.Generator().manual_seed(0), float('inf')
    feats = {k: torch.randn(batch, 192, generator=g).requires_grad_(True) for k in (-2, -1)}
    for _ in range(reps):
        t = time.perf_counter(); loss(feats).backward(); best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--rounds', type=int, default=8)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--kernel-only', action='store_true')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    kernel = kernel_time(a.batch)
    print(f"MAGMA term alone (MagmaLoss fwd+bwd, ({a.batch}, 192) taps of blocks 10, 11): {kernel*1e3:.2f} ms (min of 50)")
    if a.kernel_only: return
    cfg = dict(backbone='vit_tiny', img_size=32, patch_size=4, decoder='light', mask_ratio=0.75)
    models = {}
    for label, name, kw in [('mae', 'mae', dict(track_magma=False)), ('mae+track', 'mae', {}), ('m-mae', 'm-mae', {})]:
        torch.manual_seed(0)
        m = create(name, **cfg, **kw).train()
        models[label] = (m, torch.optim.AdamW(m.parameters(), lr=1.5e-4))
    batch = {'img': torch.randn(a.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))}

    def step(label):
        m, opt = models[label]
        t = time.perf_counter()
        out = m(batch)
        opt.zero_grad(set_to_none=True); out['loss'].backward(); opt.step()
        return time.perf_counter() - t

    labels = list(models)
    for _ in range(a.warmup):
        for l in labels: step(l)
    times = {l: [] for l in labels}
    for r in range(a.rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for l in order: times[l].append(step(l))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, {a.rounds} rounds after {a.warmup} warm-up")
    med = {l: statistics.median(t) for l, t in times.items()}
    for l in labels:
        print(f"{l:10s} median {med[l]*1e3:8.1f} ms/step {a.batch/med[l]:7.1f} img/s | min {min(times[l])*1e3:8.1f} ms/step "
              f"{a.batch/min(times[l]):7.1f} img/s | mean {statistics.mean(times[l])*1e3:.1f} ms")
    print(f"MAGMA term / fastest mae step: {kernel/min(times['mae']):.4f}")
    for l in ('mae+track', 'm-mae'):
        per_round = statistics.median(x / y for x, y in zip(times[l], times['mae']))
        print(f"{l} / mae time per step: {med[l]/med['mae']:.4f} (medians), {min(times[l])/min(times['mae']):.4f} (minima), "
              f"{per_round:.4f} (median of per-round ratios)")


if __name__ == '__main__':
    main()
