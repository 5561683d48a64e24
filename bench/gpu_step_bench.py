"""Time the trainer's own step (`magma.train.train_step`: forward, backward, AdamW, the non-finite guard and the online
probe, with the epoch's running sums and a log-step read every `log_every` steps, as `train()` does) on one device,
in several variants, within a time budget, and say where the time goes.

    python3 bench/gpu_step_bench.py --out /tmp/bench.json [--budget 400] [--jobs 8]   # a GPU: the default grid
    python3 bench/gpu_step_bench.py --dry-run [--budget 400]    # the plan, its time estimate, the JSON schema
    python3 bench/gpu_step_bench.py --smoke --out /tmp/s.json   # CPU, tiny sizes: what `make test` runs

`bench/gpu_check.py` (`make gpu-check`) runs the GPU tests first and then this, as one command. magma is imported from
the checkout this file is in (nothing needs installing beyond torch, timm and safetensors).

A variant is `mode:decoder:precision[:jobs]`:
- mode `eager`: batches from the trainer's loader (the tensor pipeline with the augmentation), one `train_step` each:
  the baseline; `prefetched`: the same steps on batches made beforehand (eager - prefetched = the loader's cost);
  `compiled`: the method in `torch.compile` (what `compile=True` does); `compiled-ro`: `mode='reduce-overhead'` (CUDA
  graphs inside compile's trees); `graphed`: the whole step captured in one CUDA graph and replayed (the trainer's step
  is not capturable while it reads the guard on the host: such a row records the capture error, a diagnosis);
- decoder `paper` (512 x 8, 16 heads) or `light` (128 x 2, 4 heads); precision `bf16` (autocast), `fp32` (IEEE) or
  `tf32`, set by `magma.train.precision_flags` as a run sets it;
- jobs N > 1: N processes of this script, each stepping its own run on the same GPU (as `magma.runs` packs runs with
  jobs=N), started together; the row gives their total images/s.

Each row: images/s (median over `--repeats` timed repeats of `--steps` steps, and the spread min-max), ms a step, and
for jobs=1 a profiled stretch (device-busy ms a step, kernels a step, the top kernels); compiled rows also give
`torch._dynamo` counters (compiles during warm-up, recompiles after it, graph breaks, cudagraph skips). A row is printed
as soon as it is measured and the JSON (`--out`) rewritten (atomically); a verdict line ends the output. The exit
status is 1 when a baseline (eager) row fails or when no row measured anything, else 0.
"""
from __future__ import annotations
import argparse, contextlib, datetime, gc, json, os, platform, queue, re, statistics, subprocess, sys, tempfile, threading, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))      # F6: this checkout's magma, installed or not

try: import torch
except ImportError: sys.exit(f"{sys.executable} has no torch: run with the Python that has torch, timm and safetensors "
                             f"(make gpu-check PYTHON=/path/to/python3)")

DECODERS = {'paper': dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
            'light': dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)}
MODES = ('eager', 'prefetched', 'compiled', 'compiled-ro', 'graphed')
PRECISIONS = ('bf16', 'fp32', 'tf32')
BASELINE = 'eager'          # a failed row of this mode fails the check
COMPILED = ('compiled', 'compiled-ro')

# The time model of --budget and --dry-run. Step costs: the trainer's full step (MAE, ViT-T/4, 32 px, batch 256) as
# measured on one H200 at commit 15c12a3 (bench/README.md), ms a step by (decoder, precision); that step made ~40 host
# syncs, so these are upper bounds for a sync-free step. Replaced by this run's own measurement as soon as an eager row
# of the same decoder and precision has run. The rest are the assumptions stated in bench/README.md.
PRIOR_STEP_MS = {('paper', 'bf16'): 41.5, ('paper', 'fp32'): 85.3, ('light', 'bf16'): 37.2, ('light', 'fp32'): 20.8}
PRIOR = dict(setup_s=5.0,       # a row's model, optimizers, loader and first batches
             first_s=15.0,      # once: CUDA context, cuBLAS/cuDNN handles, the synthetic dataset
             profile_s=5.0,     # the profiled stretch (profiler start-up included)
             compile_s=120.0,   # one cold Inductor compile of the method's forward and backward (replaced when measured)
             workers_s=30.0,    # jobs > 1: N processes importing torch, timm and magma and building their runs at once
             worker_s=10.0)     # a graphed row: one such process (a failed capture stays in it)
