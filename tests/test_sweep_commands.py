"""`scripts/sweep_commands.py` (issue 28 item 5, issue 31's sweep injection): the evaluation steps (Table 6's transfer,
Table 7's fine-tuning) are placed after the pretraining and counted in the GPU-hours header with a wall-clock estimate;
every command calls this environment's own python; SLURM's --cpus-per-task comes from the loader workers; no value
can inject a command: a control character is refused in one line, every argument is quoted."""
import importlib.util, json, os, shlex, stat, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import pytest

from magma.configs import resolve_config
from magma.runs import Run, table_runs

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('sweep_commands', ROOT / 'scripts' / 'sweep_commands.py')
sweep = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(sweep)
PY = shlex.quote(sys.executable)
SMOKE6 = ['--profile', 'smoke', '--tables', 'table6', '--seeds', '0']     # one pretraining run, one transfer step


def _main(capsys, argv):
    "main(argv): (exit code, stdout, stderr)."
    try: sweep.main(argv); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize('opt,value', [('--runs_dir', 'runs\ntouch /tmp/PWNED'), ('--data_dir', 'd\tx'),
                                       ('--slurm_opts', "--time=1:00:00 '--x=a\nrm -rf ~'"), ('--cells', 'mae\r')])
def test_a_control_character_is_refused_in_one_line(capsys, opt, value):
    "A newline in --runs_dir used to split a line of `--mode list` into a second, injected command (issue 31)."
    code, out, err = _main(capsys, ['--mode', 'list', *SMOKE6, opt, value])
    assert code == 2 and out == '', (code, out[:500])
    line = err.strip()
    assert '\n' not in line and line.startswith('sweep_commands.py: error: ' + opt) and 'control character' in line, err


def test_every_argument_is_quoted_and_lines_run_as_written(capsys, tmp_path, monkeypatch):
    """A run directory full of shell metacharacters: each line of `--mode list`, run by bash, passes it through as one
    argument and runs nothing else (the launcher is a stand-in that records its arguments)."""
    rec, log = tmp_path / 'record', tmp_path / 'argv.jsonl'
    rec.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    rec.chmod(rec.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sweep, 'PYTHON', str(rec))
    runs_dir = tmp_path / "a b;$(touch M1)`touch M2`'q\"&|<>*"
    code, out, err = _main(capsys, ['--mode', 'list', *SMOKE6, '--runs_dir', str(runs_dir), '--data_dir', str(tmp_path / '$HOME; x')])
    assert code == 0, err
    lines = out.splitlines(); assert len(lines) == 2, out          # the pretraining run, then its transfer step
    for l in lines: subprocess.run(['bash', '-c', l], cwd=tmp_path, check=True, timeout=60)
    assert not list(tmp_path.glob('M*')) and not list(Path.cwd().glob('M[12]'))
    pre, ev = [json.loads(l) for l in log.read_text().splitlines()]
    want = table_runs('table6', 'smoke', [0], None, str(runs_dir))
    assert pre[pre.index('--out_dir') + 1] == want[0].out_dir and pre[pre.index('--data_dir') + 1] == str(tmp_path / '$HOME; x')
    assert ev[1] == '--evaluate' and Run(**json.loads(ev[2])) == want[1] and ev[-1] == str(tmp_path / '$HOME; x')


def test_evaluation_steps_are_placed_counted_and_use_the_environment_python(capsys):
    code, out, err = _main(capsys, ['--mode', 'node', *SMOKE6])
    assert code == 0, err
    runs = table_runs('table6', 'smoke', [0])
    assert [r.step for r in runs] == ['pretrain', 'transfer']
    evals = out[out.index('EVALS=('):out.index('TABLES=(')]
    assert f"exec {PY} {shlex.quote(str(ROOT / 'scripts' / 'sweep_commands.py'))} --evaluate" in evals and runs[1].out_dir in evals
    assert '1 evaluation steps on one GPU each (1 transfer, 0 fine-tuning)' in out and '# Wall clock on one node of 8 GPUs' in out
    assert out.index('pool "${SMALL[@]}"') < out.index('pool "${EVALS[@]}"') < out.index('for c in "${TABLES[@]}"')
    for name in ('BIG', 'SMALL', 'EVALS', 'TABLES'):                 # every command starts with this interpreter
        body = out[out.index(f'{name}=('):].split(')\n', 1)[0]
        for c in [shlex.split(l)[0] for l in body.splitlines()[1:]]:
            assert c.split(' || exec ')[-1].startswith(f'{sys.executable} ') or c.startswith(f'{sys.executable} '), c


