"""Wall time of the kNN and the fast linear probe at the issue's target sizes, random features (a benchmark, not a test).

    .venv/bin/python bench/eval_bench.py            # kNN: 50,000 bank x 10,000 queries, 192-d; linear: 100 epochs on 50,000 x 192
    .venv/bin/python bench/eval_bench.py --quick    # 1/10 of the sizes, 10 epochs

Targets on the 2-core CPU: kNN under 5 s, fast linear probe (100 epochs) under 60 s.
"""
import argparse, time, platform, datetime
import torch
from magma.evaluate import knn_eval, train_linear


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--device', default='cpu')
    a = ap.parse_args()
    n_bank, n_q, d, C, epochs = (5_000, 1_000, 192, 100, 10) if a.quick else (50_000, 10_000, 192, 100, 100)
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(n_bank, d, generator=g), torch.randn(n_q, d, generator=g)
    bl, ql = torch.randint(0, C, (n_bank,), generator=g), torch.randint(0, C, (n_q,), generator=g)
    print(f"# magma.evaluate benchmark, {a.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    knn_eval(bank[:1000], bl[:1000], q[:100], ql[:100], device=a.device)            # warm-up
    for metric in ('euclidean', 'cosine'):
        t = time.perf_counter(); r = knn_eval(bank, bl, q, ql, k=10, metric=metric, device=a.device)
        print(f"kNN k=10 {metric:9s} bank {n_bank} x queries {n_q} @ {d}-d: {time.perf_counter() - t:6.2f} s  (top1 {r['top1']:.1f}%, chance {100 / C:.1f}%)")
    train_linear(bank[:512], bl[:512], C, epochs=1, device=a.device)                 # warm-up (first-call imports)
    t = time.perf_counter(); head, lrs = train_linear(bank, bl, C, epochs=epochs, device=a.device)
    print(f"fast linear probe {epochs} epochs on {n_bank} x {d}, batch 256, {C} classes: {time.perf_counter() - t:6.2f} s  (final lr {lrs[-1]:g})")


if __name__ == '__main__':
    main()