TESTS_EST_S = 100.0             # bench/gpu_check.py's pytest tests/test_gpu.py on one H100 (derivation: bench/README.md)

SCHEMA = {
    'date, commit, torch, cuda, card, python, threads, magma, argv, budget, seconds': "the run (top level)",
    'tests': "gpu_check.py only: {rc, summary, seconds} of pytest tests/test_gpu.py",
    'verdict, exit': "the verdict line and the exit status",
    'rows[]': {
        'device': "the card (torch.cuda.get_device_name) or the CPU", 'decoder': "paper | light",
        'precision': "bf16 | fp32 | tf32", 'mode': ' | '.join(MODES), 'jobs': "processes stepping at once on the device",
        'status': "ok | failed: <error> | skipped: budget (...) | skipped: needs CUDA | skipped: <why>",
        'images_per_sec': "median over repeats (jobs > 1: all processes' images / the wall time of the timed window)",
        'images_per_sec_min, images_per_sec_max, images_per_sec_all': "the spread over the timed repeats",
        'ms_per_step': "batch_size / images_per_sec (jobs > 1: per process)", 'commit, torch': "as at the top level",
        'method, batch_size, img_size, steps, repeats, warmup': "what was stepped",
        'est_seconds, seconds': "the row's cost as estimated before it and as it took",
        'busy_ms_per_step, busy_fraction, kernels_per_step, kernels_are, top_kernels': "jobs = 1: the profiled stretch",
        'compile': "compiled rows: {compiles_warmup, recompiles, graph_breaks, unique_graphs, cudagraph_skips}",
        'per_process': "jobs > 1: each process's median images/s", 'trace': "failed rows: the end of the traceback"},
}


def default_grid(jobs: int = 8) -> list[dict]:
    "The default rows, most important first (the budget skips from the end): baselines, compiled, packed, graphed."
    v = lambda m, d, p, j=1: dict(mode=m, decoder=d, precision=p, jobs=j)
    grid = [v('eager', 'paper', 'bf16'), v('eager', 'light', 'bf16'), v('eager', 'light', 'fp32'), v('eager', 'paper', 'fp32'),
            v('compiled', 'paper', 'bf16')]
    if jobs > 1: grid.append(v('eager', 'light', 'fp32', jobs))      # the mini profile (light, fp32), packed
    grid += [v('compiled', 'light', 'bf16'), v('graphed', 'paper', 'bf16'), v('compiled-ro', 'paper', 'bf16')]
    if jobs > 1: grid.append(v('eager', 'paper', 'bf16', jobs))
    return grid + [v('compiled', 'light', 'fp32'), v('compiled', 'paper', 'fp32')]


def parse_variant(s: str) -> dict:
    "'mode:decoder:precision[:jobs]' (e.g. 'eager:paper:bf16', 'eager:light:fp32:8') as a variant."
    parts = s.split(':')
    ok = len(parts) in (3, 4) and parts[0] in MODES and parts[1] in DECODERS and parts[2] in PRECISIONS
    if ok and len(parts) == 4: ok = parts[3].isdigit() and int(parts[3]) >= 1
    if not ok:
        raise argparse.ArgumentTypeError(f"--variants: {s!r} is not mode:decoder:precision[:jobs] with mode in {MODES}, "
                                         f"decoder in {tuple(DECODERS)}, precision in {PRECISIONS}, jobs an integer >= 1")
    return dict(mode=parts[0], decoder=parts[1], precision=parts[2], jobs=int(parts[3]) if len(parts) == 4 else 1)


def variant_str(v: dict) -> str: return f"{v['mode']}:{v['decoder']}:{v['precision']}:{v['jobs']}"


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


_DATA = {}                      # the synthetic dataset, made once per (n_per_class, img_size) in a process


def _dataset(n_per_class: int, img_size: int):
    from magma.datasets import get_dataset
    key = (n_per_class, img_size)
    if key not in _DATA: _DATA[key] = get_dataset('synthetic', 'train', n_per_class=n_per_class, img_size=img_size)
    return _DATA[key]


@contextlib.contextmanager
def _tiny_encoder(kw: dict | None):
    "With `kw` (the smoke run), `magma.train.build_method` builds the method with a smaller encoder (a CPU-sized check)."
    if not kw: yield; return
    import magma.train as T
    from magma.methods import create
    real = T.build_method
    T.build_method = lambda cfg: create(cfg.method, **{**T.method_kwargs(cfg), **kw})
    try: yield
    finally: T.build_method = real


