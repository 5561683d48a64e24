"""Check a GPU node in one command: the GPU tests, then the trainer-step bench, within one time budget.

    python3 bench/gpu_check.py --out /tmp/gpu-check.json [--budget 480]    # what `make gpu-check` runs
    python3 bench/gpu_check.py --dry-run [--budget 480]                     # the plan, the estimate, the JSON schema

1. `python3 -m pytest -q tests/test_gpu.py` with this checkout first on PYTHONPATH (every test there skips without
   CUDA): compiled and reduce-overhead steps against eager, bf16 against float64, stop-and-resume on CUDA, no host
   syncs in any method's batches and steps but the guard's, and the notebooks' GPU checks.
2. `bench/gpu_step_bench.py` on what is left of `--budget` (the whole check's seconds): eager, compiled and graphed
   rows for both decoders, bf16 and fp32, one run and `--jobs` runs packed on the GPU; rows that no longer fit are
   skipped and say so.

Any other argument goes to the bench (`python3 bench/gpu_step_bench.py --help`). Output: pytest's, then one table line
per row as it is measured, then one verdict line (`VERDICT: PASS|FAIL ...`); the JSON at `--out` holds the rows and the
tests' outcome. Exit status 1 when a test fails, a baseline (eager) row fails or no row measured anything. Needs torch,
timm, safetensors and pytest; not magma (imported from this checkout), nbdev, fastcore or IPython.
"""
from __future__ import annotations
import importlib.util, os, re, subprocess, sys, threading, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_spec = importlib.util.spec_from_file_location('gpu_step_bench', HERE / 'gpu_step_bench.py')
bench = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(bench)


def run_tests(timeout: float) -> dict:
    "pytest -q tests/test_gpu.py in a process of its own, its output passed through: {rc, summary, seconds}."
    t0, env = time.time(), dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_gpu.py']
    print(f"# tests: {' '.join(cmd[1:])}", flush=True)
    last = []
    try:
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            watchdog = threading.Timer(timeout, p.kill); watchdog.start()     # a hung test must not eat the bench's time
            for line in p.stdout: print(line, end='', flush=True); last = (last + [line.strip()])[-20:]
            rc = p.wait(); watchdog.cancel()
        if time.time() - t0 >= timeout: last.append(f"killed after {timeout:.0f} s")
    except OSError as e: rc, last = 1, [f"could not start pytest: {e}"]
    found = [x for x in last if re.search(r'\b(passed|failed|skipped|error|errors|no tests ran|killed)\b', x)]
    summary = found[-1].strip('= ') if found else (last[-1] if last else 'no output')
    if rc and 'No module named pytest' in ' '.join(last): summary = 'pytest is not installed: python3 -m pip install pytest'
    return dict(rc=rc, summary=summary, seconds=time.time() - t0)


def main(argv=None) -> int:
    ap = bench.parser('python3 bench/gpu_check.py')
    ap.description = __doc__.split('\n\n')[0]
    ap.add_argument('--no-tests', action='store_true', help="skip step 1 (the GPU tests)")
    a = bench.finish_args(ap.parse_args(argv), ap)
    tests_s = 0.0 if a.no_tests else bench.TESTS_EST_S
    if a.dry_run:
        print(f"1. tests: python3 -m pytest -q tests/test_gpu.py, estimate {tests_s:.0f} s (all skipped without CUDA)")
        print("2. " + bench.plan_text(a, a.variants, a.budget, tests_s)); return 0
    t0 = time.time()
    tests = None if a.no_tests else run_tests(timeout=max(3 * bench.TESTS_EST_S, a.budget / 2) if a.budget else 1800)
    return bench.run(a, t0=t0, tests=tests)['exit']


if __name__ == '__main__':
    sys.exit(main())
