#!/usr/bin/env python3
"""Print the commands that run every paper table on a multi-GPU node or as a SLURM array (one run per task).

    python scripts/sweep_commands.py                              # all tables, paper profile, seeds 0 1 2, 8 GPUs
    python scripts/sweep_commands.py --mode slurm --gpus 4 > sweep.sh && sbatch sweep.sh
    python scripts/sweep_commands.py --tables table1 table8 --seeds 0 --mode node | bash

The pretraining runs come from `magma.runs.table_runs` (the table notebooks' own enumeration; equal configs shared),
each as `torchrun --nproc_per_node=N -m magma.pretrain ... --out_dir <run dir>`, skipped at run time when its
`results.json` exists. Then each table notebook is run with papermill: it finds the runs done (skips them), runs the
transfer / fine-tuning steps of Tables 6 and 7, and renders the table.
"""
import argparse, shlex, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magma.runs import table_runs
from magma.paper import PAPER_TABLES

def pretrain_command(run, gpus: int, data_dir=None, extra: dict | None = None) -> str:
    args = dict(method=run.method, profile=run.profile, dataset=run.dataset, seed=run.seed, out_dir=run.out_dir,
                **run.params, **(extra or {}))
    if data_dir: args['data_dir'] = data_dir
    flat = []
    for k, v in args.items():
        if isinstance(v, (list, tuple)): flat += [f'--{k}', *map(str, v)]
        else: flat += [f'--{k}', str(v).lower() if isinstance(v, bool) else str(v)]
    launcher = f"torchrun --standalone --nproc_per_node={gpus}" if gpus > 1 else "python"
    return (f"test -f {shlex.quote(str(Path(run.out_dir) / 'results.json'))} || "
            f"{launcher} -m magma.pretrain {' '.join(shlex.quote(a) for a in flat)}")

def table_command(table: str, profile: str, seeds, runs_dir, data_dir=None, device='cuda') -> str:
    nb = 'figures' if table == 'figures' else table
    p = f"-p profile {profile} -p seeds {','.join(map(str, seeds))} -p runs_dir {shlex.quote(str(runs_dir))} -p device {device}"
    if data_dir: p += f" -p data_dir {shlex.quote(str(data_dir))}"
    return f"papermill nbs/tables/{nb}.ipynb {shlex.quote(str(Path(runs_dir) / profile / f'{nb}.ipynb'))} {p}"

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tables', nargs='+', default=list(PAPER_TABLES), help='tables (default: all)')
    ap.add_argument('--profile', default='paper', choices=['paper', 'mini', 'smoke'])
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    ap.add_argument('--cells', nargs='+', default=None, help='subset: method, column or method/column names')
    ap.add_argument('--runs_dir', default='runs')
    ap.add_argument('--data_dir', default=None)
    ap.add_argument('--gpus', type=int, default=8, help='GPUs per run (torchrun --nproc_per_node)')
    ap.add_argument('--mode', choices=['node', 'slurm', 'list'], default='node',
                    help='node: a shell script for one multi-GPU node; slurm: an sbatch array script; list: one pretraining command per line')
    ap.add_argument('--slurm_opts', default='--time=48:00:00 --cpus-per-task=32', help='extra #SBATCH options')
    a = ap.parse_args(argv)
    runs = {}
    for t in a.tables:
        for r in table_runs(t, a.profile, a.seeds, a.cells, a.runs_dir):
            if r.step == 'pretrain': runs.setdefault(r.out_dir, r)
    cmds = [pretrain_command(r, a.gpus, a.data_dir) for r in runs.values()]
    tables = [table_command(t, a.profile, a.seeds, a.runs_dir, a.data_dir) for t in a.tables] + \
             [table_command('figures', a.profile, a.seeds[:1], a.runs_dir, a.data_dir)]
    if a.mode == 'list': print('\n'.join(cmds)); return
    if a.mode == 'node':
        print(f"#!/bin/bash\n# {len(cmds)} pretraining runs ({', '.join(a.tables)}; profile {a.profile}; seeds {a.seeds}), "
              f"each on {a.gpus} GPUs, then the table notebooks\nset -e\ncd {shlex.quote(str(Path(__file__).resolve().parents[1]))}")
        print('\n'.join(cmds)); print('\n'.join(tables)); return
    q = lambda c: "'" + c.replace("'", "'\\''") + "'"
    print(f"""#!/bin/bash
#SBATCH --job-name=magma-sweep
#SBATCH --array=0-{len(cmds) - 1}
#SBATCH --gres=gpu:{a.gpus}
#SBATCH --output=slurm-%A_%a.out
""" + ''.join(f"#SBATCH {o}\n" for o in shlex.split(a.slurm_opts)) + f"""# one pretraining run per array task ({len(cmds)} runs); afterwards render the tables (CPU or 1 GPU):
#   {chr(10).join('#   ' + t for t in tables).lstrip('#   ')}
set -e
cd {shlex.quote(str(Path(__file__).resolve().parents[1]))}
CMDS=(
{chr(10).join('  ' + q(c) for c in cmds)}
)
eval "${{CMDS[$SLURM_ARRAY_TASK_ID]}}"
""")

if __name__ == '__main__': main()