class Bench:
    "One variant: the trainer's parts and loader for it, and a `step()` that is the trainer's per-step work."
    def __init__(self, v: dict, a, device: torch.device):
        from magma.configs import resolve_config
        from magma.loader import make_loader
        from magma.methods import METHODS
        from magma.train import EpochStats, build_parts
        self.v, self.a, self.device = v, a, device
        sizes = dict(img_size=a.img_size, batch_size=a.batch_size, n_per_class=a.n_per_class)
        self.cfg = resolve_config(a.profile, method=a.method, dataset='synthetic', device=device.type, precision=v['precision'],
                                  **sizes, **(a.decoders or DECODERS)[v['decoder']])
        ds = _dataset(a.n_per_class, a.img_size)
        self.loader = make_loader(ds, a.batch_size, METHODS[a.method].views, device, seed=0, img_size=a.img_size)
        if len(self.loader) < 1: raise ValueError(f"--batch_size {a.batch_size} exceeds the {len(ds)} synthetic images")
        with _tiny_encoder(getattr(a, 'encoder', None)): self.p = build_parts(self.cfg, device, len(ds.classes))
        self.p.model.magma_weight = a.lam if METHODS[a.method].uses_magma else 0.0
        self.total, self.i, self.stats = 10**6, 0, EpochStats()
        self.batches, self.fixed = iter(()), None
        if v['mode'] in COMPILED:
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
        from magma.train import train_step
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
        busy_us, what = sum(e.device_time for e in kern), 'cuda kernels'
    else:
        kern = [e for e in ev if e.name.startswith('aten::')]
        busy_us, what = sum(e.self_cpu_time_total for e in ev), 'aten ops (nested)'
    by = {}
    for e in kern: by[e.name] = by.get(e.name, 0.0) + (e.device_time if device.type == 'cuda' else e.self_cpu_time_total)
    top = sorted(by.items(), key=lambda kv: -kv[1])[:5]
    return dict(busy_ms_per_step=busy_us / 1e3 / steps, kernels_per_step=len(kern) / steps, kernels_are=what,
                top_kernels=[dict(name=n[:120], ms_per_step=t / 1e3 / steps) for n, t in top])


def _counters() -> dict:
    "The torch._dynamo counters a compiled row reports (0 where this torch does not count one)."
    from torch._dynamo.utils import counters
    return dict(frames_ok=counters['frames']['ok'], graph_breaks=sum(counters['graph_break'].values()),
                unique_graphs=counters['stats']['unique_graphs'], cudagraph_skips=counters['inductor']['cudagraph_skips'])


def _compile_stats(c0: dict, c1: dict, c2: dict) -> dict:
    "Counters before the row, after its warm-up and at its end, as: compiles in warm-up, recompiles after, and the rest."
    return dict(compiles_warmup=c1['frames_ok'] - c0['frames_ok'], recompiles=c2['frames_ok'] - c1['frames_ok'],
                graph_breaks=c2['graph_breaks'] - c0['graph_breaks'], unique_graphs=c2['unique_graphs'] - c0['unique_graphs'],
                cudagraph_skips=c2['cudagraph_skips'] - c0['cudagraph_skips'])


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
    return f"failed: {type(e).__name__}: {msg}"


def base_row(v: dict, a) -> dict:
    return dict(device=a.device_name, decoder=v['decoder'], precision=v['precision'], mode=v['mode'], jobs=v['jobs'],
                method=a.method, batch_size=a.batch_size, img_size=a.img_size, steps=a.steps, repeats=a.repeats,
                warmup=a.warmup, commit=a.commit, torch=torch.__version__)


def _timed(bench: Bench, a, device, deadline: float | None, clock=time.perf_counter) -> list[tuple[float, float]]:
    "(start, end) of each timed repeat; stops early (after one at least) when `deadline` (time.time()) has passed."
    spans = []
    for r in range(a.repeats):
        if r and deadline is not None and time.time() > deadline: break
        sync(device); t = clock()
        for _ in range(a.steps): bench.step()
        sync(device); spans.append((t, clock()))
    return spans


