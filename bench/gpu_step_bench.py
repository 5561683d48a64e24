"""Time the trainer's own step (`magma.train.train_step`: forward, backward, AdamW, the non-finite guard and the online
probe, with the epoch's running sums and a log-step read every `log_every` steps, as `train()` does) on one device,
in several variants, and say where the time goes.

    python bench/gpu_step_bench.py --device cuda [--out bench/results/NAME.json] [--repeats 5] [--steps 20]
    python bench/gpu_step_bench.py --smoke          # CPU, tiny sizes: the check `make test` runs (tests/test_gpu_step_bench.py)

Variants (`--variants` picks some; the default grid fits one call of under 8 minutes on one H200):
- eager: batches from the trainer's loader (`magma.loader.make_loader`, the tensor pipeline with the augmentation),
  one `train_step` each;
- prefetched: the same steps on batches made beforehand, so eager − prefetched is what the loader costs;
- compiled: the method wrapped in `torch.compile` (what `compile=True` does in `wrap_parts`);
- compiled-ro: `torch.compile(mode='reduce-overhead')` (CUDA graphs inside compile's trees);
- graphed: the whole `train_step` captured in one CUDA graph (`torch.cuda.graph`) and replayed. The trainer's step is
  not capturable while it has host syncs (the non-finite guard's `torch.isfinite(...)` read, a Python-float λ, a
  non-capturable AdamW): such a row records the capture error, which is the diagnosis, not a crash of the bench;
each at the paper decoder (512 x 8, 16 heads) and the light one (128 x 2, 4 heads), in bf16 (autocast), fp32 (IEEE: TF32
off) and tf32 (fp32 weights, TF32 matmuls and convolutions).

For each variant it gives images/s as the median and spread (min, max) over `--repeats` timed repeats of `--steps`
steps, and from one profiled stretch of steps: device-busy ms a step (the sum of the kernels' device time, on CUDA),
kernels a step (CUDA kernels launched; on the CPU, aten operators called, nested ones included) and the top kernels by
time. Each row is written to the JSON file as soon as it is measured (atomically), and a table is printed at the end.
"""
from __future__ import annotations
import argparse, contextlib, datetime, json, os, platform, statistics, subprocess, sys, tempfile, time, traceback
from pathlib import Path

import torch

from magma.configs import resolve_config
from magma.datasets import get_dataset
from magma.loader import make_loader
from magma.methods import METHODS
from magma.train import EpochStats, build_parts, train_step

DECODERS = {'paper': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
            'light': dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)}
MODES = ('eager', 'prefetched', 'compiled', 'compiled-ro', 'graphed')
PRECISIONS = ('bf16', 'fp32', 'tf32')


def default_grid(device: str) -> list[dict]:
    "The variants measured by default: every mode at the paper decoder in bf16, and eager across decoders and precisions."
    grid = [dict(mode='eager', decoder=d, precision=p) for d in DECODERS for p in PRECISIONS]
    grid += [dict(mode=m, decoder='paper', precision='bf16') for m in ('prefetched', 'compiled')]
    grid += [dict(mode='compiled', decoder='light', precision='bf16')]
    grid += [dict(mode=m, decoder='paper', precision='bf16') for m in ('compiled-ro', 'graphed')]   # last: a failed capture
    return grid


def parse_variant(s: str) -> dict:
    "'mode:decoder:precision' (e.g. 'eager:paper:bf16') as a variant."
    parts = s.split(':')
    if len(parts) != 3 or parts[0] not in MODES or parts[1] not in DECODERS or parts[2] not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"--variants: {s!r} is not mode:decoder:precision with mode in {MODES}, "
                                         f"decoder in {tuple(DECODERS)}, precision in {PRECISIONS}")
    return dict(mode=parts[0], decoder=parts[1], precision=parts[2])


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device):
    "TF32 on for 'tf32' and off otherwise (fp32 is IEEE fp32), restored afterwards."
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    on = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try: yield
    finally: torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


