#!/usr/bin/env python3
"""Print the script that runs every paper table on one multi-GPU node or as SLURM arrays, preemption-safe.

    make sweep                                                    # = python scripts/sweep_commands.py (node mode, 8 GPUs)
    python scripts/sweep_commands.py --mode node --gpus 8 > sweep.sh && bash sweep.sh
    python scripts/sweep_commands.py --mode slurm > sweep.sh     # then: bash sweep.sh submit (three sbatch calls)
    python scripts/sweep_commands.py --tables table1 --seeds 0 --mode list

The runs come from `magma.runs.table_runs` (the table notebooks' own enumeration; equal configs shared). Each
pretraining run is `<python> -m magma.pretrain ... --resume auto --out_dir <run dir>` (`<python> -m torch.distributed.run`
where it spans GPUs), skipped when its `results.json` exists. `<python>` is the interpreter that generated the script
(`sys.executable`, e.g. the project's `.venv/bin/python`), so the script needs no activated environment. Each
evaluation step (Table 6's transfer, Table 7's fine-tuning) is `<python> scripts/sweep_commands.py --evaluate '<run>'`:
`magma.runs.evaluate_run` (nbs/evaluate.ipynb through papermill) on one GPU, refused until its pretraining run has
written `results.json`, skipped once its own exists. Every argument is quoted (`shlex.quote`) and a value holding a
control character (a newline would split a line of `--mode list`) is refused in one line naming the option. `--resume auto` continues a run whose directory holds a checkpoint of the
same config and starts one whose directory is empty, so re-running the same script after a preemption, a crash or a
time limit picks every run up where its last checkpoint left it.

**Placement.** A run gets `--gpus_per_run` GPUs only where it needs them: by default the ViT-B and ViT-L runs on
ImageNet(-100) get 8 (DDP under torchrun, the paper's setting) and every other run 1. The one-GPU runs are packed,
`--runs_per_gpu` at a time on each GPU (a ViT-T at a global batch of 256 does not fill an H200; `magma.runs` packs its
runs the same way). In node mode the multi-GPU runs go first, one at a time on the whole node, then the small runs
through a pool of GPU slots, then the evaluation steps through the same pool; a failed run does not stop the sweep:
the failures are listed at the end (exit 1).

**SLURM.** One array per placement (`big`: 8 GPUs a task; `small`: one GPU a task running `--runs_per_gpu` runs;
`eval`: one GPU a task running `--runs_per_gpu` evaluation steps, submitted with `--dependency=afterany` on the two
pretraining arrays). `bash sweep.sh submit` submits the three. Each array's `--cpus-per-task` comes from the loader
workers: (`num_workers` + 1) per process (pretraining: `num_workers` of the run's config, one process per GPU;
evaluation: 8 workers, `magma.loader`'s default cap), times the processes of a task.
Each task is `--requeue`-able: SLURM sends SIGUSR1 `--signal_lead` seconds before the time limit (or on preemption
SIGTERM); the script forwards SIGTERM to its runs, each run stops at the end of its current step (the last epoch's
checkpoint is on disk: at most the partial epoch is redone, bit-exactly, on resume) and the task requeues itself.

**GPU-hours.** The header states the expected GPU-hours per table: images trained (epochs x pretraining images)
times the training FLOPs per image of each run's architecture (dense layers: 6 x parameters x tokens seen, encoder on
the visible tokens, MAE decoder on all), over a measured rate: `--ref_images_per_sec` images/s per GPU of the reference
run (ViT-T/4, 32 px, MAE with the paper decoder, bf16), 6,163 by default (one H200, `bench/README.md`). It is an
estimate by FLOP scaling, not a measurement of each architecture. The evaluation steps are counted the same way:
fine-tuning is `epochs` (100) x the target's labelled training images x 6 x encoder parameters x tokens at the
checkpoint's resolution (the images are resized to it); transfer is one forward pass (2 x parameters x tokens at the
target's resolution) over the target's training and test images (the probe on cached features is negligible).
**Wall clock on one node**: the multi-GPU runs one after another, then the one-GPU runs and the evaluation steps
spread over the node's GPUs, each phase at least as long as its longest run (sharing a GPU is assumed to give no
more throughput than one run alone: an upper estimate for small runs).
"""
from __future__ import annotations
import argparse, json, math, shlex, sys
from pathlib import Path
from magma.runs import table_runs
from magma.paper import PAPER_TABLES

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable                 # the environment's own interpreter: the script needs no activated venv
EVAL_WORKERS = 8                        # magma.loader's default DataLoader workers (min(8, cores)) for an evaluation step
LABELED = {'cifar10': (50_000, 10_000), 'cifar100': (50_000, 10_000), 'stl10': (5_000, 8_000),
           'tinyimagenet': (100_000, 10_000), 'imagenet100': (126_689, 5_000), 'imagenet': (1_281_167, 50_000)}  # (train, test)
