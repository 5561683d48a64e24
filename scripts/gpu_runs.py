"""The mini tables on one CUDA GPU, several runs at a time: how the committed `results/mini` runs were made (on an H200).

    OUT=/tmp/out python scripts/gpu_runs.py --data /path/to/cifar10-mini --jobs 6 --budget 500

Each run is `magma.pretrain.run` with the parameters `magma.runs` gives the mini tables (the same run directories and
configs as `papermill nbs/tables/table2.ipynb -p profile mini`), in its own process, `--jobs` at a time on the one GPU.
Order (the plan of issue 12):
1. the mini Table 2 ablation, seed 0 (MAE and the eight M-MAE cells), and Table 1's runs that no schedule changes
   (MAE seeds 1, 2; U-MAE seed 0);
2. once every ablation cell has finished: the schedule is chosen on the validation split alone
   (`tables.ablation_frame` + `tables.choose_schedule`, rule fixed in results/README.md), then Table 1's M-MAE seeds 1, 2
   and MU-MAE seed 0 run at it;
3. while time remains: the ablation's M-MAE cells at seeds 1 and 2 (a seed spread for the ablation; they choose
   nothing). They are queued from the start behind stage 1; stage 2 goes ahead of them when it is ready.
A run is started only if the slowest finished run would still end before `--budget` seconds.
After each finished run, `$OUT/runs.tar.gz` is rewritten with every finished run's results.json, metrics.csv,
config.json and log (checkpoints stay on the GPU machine). `--bench` first measures training images/s alone on the GPU.
Without `pacmap` installed, the PaCMAP figure is skipped (the results do not depend on it).
"""
import argparse, dataclasses, json, os, subprocess, sys, tarfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(params: dict):
    "Child process: one pretraining run."
    import magma.pretrain as P
    try: import pacmap  # noqa: F401
    except ImportError: P.fig4_pacmap = lambda *a, **k: None
    P.run(progress=False, **params)


def bench(steps: int = 60):
    "Training images/s of MAE (ViT-T/4, 32 px) with the paper's decoder and with mini's, batch 256, bf16 and fp32, alone on the GPU."
    import torch
    from magma.configs import resolve_config
    from magma.train import build_method
    from magma.datasets import get_dataset
    from magma.loader import make_loader
    from magma.methods import METHODS
    from magma.ssl.mae import DECODERS
    ds = get_dataset('synthetic', 'train', n_per_class=100)
    for dec in ('paper', 'light'):
        for prec in ('bf16', 'fp32'):
            for m in ('mae', 'm-mae'):
                cfg = resolve_config('mini', method=m, dataset='synthetic', precision=prec, **DECODERS[dec])
                torch.manual_seed(0)
                model = build_method(cfg).cuda().train(); model.magma_weight = 1.0 if m == 'm-mae' else 0.0
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
                loader = make_loader(ds, 256, METHODS[m].views, 'cuda', seed=0)
                it = iter(loader)
                def step():
                    nonlocal it
                    try: b = next(it)
                    except StopIteration: it = iter(loader); b = next(it)
                    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=prec == 'bf16'): loss = model(b)['loss']
                    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
                for _ in range(10): step()
                torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(steps): step()
                torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
                print(f"bench {m:6s} decoder {dec:5s} {prec}: {256 / dt:8.0f} images/s ({dt * 1e3:.1f} ms/step, batch 256, "
                      f"data pipeline + augmentation on the GPU included)", flush=True)