def test_evaluation_gpu_hours_follow_the_flop_formula():
    "A ViT-B/16 fine-tuning step and a transfer step against the formula written out with timm's own parameter count."
    import timm
    run = Run('table7', 'mae', 'cifar100', 'mae', 'imagenet100', 0, 'paper', 'x/finetune-cifar100', {}, 'finetune', 'cifar100', 'x')
    cfg = resolve_config('paper', method='mae', dataset='imagenet100')
    params = sum(p.numel() for p in timm.create_model('vit_base_patch16_224', num_classes=0).parameters())
    ref, rate = 1e10, 5000.0
    want = 100 * 50_000 * 6 * params * (14 * 14 + 1) / (ref * rate) / 3600
    assert sweep.eval_gpu_hours(run, cfg, ref, rate) == pytest.approx(want, rel=1e-3)      # MAE's pos-embed vs timm's: 0.2%
    tr = Run(**{**asdict(run), 'step': 'transfer', 'target': 'stl10', 'table': 'table6'})
    want = (5_000 + 8_000) * 2 * params * (6 * 6 + 1) / (ref * rate) / 3600                     # STL-10 at its own 96 px
    assert sweep.eval_gpu_hours(tr, cfg, ref, rate) == pytest.approx(want, rel=1e-3)
    assert sweep.wall_hours([3.0, 1.0, 1.0], 8) == 3.0 and sweep.wall_hours([1.0] * 16, 8) == 2.0 and sweep.wall_hours([], 8) == 0


def test_slurm_cpus_come_from_the_loader_workers_and_submit_chains_the_evaluations(capsys, tmp_path):
    code, out, err = _main(capsys, ['--mode', 'slurm', *SMOKE6, '--runs_per_gpu', '3'])
    assert code == 0, err
    workers = resolve_config('smoke', method='mae').num_workers
    assert f'--cpus-per-task={3 * (workers + 1)} --array=0-0 "$SELF" small' in out, out[:3000]
    assert f'--cpus-per-task={3 * (sweep.EVAL_WORKERS + 1)} --dependency=afterany:' in out
    code, out2, _ = _main(capsys, ['--mode', 'slurm', *SMOKE6, '--slurm_opts', '--time=1:00:00 --cpus-per-task=3'])
    submit = next(l for l in out2.splitlines() if l.strip().startswith('submit)'))
    assert code == 0 and '#SBATCH --cpus-per-task=3' in out2 and '--cpus-per-task' not in submit, submit
    # `bash sweep.sh submit` with a stand-in sbatch: big, small, then the evaluations after both
    bin_ = tmp_path / 'bin'; bin_.mkdir(); log = tmp_path / 'sbatch.log'
    fake = bin_ / 'sbatch'
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho $((100 + $(wc -l < {log})))\n'); fake.chmod(0o755)
    script = tmp_path / 'sweep.sh'
    script.write_text(sweep.slurm_script(['b'], ['s1', 's2'], ['t'], 8, 2, '--time=1:00:00', 60, '# test', ['e1', 'e2', 'e3'], (40, 10, 18)))
    r = subprocess.run(['bash', 'sweep.sh', 'submit'], cwd=tmp_path, env=dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls == [f'--parsable --gres=gpu:8 --cpus-per-task=40 --array=0-0 {script} big',
                     f'--parsable --gres=gpu:1 --cpus-per-task=10 --array=0-0 {script} small',
                     f'--parsable --gres=gpu:1 --cpus-per-task=18 --dependency=afterany:101:102 --array=0-1 {script} eval'], calls


def test_an_evaluation_step_waits_for_its_pretraining(capsys, tmp_path):
    run = Run('table6', 'mae', 'cifar100', 'mae', 'synthetic', 0, 'smoke', str(tmp_path / 'p' / 'transfer-x'), {}, 'transfer',
              'synthetic', str(tmp_path / 'p'))
    (tmp_path / 'p').mkdir(); (tmp_path / 'p' / 'checkpoint.safetensors').write_bytes(b'')   # training, not finished
    code, out, err = _main(capsys, ['--evaluate', json.dumps(asdict(run))])
    assert isinstance(code, str) and '\n' not in code and 'has not finished (no results.json)' in code, code
    assert not (tmp_path / 'p' / 'transfer-x').exists()


def test_node_mode_runs_evaluations_after_every_pretraining_run(tmp_path):
    marks = tmp_path / 'order'
    ok = lambda n: f"echo {n} >> {marks}"
    script = sweep.node_script([ok('big')], [ok('s1'), 'sleep 0.3; ' + ok('s2')], [ok('table')], 2, 2, '# test', [ok('e1'), 'false'])
    r = subprocess.run(['bash', '-c', script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'sweep: 1 command(s) failed:' in r.stdout
    order = marks.read_text().split()
    assert order[0] == 'big' and set(order[1:3]) == {'s1', 's2'} and order[3:] == ['e1', 'table'], order