def measure(v: dict, a, device: torch.device, deadline: float | None = None) -> dict:
    "One jobs=1 row: images/s median and spread over the repeats, step ms, profile, compile counters; or the error it met."
    row = base_row(v, a)
    if v['mode'] in ('compiled-ro', 'graphed') and device.type != 'cuda':
        return dict(row, status='skipped: needs CUDA', images_per_sec=None)
    from magma.train import precision_flags
    t0, bench, comp = time.time(), None, v['mode'] in COMPILED
    try:
        if comp: torch._dynamo.reset(); c0 = _counters()
        with precision_flags(v['precision'], device):
            bench = Bench(v, a, device)
            for _ in range(a.warmup): bench.step()
            if v['mode'] == 'graphed': bench.capture()
            sync(device)
            warm_s = time.time() - t0
            if comp: c1 = _counters()
            spans = _timed(bench, a, device, deadline)
            rates = [a.steps * a.batch_size / (e - s) for s, e in spans]
            prof = {}
            if a.profile_steps:
                try: prof = profile(bench, a.profile_steps, device)
                except Exception as e: prof = dict(profile_error=_error(e))   # a profiler that cannot run costs the row nothing
            if comp: row['compile'] = _compile_stats(c0, c1, _counters())
    except Exception as e:                                          # a variant that cannot run is a result, not a crash
        return dict(row, status=_error(e), images_per_sec=None, trace=traceback.format_exc(limit=4)[-1500:], seconds=time.time() - t0)
    finally:
        del bench; gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
    med = statistics.median(rates)
    busy = prof.get('busy_ms_per_step')
    return dict(row, status='ok', images_per_sec=med, images_per_sec_min=min(rates), images_per_sec_max=max(rates),
                images_per_sec_all=rates, ms_per_step=1e3 * a.batch_size / med, warmup_seconds=warm_s,
                busy_fraction=min(1.0, busy / (1e3 * a.batch_size / med)) if busy is not None and device.type == 'cuda' else None,
                **({'repeats_done': len(rates)} if len(rates) < a.repeats else {}), **prof, seconds=time.time() - t0)


def _worker(a, device: torch.device) -> int:
    "A jobs > 1 row's process: build the run and warm it up, say READY, wait for GO, time the repeats, say RESULT <json>."
    proto = os.fdopen(os.dup(sys.stdout.fileno()), 'w'); sys.stdout = sys.stderr   # stdout: the protocol lines only
    from magma.train import precision_flags
    v = a.variants[0]
    with precision_flags(v['precision'], device):
        bench = Bench(dict(v, jobs=1), a, device)
        for _ in range(a.warmup): bench.step()
        if v['mode'] == 'graphed': bench.capture()
        sync(device)
        print('READY', file=proto, flush=True)
        if sys.stdin.readline().strip() != 'GO': return 1
        spans = _timed(bench, a, device, None, clock=time.time)      # wall-clock stamps: compared across processes
    print('RESULT ' + json.dumps(dict(spans=spans)), file=proto, flush=True)
    return 0


def _last_error(text: str) -> str:
    "A failed process's error: the last line naming an exception (CUDA errors end with advice lines), else its last line."
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errs = [x for x in lines if re.match(r'^[\w.]*(Error|Exception|Interrupt)\b', x)]
    return (errs or lines or [''])[-1][:300]


def _reader(p, q: queue.Queue, k: int):
    for line in p.stdout: q.put((k, line.strip()))
    q.put((k, None))


def _worker_cmd(v: dict, a) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', '--variants', variant_str(dict(v, jobs=1)),
           '--device', a.device, '--method', a.method, '--lam', str(a.lam), '--profile', a.profile,
           '--batch_size', str(a.batch_size), '--img_size', str(a.img_size), '--n_per_class', str(a.n_per_class),
           '--steps', str(a.steps), '--repeats', str(a.repeats), '--warmup', str(a.warmup), '--log_every', str(a.log_every)]
    if a.compile_backend: cmd += ['--compile_backend', a.compile_backend]
    if a.smoke: cmd += ['--smoke-sizes']
    return cmd


