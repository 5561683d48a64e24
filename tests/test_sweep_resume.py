"""The sweep scripts of `scripts/sweep_commands.py` survive preemption: a run killed by the scheduler's signal and
started again by the same generated command ends with the step rows of a straight run; node mode goes on past a
failed command and lists the failures."""
import csv, importlib.util, os, shlex, signal, stat, subprocess, sys, time
from pathlib import Path

import pytest

from magma.runs import Run

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('sweep_commands', ROOT / 'scripts' / 'sweep_commands.py')
sweep = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(sweep)

# 3 epochs of 10 steps (160 images in batches of 16), a step row per step, a short evaluation
PARAMS = dict(n_per_class=16, batch_size=16, epochs=3, magma_start=1, log_every=1, linear_epochs=2, loggers='none',
              img_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2, device='cpu')


def _run(out_dir) -> Run:
    return Run(table='table1', row='m-mae', col='smoke', method='m-mae', dataset='synthetic', seed=0, profile='smoke',
               out_dir=str(out_dir), params=dict(PARAMS))


def _env(tmp):
    "This interpreter's directory first on PATH (the commands call it by its path), and a stand-in `scontrol`."
    bin_ = tmp / 'bin'; bin_.mkdir(exist_ok=True)
    fake = bin_ / 'scontrol'; fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'scontrol.log'}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bin_}:{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED='1')


def _step_rows(run_dir):
    with open(Path(run_dir) / 'metrics.csv') as f:
        return [(r['epoch'], r['step'], r['loss'], r['magma']) for r in csv.DictReader(f) if r['kind'] == 'step']


def _wait_for_epoch(run_dir, epoch, proc, timeout=300):
    "Block until the run's log has a step row of `epoch` (the checkpoint of the epoch before is on disk then)."
    log, t0 = Path(run_dir) / 'metrics.csv', time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise AssertionError(f"the run ended (rc {proc.returncode}) before epoch {epoch}")
        if log.is_file() and any(r.startswith(f'step,{epoch},') for r in log.read_text().splitlines()): return
        time.sleep(0.01)
    raise AssertionError(f"no step of epoch {epoch} within {timeout} s")


@pytest.mark.slow(reason="about 80 s on 2 cores; resume exactness after a stop is also 10_train's 'Resume is exact' and 'SIGTERM' cells")
def test_killed_run_rerun_by_the_same_command_equals_a_straight_run(tmp_path):
    env = _env(tmp_path)
    from magma.configs import resolve_config
    from magma.train import train
    train(resolve_config('smoke', method='m-mae', dataset='synthetic', seed=0, out_dir=str(tmp_path / 'straight'), **PARAMS),
          progress=False)                                              # the straight run, in this process
    cmd = sweep.pretrain_command(_run(tmp_path / 'killed'))
    assert '--resume auto' in cmd and f'exec {shlex.quote(sys.executable)} -m magma.pretrain' in cmd   # this environment's python
    proc = subprocess.Popen(['bash', '-c', cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / 'killed', 1, proc)
    proc.send_signal(signal.SIGTERM)                                   # what a scheduler sends on preemption
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert 'stopped by SIGTERM after step' in err and '--resume' in err, err[-2000:]
    assert not (tmp_path / 'killed' / 'results.json').exists()
    again = subprocess.run(['bash', '-c', cmd], env=env, capture_output=True, text=True)   # the requeued job: the same command
    assert again.returncode == 0, again.stderr[-2000:]
    rows = _step_rows(tmp_path / 'killed')
    assert rows == _step_rows(tmp_path / 'straight') and len(rows) == 30
    # a third time: the run is done (results.json), so the command does nothing
    done = (tmp_path / 'killed' / 'results.json').stat().st_mtime_ns
    third = subprocess.run(['bash', '-c', cmd], env=env, capture_output=True, text=True)
    assert third.returncode == 0 and third.stdout == '' and (tmp_path / 'killed' / 'results.json').stat().st_mtime_ns == done


def test_slurm_task_requeues_on_the_time_limit_signal_and_resumes(tmp_path):
    """The SLURM script's `small` task: SLURM's USR1 (`--signal=B:USR1@lead`) makes it pass SIGTERM to its run, wait
    for it to stop and requeue itself (`scontrol requeue $SLURM_JOB_ID`, here a stand-in). The requeued task runs the
    same command, whose resume the test above checks."""
    env = dict(_env(tmp_path), SLURM_JOB_ID='4242', SLURM_ARRAY_TASK_ID='0')
    script = tmp_path / 'sweep.sh'
    script.write_text(sweep.slurm_script([], [sweep.pretrain_command(_run(tmp_path / 'r'))], [], 8, 1, '--time=1:00:00', 60, '# test'))
    proc = subprocess.Popen(['bash', str(script), 'small'], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(tmp_path / 'r', 1, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', '4242']
    assert 'stopped by SIGTERM' in err and not (tmp_path / 'r' / 'results.json').exists()
    # what the requeued task will continue from: the checkpoint of an epoch the log has reached
    from magma.checkpoints import load_checkpoint
    epoch = load_checkpoint(tmp_path / 'r' / 'checkpoint.safetensors', keys=('epoch',))['epoch']
    assert 0 <= epoch < PARAMS['epochs'] - 1 and {r[0] for r in _step_rows(tmp_path / 'r')} >= {str(epoch), str(epoch + 1)}


def test_node_mode_goes_on_past_failures_and_lists_them(tmp_path):
    marks = tmp_path / 'ran'
    ok = lambda n: f"echo {n} >> {marks}"
    script = sweep.node_script([ok('big'), 'exit 3'], [ok('s1'), 'false', ok('s2')], [ok('table')], gpus=1, runs_per_gpu=2,
                               header='# test')
    r = subprocess.run(['bash', '-c', script], capture_output=True, text=True, env=dict(os.environ, GPUS='1'))
    assert r.returncode == 1
    assert sorted(marks.read_text().split()) == ['big', 's1', 's2', 'table']          # every other command still ran
    assert 'sweep: 2 command(s) failed:' in r.stdout and 'exit 3' in r.stdout and 'false' in r.stdout
    r = subprocess.run(['bash', '-c', sweep.node_script([], [ok('s')], [], 1, 1, '# test')], capture_output=True, text=True)
    assert r.returncode == 0 and 'every run and table done' in r.stdout


@pytest.mark.parametrize('gpus,launcher', [(1, f'exec {shlex.quote(sys.executable)} -m magma.pretrain'),
                                           (8, f'exec {shlex.quote(sys.executable)} -m torch.distributed.run --standalone --nproc_per_node=8')])
def test_command_execs_its_launcher(gpus, launcher):
    "The run replaces the shell (`exec`), so the signal a scheduler sends the task's processes reaches the trainer."
    assert launcher in sweep.pretrain_command(_run('runs/x'), gpus)