class Bench:
    "One variant: the trainer's parts and loader for it, and a `step()` that is the trainer's per-step work."
    def __init__(self, v: dict, a, device: torch.device):
        self.v, self.a, self.device = v, a, device
        sizes = dict(img_size=a.img_size, batch_size=a.batch_size, n_per_class=a.n_per_class)
        self.cfg = resolve_config(a.profile, method=a.method, dataset='synthetic', device=device.type,
                                  precision='fp32' if v['precision'] == 'tf32' else v['precision'],
                                  **sizes, **(a.decoders or DECODERS)[v['decoder']])
        ds = get_dataset('synthetic', 'train', n_per_class=a.n_per_class, img_size=a.img_size)
        self.loader = make_loader(ds, a.batch_size, METHODS[a.method].views, device, seed=0, img_size=a.img_size)
        if len(self.loader) < 1: raise ValueError(f"--batch_size {a.batch_size} exceeds the {len(ds)} synthetic images")
        self.p = build_parts(self.cfg, device, len(ds.classes))
        self.p.model.magma_weight = a.lam if METHODS[a.method].uses_magma else 0.0
        self.total, self.i, self.stats = 10**6, 0, EpochStats()
        self.batches, self.fixed = iter(()), None
        if v['mode'] in ('compiled', 'compiled-ro'):
            kw = dict(mode='reduce-overhead') if v['mode'] == 'compiled-ro' else {}
            if a.compile_backend: kw['backend'] = a.compile_backend
            self.p.net = torch.compile(self.p.net, **kw)
        if v['mode'] in ('prefetched', 'graphed'):
            self.pool = [self._next_batch() for _ in range(min(len(self.loader), 8))]

    def _next_batch(self):
        try: return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader); return next(self.batches)

    def _batch(self):
        if self.v['mode'] in ('prefetched', 'graphed'): return self.pool[self.i % len(self.pool)]
        return self._next_batch()

    def step(self):
        "One trainer step: a batch, `train_step`, the epoch's running sums, and every `log_every` steps the log read."
        b = self._batch()
        comps, hits, labelled = train_step(self.p, b, 1e-4, self.i, self.total)
        self.stats.add(comps, hits, labelled, len(b['label']))
        if self.i % self.a.log_every == 0: {k: float(v) for k, v in comps.items()}   # _log_step's read: a host sync
        self.i += 1

    def capture(self):
        "The graphed variant: the whole step captured once on a side stream, then replayed on fixed input buffers."
        if self.device.type != 'cuda': raise RuntimeError("CUDA graphs need a CUDA device")
        s = torch.cuda.Stream(self.device); s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(3): self.step()                                     # warm-up on the side stream, as capture needs
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph): self.step()
        self.step = self.graph.replay


def profile(bench: Bench, steps: int, device: torch.device) -> dict:
    "Device-busy ms a step, kernels (CUDA) or aten operators (CPU) a step, and the top 5 by time, over `steps` steps."
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps): bench.step()
        sync(device)
    ev = prof.events()
    if device.type == 'cuda':
        kern = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kern)
        what = 'cuda kernels'
    else:
        kern = [e for e in ev if e.name.startswith('aten::')]
        busy_us = sum(e.self_cpu_time_total for e in ev)
        what = 'aten ops (nested)'
    by = {}
    for e in kern: by[e.name] = by.get(e.name, 0.0) + (e.device_time if device.type == 'cuda' else e.self_cpu_time_total)
    top = sorted(by.items(), key=lambda kv: -kv[1])[:5]
    return dict(busy_ms_per_step=busy_us / 1e3 / steps, kernels_per_step=len(kern) / steps, kernels_are=what,
                top_kernels=[dict(name=n[:120], ms_per_step=t / 1e3 / steps) for n, t in top])


def measure(v: dict, a, device: torch.device) -> dict:
    "One row: the variant, images/s median and spread over the repeats, step ms, and the profile; or the error it met."
    row = dict(device=a.device_name, decoder=v['decoder'], precision=v['precision'], mode=v['mode'], jobs=1,
               method=a.method, batch_size=a.batch_size, img_size=a.img_size, steps=a.steps, repeats=a.repeats)
    if v['mode'] in ('compiled-ro', 'graphed') and device.type != 'cuda':
        return dict(row, status='skipped: needs CUDA', images_per_sec=None)
    t0 = time.time()
    try:
        with matmul_precision(v['precision'], device):
            bench = Bench(v, a, device)
            for _ in range(a.warmup): bench.step()
            if v['mode'] == 'graphed': bench.capture()
            sync(device)
            rates = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                for _ in range(a.steps): bench.step()
                sync(device)
                rates.append(a.steps * a.batch_size / (time.perf_counter() - t))
            prof = profile(bench, a.profile_steps, device)
    except Exception as e:                                          # a variant that cannot run is a result, not a crash
        return dict(row, status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                    images_per_sec=None, trace=traceback.format_exc(limit=3)[-1500:], seconds=time.time() - t0)
    med = statistics.median(rates)
    return dict(row, status='ok', images_per_sec=med, images_per_sec_min=min(rates), images_per_sec_max=max(rates),
                images_per_sec_all=rates, ms_per_step=1e3 * a.batch_size / med,
                busy_fraction=min(1.0, prof['busy_ms_per_step'] / (1e3 * a.batch_size / med)) if device.type == 'cuda' else None,
                **prof, seconds=time.time() - t0)