def measure_jobs(v: dict, a, device: torch.device, timeout: float) -> dict:
    """A jobs = N row (or a graphed row, N = 1): N processes, each one run's trainer step (started together once all
    are warm); images/s is all their images over the wall time from the first start to the last end; the spread is
    over the repeats' sums. A process that fails says why in its last line of output (a graphed row: the capture's error)."""
    row, n, t0 = base_row(v, a), v['jobs'], time.time()
    env = dict(os.environ)
    if device.type == 'cuda': env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // n)))   # as magma.runs
    procs, logs, q = [], [], queue.Queue()
    try:
        for k in range(n):
            logs.append(tempfile.TemporaryFile('w+'))
            procs.append(subprocess.Popen(_worker_cmd(v, a), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1],
                                          text=True, env=env, cwd=ROOT))
            threading.Thread(target=_reader, args=(procs[-1], q, k), daemon=True).start()

        def collect(word: str) -> dict:
            got = {}
            while len(got) < n:
                k, line = q.get(timeout=max(1.0, t0 + timeout - time.time()))
                if line is None:
                    procs[k].wait(); logs[k].seek(0)
                    raise RuntimeError(f"process {k + 1} of {n} exited ({procs[k].returncode}) before {word}: {_last_error(logs[k].read())}")
                if line.startswith(word): got[k] = line[len(word):].strip()
            return got
        collect('READY')
        for p in procs: p.stdin.write('GO\n'); p.stdin.flush()
        res = {k: json.loads(s)['spans'] for k, s in collect('RESULT').items()}
    except queue.Empty:
        return dict(row, status=f"failed: TimeoutError: the {n} processes did not finish within {timeout:.0f} s",
                    images_per_sec=None, seconds=time.time() - t0)
    except Exception as e:
        return dict(row, status=_error(e), images_per_sec=None, seconds=time.time() - t0)
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
            p.wait()
    spans = list(res.values())
    imgs = sum(len(s) for s in spans) * a.steps * a.batch_size
    wall = max(e for s in spans for _, e in s) - min(b for s in spans for b, _ in s)
    reps = min(len(s) for s in spans)
    per_rep = [sum(a.steps * a.batch_size / (s[r][1] - s[r][0]) for s in spans) for r in range(reps)]
    per_proc = [statistics.median(a.steps * a.batch_size / (e - b) for b, e in s) for s in spans]
    total = imgs / wall
    return dict(row, status='ok', images_per_sec=total, images_per_sec_min=min(per_rep), images_per_sec_max=max(per_rep),
                images_per_sec_all=per_rep, ms_per_step=1e3 * a.batch_size * n / total, per_process=per_proc,
                seconds=time.time() - t0)


class Costs:
    "The time model of --budget and --dry-run (see PRIOR_STEP_MS, PRIOR): priors, replaced by this run's measurements."
    def __init__(self, a):
        self.a, self.step_ms, self.p, self.first = a, dict(PRIOR_STEP_MS), dict(PRIOR), True

    def ms(self, v: dict) -> float:
        return self.step_ms.get((v['decoder'], 'fp32' if v['precision'] == 'tf32' else v['precision']), max(PRIOR_STEP_MS.values()))

    def estimate(self, v: dict) -> float:
        "Seconds the row `v` should take: set-up, compile (cold), warm-up + timed + profiled steps (N runs share the device)."
        a, n = self.a, v['jobs']
        here = n == 1 and v['mode'] != 'graphed'                     # measured in this process (and profiled)
        steps = a.warmup + a.repeats * a.steps + (a.profile_steps if here else 0) + (4 if v['mode'] == 'graphed' else 0)
        s = self.p['setup_s'] + steps * self.ms(v) * n / 1e3
        if self.first: s += self.p['first_s']
        if not here: s += self.p['workers_s'] if n > 1 else self.p['worker_s']   # processes of their own
        elif a.profile_steps: s += self.p['profile_s']
        if v['mode'] in COMPILED: s += self.p['compile_s']
        return s

    def update(self, v: dict, row: dict):
        "After a row: its measured step time (eager, jobs=1) and compile time replace the priors."
        self.first = False
        if row.get('status') != 'ok' or v['jobs'] != 1: return
        if v['mode'] == 'eager': self.step_ms[(v['decoder'], 'fp32' if v['precision'] == 'tf32' else v['precision'])] = row['ms_per_step']
        if v['mode'] in COMPILED and row.get('warmup_seconds') is not None:
            self.p['compile_s'] = max(0.0, row['warmup_seconds'] - self.p['setup_s'] - self.a.warmup * row['ms_per_step'] / 1e3)


HEAD = ('| mode | decoder | precision | jobs | images/s (median) | min–max | ms/step | busy | kernels/step | compiles / '
        'recompiles / cudagraph skips | seconds (est.) | status |')


