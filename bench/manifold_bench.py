"""Time and peak extra memory of magma_loss forward+backward on CPU (a benchmark, not a test).

    .venv/bin/python bench/manifold_bench.py

Peak extra memory is measured by a TorchDispatchMode that adds up the bytes of every live tensor
storage created by an aten op (forward and backward), frees them when they are garbage-collected, and
records the high-water mark: the memory the function itself needs beyond its inputs.
"""
import time, weakref, platform, datetime
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from magma.manifold import magma_loss


class PeakBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.live, self.peak, self.seen = 0, 0, set()
    def _free(self, key, n):
        self.seen.discard(key); self.live -= n
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage(); key = st.data_ptr()
                if key and key not in self.seen:
                    n = st.nbytes(); self.seen.add(key); self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, n)
        return out


def bench(B, D, reps):
    zr = torch.randn(B, D, requires_grad=True); y = torch.randn(B, D, requires_grad=True)
    magma_loss(zr, y).backward()                       # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter(); magma_loss(zr, y).backward(); times.append(time.perf_counter() - t)
        zr.grad = y.grad = None
    with PeakBytes() as pb:
        magma_loss(zr, y).backward()
    return sorted(times)[len(times) // 2], pb.peak


if __name__ == "__main__":
    print(f"# magma_loss forward+backward, CPU, float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    print(f"{'B':>6} {'D':>5} {'median ms':>10} {'peak extra MiB':>15} {'B*B*4 MiB':>10}")
    for B in (256, 1024, 4096):
        for D in (192, 768):
            ms, peak = bench(B, D, reps=10 if B < 4096 else 3)
            print(f"{B:>6} {D:>5} {ms * 1e3:>10.1f} {peak / 2**20:>15.1f} {B * B * 4 / 2**20:>10.1f}")
