#!/usr/bin/env python3
"""Print the script that runs every paper table on one multi-GPU node or as SLURM arrays, preemption-safe.

    make sweep                                                    # = python scripts/sweep_commands.py (node mode, 8 GPUs)
    python scripts/sweep_commands.py --mode node --gpus 8 > sweep.sh && bash sweep.sh
    python scripts/sweep_commands.py --mode slurm > sweep.sh     # then the two sbatch lines at its top
    python scripts/sweep_commands.py --tables table1 --seeds 0 --mode list

The pretraining runs come from `magma.runs.table_runs` (the table notebooks' own enumeration; equal configs shared).
Each is `python -m magma.pretrain ... --resume auto --out_dir <run dir>` (with `torchrun` where it spans GPUs),
skipped when its `results.json` exists. `--resume auto` continues a run whose directory holds a checkpoint of the
same config and starts one whose directory is empty, so re-running the same script after a preemption, a crash or a
time limit picks every run up where its last checkpoint left it.

**Placement.** A run gets `--gpus_per_run` GPUs only where it needs them: by default the ViT-B and ViT-L runs on
ImageNet(-100) get 8 (DDP under torchrun, the paper's setting) and every other run 1. The one-GPU runs are packed,
`--runs_per_gpu` at a time on each GPU (a ViT-T at a global batch of 256 does not fill an H200; `magma.runs` packs its
runs the same way). In node mode the multi-GPU runs go first, one at a time on the whole node, then the small runs
through a pool of GPU slots; a failed run does not stop the sweep: the failures are listed at the end (exit 1).

**SLURM.** One array per placement (`big`: 8 GPUs a task; `small`: one GPU a task running `--runs_per_gpu` runs).
Each task is `--requeue`-able: SLURM sends SIGUSR1 `--signal_lead` seconds before the time limit (or on preemption
SIGTERM); the script forwards SIGTERM to its runs, each run stops at the end of its current step (the last epoch's
checkpoint is on disk: at most the partial epoch is redone, bit-exactly, on resume) and the task requeues itself.

**GPU-hours.** The header states the expected GPU-hours per table: images trained (epochs x pretraining images)
times the training FLOPs per image of each run's architecture (dense layers: 6 x parameters x tokens seen, encoder on
the visible tokens, MAE decoder on all), over a measured rate: `--ref_images_per_sec` images/s per GPU of the reference
run (ViT-T/4, 32 px, MAE with the paper decoder, bf16), 6,163 by default (one H200, `bench/README.md`). It is an
estimate by FLOP scaling, not a measurement of each architecture.
"""
from __future__ import annotations
import argparse, math, shlex
from pathlib import Path
from magma.runs import table_runs
from magma.paper import PAPER_TABLES

ROOT = Path(__file__).resolve().parents[1]
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
    launcher = f"torchrun --standalone --nproc_per_node={gpus}" if gpus > 1 else "python"
    return (f"test -f {shlex.quote(str(Path(run.out_dir) / 'results.json'))} || "
            f"exec {launcher} -m magma.pretrain {' '.join(shlex.quote(a) for a in flat)}")


def table_command(table: str, profile: str, seeds, runs_dir, data_dir=None, device='cuda') -> str:
    nb = 'figures' if table == 'figures' else table
    p = f"-p profile {profile} -p seeds {','.join(map(str, seeds))} -p runs_dir {shlex.quote(str(runs_dir))} -p device {device}"
    if data_dir: p += f" -p data_dir {shlex.quote(str(data_dir))}"
    return f"papermill nbs/tables/{nb}.ipynb {shlex.quote(str(Path(runs_dir) / profile / f'{nb}.ipynb'))} {p}"


def _array(name: str, cmds: list) -> str:
    q = lambda c: "'" + c.replace("'", "'\\''") + "'"
    return f"{name}=(\n" + ''.join(f"  {q(c)}\n" for c in cmds) + ")\n"


def node_script(big: list, small: list, tables: list, gpus: int, runs_per_gpu: int, header: str) -> str:
    return f"""#!/bin/bash
{header}
# Node mode: the multi-GPU runs one after another on the whole node, then the one-GPU runs {runs_per_gpu} per GPU.
# A failed run does not stop the sweep; failures are listed at the end. Re-run this script to resume.
cd {shlex.quote(str(ROOT))}
GPUS=${{GPUS:-{gpus}}}
failed=$(mktemp)
{_array('BIG', big)}{_array('SMALL', small)}{_array('TABLES', tables)}
for c in "${{BIG[@]}}"; do bash -c "$c" || echo "$c" >> "$failed"; done
slots=$(mktemp -u); mkfifo "$slots"; exec 3<>"$slots"; rm "$slots"
for ((g = 0; g < GPUS; g++)); do for ((k = 0; k < {runs_per_gpu}; k++)); do echo $g >&3; done; done
for c in "${{SMALL[@]}}"; do
  read -u 3 g
  ( CUDA_VISIBLE_DEVICES=$g bash -c "$c" || echo "$c" >> "$failed"; echo $g >&3 ) &
done
wait
for c in "${{TABLES[@]}}"; do bash -c "$c" || echo "$c" >> "$failed"; done
if [ -s "$failed" ]; then echo "sweep: $(wc -l < "$failed") command(s) failed:"; cat "$failed"; rm -f "$failed"; exit 1; fi
rm -f "$failed"; echo "sweep: every run and table done"
"""