def row_line(r: dict) -> str:
    "The row as a line of the table (printed as soon as it is measured)."
    f = lambda x, d=0: '–' if x is None else f"{x:,.{d}f}"
    c = r.get('compile')
    return (f"| {r['mode']} | {r['decoder']} | {r['precision']} | {r['jobs']} | {f(r.get('images_per_sec'))} | "
            f"{'–' if r.get('images_per_sec_min') is None else f(r['images_per_sec_min']) + '–' + f(r['images_per_sec_max'])} | "
            f"{f(r.get('ms_per_step'), 2)} | {f(100 * r['busy_fraction']) + '%' if r.get('busy_fraction') is not None else '–'} | "
            f"{f(r.get('kernels_per_step'))} | {'–' if not c else '%d / %d / %d' % (c['compiles_warmup'], c['recompiles'], c['cudagraph_skips'])} | "
            f"{f(r.get('seconds'))} ({f(r.get('est_seconds'))}) | {r['status'][:90]} |")


def failed_baselines(rows: list) -> list:
    return [r for r in rows if r['mode'] == BASELINE and r['status'].startswith('failed')]


def exit_code(rows: list, tests_rc: int | None = None) -> int:
    "1 when a test failed, a baseline (eager) row failed, or no row measured anything; else 0."
    return int(bool(tests_rc) or bool(failed_baselines(rows)) or not any(r['status'] == 'ok' for r in rows))


def verdict(doc: dict) -> str:
    "One line: PASS or FAIL, the tests, the rows by outcome, the headline figure, the time and the JSON's path."
    rows, t = doc['rows'], doc.get('tests')
    ok = [r for r in rows if r['status'] == 'ok']
    bad = [r for r in rows if r['status'].startswith('failed')]
    skipped = [r for r in rows if r['status'].startswith('skipped')]
    parts = [] if t is None else [f"tests: {t['summary']}"]
    parts.append(f"bench: {len(ok)} ok, {len(bad)} failed" + (f" ({', '.join(variant_str(r) for r in bad)})" if bad else '')
                 + f", {len(skipped)} skipped" + (f" ({sum(r['status'].startswith('skipped: budget') for r in skipped)} by the budget)" if skipped else ''))
    base = [r for r in ok if r['mode'] == BASELINE and r['jobs'] == 1]
    if base: parts.append(f"{variant_str(base[0])} {base[0]['images_per_sec']:,.0f} img/s")
    if failed_baselines(rows): parts.append(f"baseline rows failed: {', '.join(variant_str(r) for r in failed_baselines(rows))}")
    if not ok: parts.append("no row measured anything")
    if t is not None and t['rc']: parts.append(f"pytest exit status {t['rc']}")
    return (f"VERDICT: {'FAIL' if exit_code(rows, t and t['rc']) else 'PASS'} on {doc['card']} (torch {doc['torch']}, "
            f"commit {doc['commit']}): " + '; '.join(parts) + f"; {doc['seconds']:.0f} s; rows in {doc.get('out')}")


def write_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, 'w') as f: json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def git_commit() -> str:
    "This checkout's commit; where the copy has no .git (a device machine), $MAGMA_COMMIT if set."
    try: got = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError: got = ''
    return got or os.environ.get('MAGMA_COMMIT') or 'unknown'


def plan_text(a, variants: list, budget: float | None, tests_s: float = 0.0) -> str:
    "The --dry-run output: each row's estimate and whether it fits the budget, how the estimate is made, the JSON schema."
    costs, lines, t = Costs(a), [], tests_s
    lines.append(f"plan: {len(variants)} rows, method {a.method}, batch {a.batch_size}, {a.img_size} px, warm-up {a.warmup} + "
                 f"{a.repeats} x {a.steps} timed + {a.profile_steps} profiled steps a row; budget "
                 + (f"{budget:.0f} s" if budget is not None else 'none') + (f" (tests first: ~{tests_s:.0f} s)" if tests_s else ''))
    lines.append('| # | row | estimate s | cumulative s | |'); lines.append('|---|---|---|---|---|')
    for i, v in enumerate(variants, 1):
        est = costs.estimate(v)
        fits = budget is None or t + est <= budget
        if fits: t += est; costs.first = False
        lines.append(f"| {i} | {variant_str(v)} | {est:.0f} | {t:.0f} | {'runs' if fits else 'skipped: budget'} |")
    lines.append(f"estimate: {t:.0f} s in all ({t / 60:.1f} min)" + (f", within the budget of {budget:.0f} s" if budget is not None else ''))
    lines.append("how: a row = set-up {setup_s:.0f} s (+{first_s:.0f} s once: CUDA context, dataset) + steps x ms a step x jobs "
                 "+ profiler {profile_s:.0f} s (jobs = 1) + one cold compile {compile_s:.0f} s (compiled rows) + process start "
                 "{workers_s:.0f} s (jobs > 1); ms a step (mode-independent, N runs assumed to share the device with no gain): ".format(**PRIOR)
                 + ', '.join(f"{d} {p} {ms}" for (d, p), ms in PRIOR_STEP_MS.items())
                 + " (one H200, commit 15c12a3, bench/README.md: upper bounds). While running, each eager row's measured ms a "
                 "step and the first compile's measured time replace these, and a row whose estimate exceeds what is left of "
                 "the budget is skipped (status 'skipped: budget').")
    lines.append("JSON schema:\n" + json.dumps(SCHEMA, indent=1))
    return '\n'.join(lines)