PRETRAIN_IMAGES = {'cifar10': 50_000, 'cifar100': 50_000, 'stl10': 105_000, 'tinyimagenet': 100_000,
                   'imagenet100': 126_689, 'imagenet': 1_281_167}   # the pretraining splits (STL-10: train + unlabeled)
REF = dict(method='mae', profile='paper', dataset='cifar100', backbone='vit_tiny')   # the run the reference rate is of


def run_config(run):
    from magma.configs import resolve_config
    return resolve_config(run.profile, method=run.method, dataset=run.dataset, **run.params)


def gpus_needed(cfg, big: int) -> int:
    "`big` GPUs for a ViT-B or larger on ImageNet(-100), else 1."
    return big if cfg.backbone in ('vit_base', 'vit_large', 'vit_huge') and cfg.dataset.startswith('imagenet') else 1


def train_flops_per_image(cfg) -> float:
    "6 x parameters x tokens for the dense layers: the encoder on its visible tokens (and views), a decoder on all tokens."
    key = (cfg.method, cfg.backbone, cfg.img_size, cfg.patch_size, cfg.decoder_dim, cfg.decoder_depth, cfg.mask_ratio)
    if key not in _FLOPS: _FLOPS[key] = _train_flops(cfg)
    return _FLOPS[key]

_FLOPS = {}