def slurm_script(big: list, small: list, tables: list, big_gpus: int, runs_per_gpu: int, opts: str, lead: int,
                 header: str) -> str:
    n_small = math.ceil(len(small) / runs_per_gpu)
    subs = []
    if big: subs.append(f"#   sbatch --gres=gpu:{big_gpus} --array=0-{len(big) - 1} sweep.sh big")
    if small: subs.append(f"#   sbatch --gres=gpu:1 --array=0-{n_small - 1} sweep.sh small")
    return f"""#!/bin/bash
#SBATCH --job-name=magma-sweep
#SBATCH --output=slurm-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@{lead}
""" + ''.join(f"#SBATCH {o}\n" for o in shlex.split(opts)) + f"""{header}
# Submit the two placements (each array task is requeued on preemption or at its time limit):
{chr(10).join(subs)}
# then render the tables (one GPU or CPU): bash sweep.sh tables
cd {shlex.quote(str(ROOT))}
{_array('BIG', big)}{_array('SMALL', small)}{_array('TABLES', tables)}
requeue() {{ kill -TERM $(jobs -p) 2>/dev/null; wait; scontrol requeue "$SLURM_JOB_ID"; exit 0; }}
trap requeue USR1 TERM
case "$1" in
  big) bash -c "${{BIG[$SLURM_ARRAY_TASK_ID]}}" & ;;
  small) for ((k = 0; k < {runs_per_gpu}; k++)); do
           i=$((SLURM_ARRAY_TASK_ID * {runs_per_gpu} + k)); if [ $i -lt ${{#SMALL[@]}} ]; then bash -c "${{SMALL[$i]}}" & fi
         done ;;
  tables) for c in "${{TABLES[@]}}"; do bash -c "$c" || exit 1; done; exit 0 ;;
  *) echo "usage: sbatch ... sweep.sh big|small, or bash sweep.sh tables"; exit 2 ;;
esac
rc=0; for p in $(jobs -p); do wait $p || rc=1; done; exit $rc
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ap.add_argument('--runs_per_gpu', type=int, default=2, help='one-GPU runs packed on each GPU at once')
    ap.add_argument('--ref_images_per_sec', type=float, default=6163.0,
                    help='training images/s of ViT-T/4 MAE (paper decoder, bf16) on one of your GPUs, for the GPU-hour estimate')
    ap.add_argument('--mode', choices=['node', 'slurm', 'list'], default='node',
                    help='node: a script for one multi-GPU node; slurm: sbatch array scripts; list: one pretraining command per line')
    ap.add_argument('--slurm_opts', default='--time=24:00:00 --cpus-per-task=16', help='extra #SBATCH options')
    ap.add_argument('--signal_lead', type=int, default=300, help='seconds before the time limit SLURM signals the task')
    a = ap.parse_args(argv)
    for k in ('gpus', 'big_gpus', 'runs_per_gpu'):
        if getattr(a, k) < 1: ap.error(f"--{k} must be >= 1")
    if a.gpus_per_run is not None and a.gpus_per_run < 1: ap.error("--gpus_per_run must be >= 1")
    runs, table_of = {}, {}
    for t in a.tables:
        for r in table_runs(t, a.profile, a.seeds, a.cells, a.runs_dir):
            if r.step == 'pretrain': runs.setdefault(r.out_dir, r); table_of.setdefault(r.out_dir, t)
    from magma.configs import resolve_config
    ref_flops = train_flops_per_image(resolve_config(REF['profile'], method=REF['method'], dataset=REF['dataset'], precision='bf16'))
    big, small, hours = [], [], {t: 0.0 for t in a.tables}
    for d, r in runs.items():
        cfg = run_config(r)
        g = a.gpus_per_run or gpus_needed(cfg, a.big_gpus)
        (big if g > 1 else small).append(pretrain_command(r, g, a.data_dir))
        hours[table_of[d]] += gpu_hours(cfg, ref_flops, a.ref_images_per_sec)
    if a.mode == 'list': print('\n'.join(big + small)); return
    tables = [table_command(t, a.profile, a.seeds, a.runs_dir, a.data_dir) for t in a.tables] + \
             [table_command('figures', a.profile, a.seeds[:1], a.runs_dir, a.data_dir)]
    header = (f"# {len(runs)} pretraining runs ({', '.join(a.tables)}; profile {a.profile}; seeds {a.seeds}): {len(big)} on "
              f"{a.gpus_per_run or a.big_gpus} GPUs each, {len(small)} on one GPU each.\n# Expected GPU-hours (FLOP-scaled from "
              f"{a.ref_images_per_sec:,.0f} images/s of ViT-T/4 MAE on one GPU; an estimate): "
              + ', '.join(f"{t} {h:,.0f}" if h else f"{t} 0 (its runs are an earlier table's)" for t, h in hours.items()) + f"; total {sum(hours.values()):,.0f}.")
    if a.mode == 'node': print(node_script(big, small, tables, a.gpus, a.runs_per_gpu, header), end='')
    else: print(slurm_script(big, small, tables, a.gpus_per_run or a.big_gpus, a.runs_per_gpu, a.slurm_opts,
                             a.signal_lead, header), end='')


if __name__ == '__main__': main()