SMOKE_DECODERS = {'paper': dict(decoder_dim=32, decoder_depth=2, decoder_heads=4), 'light': dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)}
SMOKE_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, magma_layers=(0,), magma_target=-1)
SMOKE_VARIANTS = ['eager:light:fp32', 'eager:paper:bf16', 'compiled:light:fp32', 'graphed:light:fp32', 'eager:light:fp32:2']


def parser(prog: str = 'python3 bench/gpu_step_bench.py') -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', type=Path, help="the JSON file of rows: required for a run (e.g. /tmp/gpu-check.json; bench/results/ "
                                             "only for a run you will commit)")
    ap.add_argument('--budget', type=float, default=None, help="seconds: a row whose estimated cost no longer fits is skipped "
                                                               "(status 'skipped: budget'); default: no limit")
    ap.add_argument('--dry-run', action='store_true', help="print the plan, its time estimate and the JSON schema; run nothing")
    ap.add_argument('--device', default=None, help="cuda, cuda:N or cpu (default: cuda where this torch sees one, else cpu)")
    ap.add_argument('--smoke', action='store_true', help="CPU, tiny sizes, a few rows: the check `make test` runs")
    ap.add_argument('--smoke-sizes', action='store_true', help=argparse.SUPPRESS)   # a smoke run's worker processes
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)        # one process of a jobs > 1 row
    ap.add_argument('--variants', nargs='+', type=parse_variant, help="mode:decoder:precision[:jobs] ... (default: the grid in "
                                                                       "default_grid, printed by --dry-run)")
    ap.add_argument('--jobs', type=int, default=8, help="N of the default grid's packed rows (8: issue 30's 8 mini runs)")
    ap.add_argument('--method', default='mae', help="the method stepped (default mae, as in bench/README's baseline)")
    ap.add_argument('--lam', type=float, default=1.0, help="λ for a MAGMA method (on, so its term is in the step)")
    ap.add_argument('--profile', default='mini', help="the config profile the run starts from (mini: ViT-T/4 at 32 px)")
    ap.add_argument('--batch_size', type=int, default=256); ap.add_argument('--img_size', type=int, default=32)
    ap.add_argument('--n_per_class', type=int, default=300, help="synthetic images per class (10 classes)")
    ap.add_argument('--steps', type=int, default=20, help="steps per timed repeat"); ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=5); ap.add_argument('--profile_steps', type=int, default=5)
    ap.add_argument('--log_every', type=int, default=10, help="the trainer's log_every: a host read of the step's losses")
    ap.add_argument('--compile_backend', default=None, help="torch.compile backend (default inductor; the smoke run uses aot_eager)")
    return ap


def finish_args(a, ap):
    "Presets and checks after parsing; every refusal is one line naming the argument."
    if a.smoke:                                                  # the smoke sizes, where the command line sets none
        d = ap.parse_args([])
        preset = dict(device='cpu', batch_size=8, img_size=16, n_per_class=2, steps=2, repeats=2, warmup=1, profile_steps=1,
                      profile='smoke', compile_backend='aot_eager')
        for k, x in preset.items():
            if getattr(a, k) == getattr(d, k): setattr(a, k, x)
        a.smoke_sizes, a.variants = True, a.variants or [parse_variant(s) for s in SMOKE_VARIANTS]
    a.decoders, a.encoder = (SMOKE_DECODERS, SMOKE_ENCODER) if a.smoke_sizes else (None, None)
    if a.device is None and not (a.dry_run or torch.cuda.is_available()):
        ap.error(f"no CUDA device here (torch {torch.__version__}): this checks a GPU node; --smoke runs the check's path on "
                 f"the CPU at tiny sizes, --device cpu times the CPU at full size, --dry-run prints the plan")
    a.device = a.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if a.jobs < 1: ap.error(f"--jobs {a.jobs}: must be an integer >= 1")
    if a.budget is not None and not a.budget > 0: ap.error(f"--budget {a.budget:g}: must be a number of seconds > 0")
    if min(a.steps, a.repeats) < 1 or min(a.warmup, a.profile_steps) < 0:
        ap.error("--steps and --repeats must be >= 1, --warmup and --profile_steps >= 0")
    a.variants = a.variants or default_grid(a.jobs)
    if a.dry_run: return a
    if a.out is None and not a.worker:
        ap.error("--out PATH is required: where to write the JSON of rows (e.g. --out /tmp/gpu-check.json)")
    from magma.methods import METHODS
    if a.method not in METHODS: ap.error(f"--method {a.method!r}: not a method; choose from {', '.join(sorted(METHODS))}")
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch ({torch.__version__}) sees no CUDA device; pass --device cpu or --smoke")
    a.device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine())
    a.commit = git_commit()
    return a