def _train_flops(cfg) -> float:
    import torch
    from magma.train import build_method
    with torch.device('meta'): m = build_method(cfg)
    tokens = (cfg.img_size // cfg.patch_size) ** 2 + 1
    enc = sum(p.numel() for p in m.encoder.parameters())
    if hasattr(m, 'mask_ratio'):
        dec = sum(p.numel() for n, p in m.named_parameters() if not n.startswith('encoder.'))
        return 6 * (enc * (tokens * (1 - m.mask_ratio) + 1) + dec * tokens)
    from magma.methods import METHODS
    return 6 * enc * tokens * len(METHODS[cfg.method].views)


def gpu_hours(cfg, ref_flops: float, ref_rate: float) -> float:
    images = cfg.epochs * PRETRAIN_IMAGES.get(cfg.dataset, 50_000)
    return images * train_flops_per_image(cfg) / (ref_flops * ref_rate) / 3600


def pretrain_command(run, gpus: int = 1, data_dir=None, extra: dict | None = None) -> str:
    """The run's command: skipped when its results.json exists, else `--resume auto` (continue a checkpoint, or start).
    The launcher replaces the shell (`exec`), so a signal sent to the command's process reaches the trainer itself."""
    args = dict(method=run.method, profile=run.profile, dataset=run.dataset, seed=run.seed, out_dir=run.out_dir,
                **run.params, resume='auto', **(extra or {}))
    if data_dir: args['data_dir'] = data_dir
    flat = []
    for k, v in args.items():
        if isinstance(v, (list, tuple)): flat += [f'--{k}', *map(str, v)]
        else: flat += [f'--{k}', str(v).lower() if isinstance(v, bool) else str(v)]
    py = shlex.quote(PYTHON)
    launcher = f"{py} -m torch.distributed.run --standalone --nproc_per_node={int(gpus)}" if gpus > 1 else py
    return (f"test -f {shlex.quote(str(Path(run.out_dir) / 'results.json'))} || "
            f"exec {launcher} -m magma.pretrain {' '.join(shlex.quote(a) for a in flat)}")


def eval_command(run, data_dir=None) -> str:
    """An evaluation step's command: skipped when its results.json exists, else `--evaluate` (below) on one GPU."""
    from dataclasses import asdict
    args = [PYTHON, str(ROOT / 'scripts' / 'sweep_commands.py'), '--evaluate', json.dumps(asdict(run), sort_keys=True)]
    if data_dir: args += ['--data_dir', str(data_dir)]
    return (f"test -f {shlex.quote(str(Path(run.out_dir) / 'results.json'))} || "
            f"exec {' '.join(shlex.quote(a) for a in args)}")


def evaluate_step(spec: str, data_dir=None, device='cuda') -> str:
    "`--evaluate`: run one evaluation step (`magma.runs.evaluate_run`) once its pretraining run has finished."
    from magma.runs import Run, evaluate_run
    run = Run(**json.loads(spec))
    done = Path(run.pretrain_dir) / 'results.json'
    if not done.is_file():
        raise SystemExit(f"sweep_commands.py: error: {run.step} {run.cell} seed {run.seed}: its pretraining run "
                         f"{run.pretrain_dir} has not finished (no results.json); run it first, then this command again")
    return evaluate_run(run, device=device, data_dir=data_dir)


def eval_gpu_hours(run, cfg, ref_flops: float, ref_rate: float, finetune_epochs: int = 100) -> float:
    "An evaluation step's GPU-hours, FLOP-scaled as `gpu_hours` (module docstring)."
    from magma.datasets import IMG_SIZE
    enc = _encoder_params(cfg)
    n_train, n_test = LABELED.get(run.target, (50_000, 10_000))
    if run.step == 'finetune':
        flops = finetune_epochs * n_train * 6 * enc * ((cfg.img_size // cfg.patch_size) ** 2 + 1)
    else:
        side = IMG_SIZE.get(run.target, cfg.img_size)
        flops = (n_train + n_test) * 2 * enc * ((side // cfg.patch_size) ** 2 + 1)
    return flops / (ref_flops * ref_rate) / 3600


def _encoder_params(cfg) -> int:
    import torch
    from magma.train import build_method
    key = ('enc', cfg.method, cfg.backbone, cfg.img_size, cfg.patch_size)
    if key not in _FLOPS:
        with torch.device('meta'): _FLOPS[key] = sum(p.numel() for p in build_method(cfg).encoder.parameters())
    return _FLOPS[key]


def _h(hours: float) -> str: return f"{hours:,.0f}" if hours >= 9.95 else f"{hours:.1f}"


def cpus_per_task(procs: int, workers: int) -> int:
    "CPUs for `procs` processes of `workers` DataLoader workers each: a core per worker and one per process."
    return procs * (workers + 1)


def wall_hours(hours: list, gpus: int) -> float:
    "Wall clock of one-GPU runs of `hours` each spread over `gpus` GPUs: the mean load, at least the longest run."
    return max(sum(hours) / gpus, max(hours)) if hours else 0.0


CONTROL = {chr(c) for c in range(32)} | {chr(127)}

def control_chars(value) -> bool:
    "Whether `value` (text or a list of texts) holds a control character: a newline, a tab, a carriage return..."
    vals = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, str) and CONTROL & set(v) for v in vals)


def table_command(table: str, profile: str, seeds, runs_dir, data_dir=None, device='cuda') -> str:
    nb = 'figures' if table == 'figures' else table
    args = [PYTHON, '-m', 'papermill', f'nbs/tables/{nb}.ipynb', str(Path(runs_dir) / profile / f'{nb}.ipynb'),
            '-p', 'profile', profile, '-p', 'seeds', ','.join(map(str, seeds)), '-p', 'runs_dir', str(runs_dir),
            '-p', 'device', device]
    if data_dir: args += ['-p', 'data_dir', str(data_dir)]
    return ' '.join(shlex.quote(a) for a in args)


def _array(name: str, cmds: list) -> str:
    q = lambda c: "'" + c.replace("'", "'\\''") + "'"
    return f"{name}=(\n" + ''.join(f"  {q(c)}\n" for c in cmds) + ")\n"


def node_script(big: list, small: list, tables: list, gpus: int, runs_per_gpu: int, header: str, evals=()) -> str:
    return f"""#!/bin/bash
{header}
# Node mode: the multi-GPU runs one after another on the whole node, then the one-GPU runs {runs_per_gpu} per GPU, then
# the evaluation steps {runs_per_gpu} per GPU, then the tables.
# A failed run does not stop the sweep; failures are listed at the end. Re-run this script to resume.
cd {shlex.quote(str(ROOT))}
GPUS=${{GPUS:-{gpus}}}
failed=$(mktemp)
{_array('BIG', big)}{_array('SMALL', small)}{_array('EVALS', list(evals))}{_array('TABLES', tables)}
for c in "${{BIG[@]}}"; do bash -c "$c" || echo "$c" >> "$failed"; done
slots=$(mktemp -u); mkfifo "$slots"; exec 3<>"$slots"; rm "$slots"
for ((g = 0; g < GPUS; g++)); do for ((k = 0; k < {runs_per_gpu}; k++)); do echo $g >&3; done; done
pool() {{
  for c in "$@"; do
    read -u 3 g
    ( CUDA_VISIBLE_DEVICES=$g bash -c "$c" || echo "$c" >> "$failed"; echo $g >&3 ) &
  done
  wait
}}
pool "${{SMALL[@]}}"
pool "${{EVALS[@]}}"
for c in "${{TABLES[@]}}"; do bash -c "$c" || echo "$c" >> "$failed"; done
if [ -s "$failed" ]; then echo "sweep: $(wc -l < "$failed") command(s) failed:"; cat "$failed"; rm -f "$failed"; exit 1; fi
rm -f "$failed"; echo "sweep: every run and table done"
"""


def slurm_script(big: list, small: list, tables: list, big_gpus: int, runs_per_gpu: int, opts: str, lead: int,
                 header: str, evals=(), cpus=(None, None, None)) -> str:
    """`cpus`: --cpus-per-task of the big, small and eval arrays (None: SLURM's default or `opts`' own)."""
    evals = list(evals)
    arrays = [('big', big, f'--gres=gpu:{big_gpus}', len(big)), ('small', small, '--gres=gpu:1', math.ceil(len(small) / runs_per_gpu)),
              ('eval', evals, '--gres=gpu:1', math.ceil(len(evals) / runs_per_gpu))]
    subs, deps = [], []
    for (name, cmds, gres, n), c in zip(arrays, cpus):
        if not cmds: continue
        dep = f" --dependency=afterany:{':'.join(deps)}" if name == 'eval' and deps else ''
        cpu = f" --cpus-per-task={c}" if c else ''
        subs.append(f"{name}_job=$(sbatch --parsable {gres}{cpu}{dep} --array=0-{n - 1} \"$SELF\" {name}) && "
                    f"echo \"{name}: job ${{{name}_job}}\"")
        if name != 'eval': deps.append(f'${{{name}_job%%;*}}')
    return f"""#!/bin/bash
#SBATCH --job-name=magma-sweep
#SBATCH --output=slurm-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@{lead}
""" + ''.join(f"#SBATCH {o}\n" for o in shlex.split(opts)) + f"""{header}
# Submit the arrays (each task is requeued on preemption or at its time limit; the evaluation steps start once both
# pretraining arrays have ended): bash sweep.sh submit. Then render the tables (one GPU or CPU): bash sweep.sh tables
SELF=$(realpath "$0")
cd {shlex.quote(str(ROOT))}
{_array('BIG', big)}{_array('SMALL', small)}{_array('EVALS', evals)}{_array('TABLES', tables)}
requeue() {{ kill -TERM $(jobs -p) 2>/dev/null; wait; scontrol requeue "$SLURM_JOB_ID"; exit 0; }}
case "$1" in
  submit) {' && '.join(subs) or 'true'}; exit $? ;;
  tables) for c in "${{TABLES[@]}}"; do bash -c "$c" || exit 1; done; exit 0 ;;
esac
trap requeue USR1 TERM
case "$1" in
  big) bash -c "${{BIG[$SLURM_ARRAY_TASK_ID]}}" & ;;
  small|eval) if [ "$1" = small ]; then CMDS=("${{SMALL[@]}}"); else CMDS=("${{EVALS[@]}}"); fi
         for ((k = 0; k < {runs_per_gpu}; k++)); do
           i=$((SLURM_ARRAY_TASK_ID * {runs_per_gpu} + k)); if [ $i -lt ${{#CMDS[@]}} ]; then bash -c "${{CMDS[$i]}}" & fi
         done ;;
  *) echo "usage: bash sweep.sh submit|tables (sbatch runs it as big, small or eval)"; exit 2 ;;
esac
rc=0; for p in $(jobs -p); do wait $p || rc=1; done; exit $rc
"""


def main(argv=None):
    ap = argparse.ArgumentParser(prog='sweep_commands.py', description=__doc__.splitlines()[0])
    ap.add_argument('--tables', nargs='+', default=list(PAPER_TABLES), choices=list(PAPER_TABLES), help='tables (default: all)')
    ap.add_argument('--profile', default='paper', choices=['paper', 'mini', 'smoke'])
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    ap.add_argument('--cells', nargs='+', default=None, help='subset: method, column or method/column names')
    ap.add_argument('--runs_dir', default='runs')
    ap.add_argument('--data_dir', default=None)
    ap.add_argument('--gpus', type=int, default=8, help='GPUs on the node (node mode)')
    ap.add_argument('--gpus_per_run', type=int, default=None,
                    help='GPUs of every run (default: 8 for ViT-B/L on ImageNet(-100), 1 for the others)')
    ap.add_argument('--big_gpus', type=int, default=8, help='GPUs of a run that needs several (default 8, the paper)')
    ap.add_argument('--runs_per_gpu', type=int, default=2, help='one-GPU runs (and evaluation steps) packed on each GPU at once')
    ap.add_argument('--ref_images_per_sec', type=float, default=6163.0,
                    help='training images/s of ViT-T/4 MAE (paper decoder, bf16) on one of your GPUs, for the GPU-hour estimate')
    ap.add_argument('--mode', choices=['node', 'slurm', 'list'], default='node',
                    help='node: a script for one multi-GPU node; slurm: sbatch array scripts; list: one command per line, '
                         'the pretraining runs first, then the evaluation steps (each refused until its pretraining has finished)')
    ap.add_argument('--slurm_opts', default='--time=24:00:00',
                    help='extra #SBATCH options (--cpus-per-task: computed per array from the loader workers unless given here)')
    ap.add_argument('--signal_lead', type=int, default=300, help='seconds before the time limit SLURM signals the task')
    ap.add_argument('--evaluate', default=None, metavar='RUN_JSON', help=argparse.SUPPRESS)   # one evaluation step (eval_command)
    a = ap.parse_args(argv)
    def fail(msg): ap.exit(2, f"{ap.prog}: error: {msg}\n")
    for k, v in vars(a).items():
        if k != 'evaluate' and control_chars(v):
            fail(f"--{k} {v!r}: holds a control character (newline, tab, ...), which could split or inject a command; "
                 f"give a value without one")
    for k in ('gpus', 'big_gpus', 'runs_per_gpu'):
        if getattr(a, k) < 1: fail(f"--{k} must be >= 1")
    if a.gpus_per_run is not None and a.gpus_per_run < 1: fail("--gpus_per_run must be >= 1")
    if a.evaluate is not None: print(evaluate_step(a.evaluate, a.data_dir)); return
    runs, evals, table_of = {}, {}, {}
    for t in a.tables:
        for r in table_runs(t, a.profile, a.seeds, a.cells, a.runs_dir):
            (runs if r.step == 'pretrain' else evals).setdefault(r.out_dir, r); table_of.setdefault(r.out_dir, t)
    from magma.configs import resolve_config
    ref_flops = train_flops_per_image(resolve_config(REF['profile'], method=REF['method'], dataset=REF['dataset'], precision='bf16'))
    big, small, hours = [], [], {t: 0.0 for t in a.tables}
    phase = dict(big=[], small=[], eval=[])
    workers = dict(big=0, small=0)
    for d, r in runs.items():
        cfg = run_config(r)
        g = a.gpus_per_run or gpus_needed(cfg, a.big_gpus)
        h = gpu_hours(cfg, ref_flops, a.ref_images_per_sec)
        (big if g > 1 else small).append(pretrain_command(r, g, a.data_dir))
        kind = 'big' if g > 1 else 'small'
        phase[kind].append(h / g); workers[kind] = max(workers[kind], cfg.num_workers)
        hours[table_of[d]] += h
    ev_cmds = []
    for d, r in evals.items():
        h = eval_gpu_hours(r, run_config(r), ref_flops, a.ref_images_per_sec)
        ev_cmds.append(eval_command(r, a.data_dir)); phase['eval'].append(h); hours[table_of[d]] += h
    if a.mode == 'list': print('\n'.join(big + small + ev_cmds)); return
    tables = [table_command(t, a.profile, a.seeds, a.runs_dir, a.data_dir) for t in a.tables] + \
             [table_command('figures', a.profile, a.seeds[:1], a.runs_dir, a.data_dir)]
    n_eval = {s: sum(r.step == s for r in evals.values()) for s in ('transfer', 'finetune')}
    big_g = a.gpus_per_run or a.big_gpus
    wall = dict(big=sum(phase['big']), small=wall_hours(phase['small'], a.gpus), eval=wall_hours(phase['eval'], a.gpus))
    cpus = (cpus_per_task(big_g, workers['big']), cpus_per_task(a.runs_per_gpu, workers['small']),
            cpus_per_task(a.runs_per_gpu, EVAL_WORKERS))
    header = (f"# {len(runs)} pretraining runs ({', '.join(a.tables)}; profile {a.profile}; seeds {a.seeds}): {len(big)} on "
              f"{big_g} GPUs each, {len(small)} on one GPU each; {len(evals)} evaluation steps on one GPU each "
              f"({n_eval['transfer']} transfer, {n_eval['finetune']} fine-tuning).\n"
              f"# Expected GPU-hours, pretraining and evaluation (FLOP-scaled from {a.ref_images_per_sec:,.0f} images/s of "
              f"ViT-T/4 MAE on one GPU; an estimate): "
              + ', '.join(f"{t} {_h(h)}" if h else f"{t} 0 (its runs are an earlier table's)" for t, h in hours.items())
              + f"; total {_h(sum(hours.values()))} (evaluation steps {_h(sum(phase['eval']))}).\n"
              f"# Wall clock on one node of {a.gpus} GPUs (an estimate): multi-GPU runs {_h(wall['big'])} h, one-GPU runs "
              f"{_h(wall['small'])} h, evaluation steps {_h(wall['eval'])} h; total {_h(sum(wall.values()))} h "
              f"({sum(wall.values()) / 24:,.1f} days).\n"
              f"# CPUs for the loader workers (a core per worker, one per process): "
              + ', '.join(f"{c} for {what}" for c, what, n in zip(cpus, (f"a {big_g}-GPU run", f"{a.runs_per_gpu} one-GPU runs",
                                                                         f"{a.runs_per_gpu} evaluation steps"), (big, small, evals)) if n)
              + (f"; node mode at once: up to {max(cpus[0] * bool(big), (cpus[1] * bool(small)) * a.gpus, cpus[2] * bool(evals) * a.gpus)}."
                 if a.mode == 'node' else '.'))
    if a.mode == 'node': print(node_script(big, small, tables, a.gpus, a.runs_per_gpu, header, ev_cmds), end='')
    else:
        own_cpus = any(o.startswith('--cpus-per-task') or o == '-c' for o in shlex.split(a.slurm_opts))
        print(slurm_script(big, small, tables, big_g, a.runs_per_gpu, a.slurm_opts, a.signal_lead, header, ev_cmds,
                           (None,) * 3 if own_cpus else cpus), end='')


if __name__ == '__main__': main()