def at_schedule(run, sched: dict):
    "`run` (a mini Table 1 run) at the MAGMA schedule `sched`, in the directory its tag relative to `MINI_MAGMA` names."
    from magma.configs import MINI_MAGMA
    from magma.runs import _tag, dataset_slug
    ps = {k: v for k, v in sched.items() if MINI_MAGMA[k] != v}
    return dataclasses.replace(run, params=ps, out_dir=str(Path(run.out_dir).parent / f"{run.method}-{dataset_slug(run.dataset)}{_tag(ps)}-s{run.seed}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--one', help=argparse.SUPPRESS)
    ap.add_argument('--data', required=True, help="the cifar10-mini ImageFolder")
    ap.add_argument('--runs_dir', default='/tmp/gpuruns')
    ap.add_argument('--jobs', type=int, default=6)
    ap.add_argument('--budget', type=float, default=500, help="seconds from start: no run starts that would end after it")
    ap.add_argument('--bench', action='store_true')
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--only', default='', help="comma-separated run directory names to run instead of the plan")
    ap.add_argument('--override', default='{}', help="JSON of pretraining parameters for every run (a quick check of this script)")
    ap.add_argument('--extra_seeds', default='1,2', help="stage 3's ablation seeds ('' = none)")
    a = ap.parse_args()
    if a.one: return one(json.loads(a.one))
    t0, out = time.time(), Path(os.environ.get('OUT', '/tmp/out'))
    out.mkdir(parents=True, exist_ok=True)
    if a.bench: bench()
    from magma.runs import table_runs, pretrain_parameters, MINI_TABLE2_SETTINGS
    from magma.tables import ablation_frame, choose_schedule
    from magma.datasets import pretraining_data
    data = Path(a.data).resolve()
    over = json.loads(a.override)
    kw = dict(runs_dir=a.runs_dir, mini_data=data, pretrain_params=over)
    pretraining_data(f'folder:{data}', val_fraction=0.1, img_size=32)      # build the tensor cache once, before the jobs
    mu_mae = table_runs('table1', 'mini', seeds=[0], cells=['mu-mae/cifar100'], **kw)[0]
    if a.only:                                          # an explicit list of run directories, no stage 2
        cands = table_runs('table2', 'mini', seeds=[0, 1, 2], **kw) + table_runs('table1', 'mini', seeds=[0, 1, 2], **kw) + [
                at_schedule(mu_mae, dict(magma_weight=lam, magma_start=est, magma_epochs=edur)) for lam, est, edur in MINI_TABLE2_SETTINGS]
        by = {Path(r.out_dir).name: r for r in cands}
        missing = [n for n in a.only.split(',') if n not in by]
        if missing: raise SystemExit(f"--only: unknown run(s) {missing}; known: {sorted(by)}")
        ablation, queue = [], [by[n] for n in a.only.split(',')]
    else:
        ablation = table_runs('table2', 'mini', seeds=[0], **kw)
        extra = [int(s) for s in a.extra_seeds.split(',') if s]
        queue = ablation + [r for r in table_runs('table1', 'mini', **kw) if r.method in ('mae', 'u-mae') and r.out_dir not in {x.out_dir for x in ablation}] \
            + ([r for r in table_runs('table2', 'mini', seeds=extra, **kw) if r.row == 'm-mae'] if extra else [])
    print(f"[{time.time() - t0:5.0f}s] plan: " + ', '.join(f"{Path(r.out_dir).name} {r.params}" for r in queue), flush=True)
    stage2, done, running, took = ([] if a.only else None), [], {}, []

    def pack():
        tmp = out / 'runs.tar.gz.tmp'
        with tarfile.open(tmp, 'w:gz') as t:
            for r in done:
                for f in ('results.json', 'metrics.csv', 'config.json', 'run.log'):
                    p = Path(r.out_dir) / f
                    if p.exists(): t.add(p, arcname=f"{Path(r.out_dir).name}/{f}")
        tmp.replace(out / 'runs.tar.gz')

    def stage2_runs():
        frame = ablation_frame(ablation)
        ch = choose_schedule(frame)
        print(f"[{time.time() - t0:5.0f}s] chosen on validation: {ch}", flush=True)
        (out / 'chosen.json').write_text(json.dumps(ch, indent=1))
        sched = {k: ch[k] for k in ('magma_weight', 'magma_start', 'magma_epochs')}
        return [r for r in table_runs('table2', 'mini', seeds=[1, 2], cells=[f"m-mae/{ch['col']}"], **kw) if r.row == 'm-mae'] \
            + [at_schedule(mu_mae, sched)]

    abl = {r.out_dir for r in ablation}
    while queue or running:
        for d, (r, p, ts) in list(running.items()):
            if p.poll() is None: continue
            del running[d]
            ok = r.results.exists()
            took.append(time.time() - ts)
            print(f"[{time.time() - t0:5.0f}s] {'done' if ok else 'FAILED rc=%s' % p.returncode} {Path(d).name} in {took[-1]:.0f}s", flush=True)
            if ok:
                done.append(r); pack()
                res = json.loads(r.results.read_text())
                print('        ' + '  '.join(f"{k} {res.get(k, float('nan')):.2f}" for k in
                      ('val_knn_acc', 'val_linear_acc', 'knn_acc', 'linear_acc', 'knn_acc_mean', 'images_per_sec', 'wall_seconds')), flush=True)
            else: print(Path(d, 'run.log').read_text()[-3000:], flush=True)
        if stage2 is None and not abl & set(running) and not abl & {r.out_dir for r in queue}:
            if all(r.results.exists() for r in ablation):   # stage 2 goes first; its runs leave stage 3 (same directories)
                stage2 = stage2_runs(); first = {r.out_dir for r in stage2}
                queue[:] = [r for r in stage2 if r.out_dir not in running] + [r for r in queue if r.out_dir not in first]
                print(f"[{time.time() - t0:5.0f}s] queue: {', '.join(Path(r.out_dir).name for r in queue)}", flush=True)
            else: stage2 = []; print("not every ablation run finished (failed, or not started for the budget): no schedule chosen, stage 2 skipped", flush=True)
        est = max(took) if took else 150
        while queue and len(running) < a.jobs:
            if time.time() - t0 + est > a.budget:
                queue.clear(); print(f"[{time.time() - t0:5.0f}s] budget: the rest not started", flush=True); break
            r = queue.pop(0)
            if r.results.exists(): continue
            Path(r.out_dir).mkdir(parents=True, exist_ok=True)
            params = pretrain_parameters(r, device=a.device, pretrain_params=over)
            log = open(Path(r.out_dir) / 'run.log', 'w')
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // a.jobs)), PYTHONUNBUFFERED='1')
            running[r.out_dir] = (r, subprocess.Popen([sys.executable, __file__, '--data', str(data), '--one', json.dumps(params)],
                                                      stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
            print(f"[{time.time() - t0:5.0f}s] start {Path(r.out_dir).name}", flush=True)
        time.sleep(2)
    pack()
    print(f"[{time.time() - t0:5.0f}s] finished: {len(done)} runs", flush=True)


if __name__ == '__main__':
    main()