def write_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, 'w') as f: json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def table(rows: list) -> str:
    head = '| mode | decoder | precision | images/s (median) | min–max | ms/step | busy ms/step | busy | kernels/step | status |'
    lines = [head, '|' + '---|' * 10]
    f = lambda x, d=0: '–' if x is None else f"{x:,.{d}f}"
    for r in rows:
        lines.append(f"| {r['mode']} | {r['decoder']} | {r['precision']} | {f(r.get('images_per_sec'))} | "
                     f"{'–' if r.get('images_per_sec_min') is None else f(r['images_per_sec_min']) + '–' + f(r['images_per_sec_max'])} | {f(r.get('ms_per_step'), 2)} | "
                     f"{f(r.get('busy_ms_per_step'), 2)} | {f(100 * r['busy_fraction']) + '%' if r.get('busy_fraction') is not None else '–'} | "
                     f"{f(r.get('kernels_per_step'))} | {r['status'][:60]} |")
    return '\n'.join(lines)


def git_commit() -> str:
    try: return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip() or 'unknown'
    except OSError: return 'unknown'


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python bench/gpu_step_bench.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="cuda, cuda:N or cpu")
    ap.add_argument('--smoke', action='store_true', help="CPU, tiny sizes, every mode once: the make-test check")
    ap.add_argument('--variants', nargs='+', type=parse_variant, help="mode:decoder:precision ... (default: the grid in the docstring)")
    ap.add_argument('--method', default='mae', choices=sorted(METHODS), help="the method stepped (default mae, as in bench/README's baseline)")
    ap.add_argument('--lam', type=float, default=1.0, help="λ for a MAGMA method (on, so its term is in the step)")
    ap.add_argument('--profile', default='mini', help="the config profile the run starts from (mini: ViT-T/4 at 32 px)")
    ap.add_argument('--batch_size', type=int, default=256); ap.add_argument('--img_size', type=int, default=32)
    ap.add_argument('--n_per_class', type=int, default=300, help="synthetic images per class (10 classes)")
    ap.add_argument('--steps', type=int, default=20, help="steps per timed repeat"); ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=5); ap.add_argument('--profile_steps', type=int, default=5)
    ap.add_argument('--log_every', type=int, default=10, help="the trainer's log_every: a host read of the step's losses")
    ap.add_argument('--compile_backend', default=None, help="torch.compile backend (default inductor; the smoke run uses aot_eager)")
    ap.add_argument('--out', type=Path, default=None, help="the JSON file (default bench/results/<date>-<device>.json)")
    a = ap.parse_args(argv)
    a.decoders = None
    if a.smoke:
        a.device, a.batch_size, a.img_size, a.n_per_class, a.steps, a.repeats, a.warmup, a.profile_steps = 'cpu', 8, 16, 2, 2, 2, 1, 1
        a.profile, a.compile_backend = 'smoke', a.compile_backend or 'aot_eager'
        a.decoders = {'paper': dict(decoder_dim=32, decoder_depth=2, decoder_heads=4), 'light': dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)}
        a.variants = a.variants or [dict(mode=m, decoder='light', precision='fp32') for m in MODES] + [
            dict(mode='eager', decoder='paper', precision='bf16')]
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch ({torch.__version__}) sees no CUDA device; pass --device cpu or --smoke")
    a.device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine())
    variants = a.variants or default_grid(device.type)
    out = a.out or Path(__file__).parent / 'results' / f"{datetime.date.today()}-{device.type}{'-smoke' if a.smoke else ''}.json"
    doc = dict(date=str(datetime.datetime.now().isoformat(timespec='seconds')), commit=git_commit(), torch=torch.__version__,
               cuda=torch.version.cuda, card=a.device_name, python=platform.python_version(), threads=torch.get_num_threads(),
               argv=sys.argv[1:] if argv is None else list(argv), rows=[])
    t0 = time.time()
    for v in variants:
        r = measure(v, a, device)
        doc['rows'].append(r); doc['seconds'] = time.time() - t0
        write_atomic(out, doc)                                       # saved as each row finishes
        print(f"{v['mode']:12s} {v['decoder']:6s} {v['precision']:5s} "
              f"{'' if r['images_per_sec'] is None else format(r['images_per_sec'], ',.0f') + ' img/s':>14s}  {r['status'][:80]}", flush=True)
    print(f"\n# {doc['card']}, torch {doc['torch']}, commit {doc['commit']}, {doc['date']}; {time.time() - t0:.0f} s; rows in {out}\n")
    print(table(doc['rows']))
    return doc


if __name__ == '__main__':
    main()