def bench_args(argv: list | None = None, **kw):
    "The arguments `Bench(v, a, device)` reads, as the command line gives them (`argv`), with `kw` set over them."
    a = finish_args(parser().parse_args(list(argv or []) + ['--dry-run']), parser())
    a.device_name, a.commit = a.device, 'unknown'
    for k, v in kw.items(): setattr(a, k, v)
    return a


def _broken(status: str) -> bool:
    "A failure that leaves this process's CUDA context unusable for the next rows."
    return any(s in status for s in ('CUDA error', 'device-side assert', 'illegal memory access', 'CUBLAS_STATUS_EXECUTION_FAILED'))


def run(a, t0: float | None = None, tests: dict | None = None) -> dict:
    "Measure a.variants in order within a.budget (counted from `t0`), printing each row as it lands; the document."
    t0 = time.time() if t0 is None else t0
    device, costs, broken = torch.device(a.device), Costs(a), None
    deadline = None if a.budget is None else t0 + a.budget
    import magma
    doc = dict(date=datetime.datetime.now().isoformat(timespec='seconds'), commit=a.commit, torch=torch.__version__,
               cuda=torch.version.cuda, card=a.device_name, python=platform.python_version(), threads=torch.get_num_threads(),
               magma=str(Path(magma.__file__).parent), argv=sys.argv[1:], budget=a.budget, out=str(a.out),
               **({} if tests is None else dict(tests=tests)), rows=[], seconds=time.time() - t0)
    print(f"# bench: {len(a.variants)} rows on {a.device_name} (torch {torch.__version__}, commit {a.commit}, magma from "
          f"{doc['magma']}); budget {'none' if a.budget is None else f'{a.budget:.0f} s'}, {time.time() - t0:.0f} s spent before it", flush=True)
    print(HEAD + '\n' + '|---' * HEAD.count(' | ') + '|---|', flush=True)
    for v in a.variants:
        est = costs.estimate(v)
        left = None if deadline is None else deadline - time.time()
        if left is not None and est > left:
            r = dict(base_row(v, a), status=f"skipped: budget (estimate {est:.0f} s, {max(left, 0):.0f} s left)", images_per_sec=None)
        elif broken and v['jobs'] == 1:
            r = dict(base_row(v, a), status=f"skipped: an earlier row broke this process's CUDA context ({broken})", images_per_sec=None)
        elif v['mode'] in ('compiled-ro', 'graphed') and device.type != 'cuda':
            r = dict(base_row(v, a), status='skipped: needs CUDA', images_per_sec=None)
        elif v['jobs'] > 1 or v['mode'] == 'graphed':            # a failed capture must not poison this process's CUDA context
            r = measure_jobs(v, a, device, timeout=max(120.0, 3 * est))
        else:
            r = measure(v, a, device, deadline)
            if _broken(r['status']): broken = variant_str(v)
        r['est_seconds'] = est
        costs.update(v, r)
        doc['rows'].append(r); doc['seconds'] = time.time() - t0
        write_atomic(a.out, doc)                                     # saved as each row lands
        print(row_line(r), flush=True)
    doc['exit'] = exit_code(doc['rows'], tests and tests['rc'])
    doc['verdict'] = verdict(doc)
    write_atomic(a.out, doc)
    print(doc['verdict'], flush=True)
    return doc


def main(argv=None) -> int:
    ap = parser()
    a = finish_args(ap.parse_args(argv), ap)
    if a.dry_run:
        print(plan_text(a, a.variants, a.budget)); return 0
    if a.worker: return _worker(a, torch.device(a.device))
    return run(a)['exit']


if __name__ == '__main__':
    sys.exit(main())
