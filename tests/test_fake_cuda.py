"""magma's GPU path, run on a CPU-only torch under the fake-CUDA harness (tests/fake_cuda.py): for every registered
method (asked of `magma.methods.METHODS`) on 'cuda:0', nothing raises and a GPU would sync

- 0 times per loader batch (first and second batch, the resident-tensor path and the pinned-host path);
- at most once per training step (`train.train_step`: forward, loss, the non-finite guard, the optimizer, the method's
  `on_step`, the probe step; then `EpochStats.add`): the guard's read;
- at most once per evaluation (`train._probe_accuracy` over the eval loader), not once per batch;
- at most once per checkpoint finiteness check (`rundir._bad_tensors`: one host copy per device).

Backward cannot run on fake CUDA tensors (the autograd engine asks the CUDA driver for the device), so the fake step
gives the leaves zero gradients instead and the backward pass is counted on the CPU (`count_syncs`, CPU tensors counted
as if on the device): 0 syncs in every method's backward. The model is the smoke ViT at depth 2 (the blocks are
identical: a deeper one repeats the same ops) so that the file runs in about a minute on 2 busy cores.

Measured (this commit; aten ops are per region, under FakeTensorMode; 'setup' is the loader's one copy of the tensor
dataset to the device, two blocking copies, made once per loader):

| method | syncs: batch 1/2 (resident, pinned) | step | backward (CPU) | eval | checkpoint | ops: batch 2 | step 2 |
|---|---|---|---|---|---|---|---|
| byol, m-byol | 0/0, 0/0 | 1 | 0 | 1 | 1 | 1894 | 1456, 1507 |
| m-mae, mae, mu-mae, u-mae | 0/0, 0/0 | 1 | 0 | 1 | 1 | 152 | 1452, 1401, 1482, 1431 |
| m-simclr, simclr | 0/0, 0/0 | 1 | 0 | 1 | 1 | 1688 | 1089, 1038 |
| m-vicreg, vicreg | 0/0, 0/0 | 1 | 0 | 1 | 1 | 1800 | 1294, 1243 |

Before the fixes of issue 27 (measured on commit 5c30875, tests run there from /tmp): every loader batch on CUDA over
a tensor dataset raised (F1: `to_device` pinned the batch already on the GPU: "cannot pin 'CUDAByteType' ..."); with
only that patched, a SimCLR, VICReg or BYOL batch synced 40 times (F2: 32 `nonzero()` and 8 copies of the hue
constant, 2184/2122/2106 aten ops against 1688/1800/1894 now), the SimCLR loss once (F3: targets copied, so a step 2),
the VICReg loss twice (F3: boolean mask, a step 3), an evaluation of 2 batches with 2 taps 9 times (F5: a copy per
tap per batch, then three per tap), and BYOL's EMA was 474 aten ops for its 156 parameters (F4; now 5).
"""
import argparse, importlib.util, sys
from pathlib import Path

import pytest, torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_cuda import count_syncs, fake_cuda  # noqa: E402

from magma.configs import resolve_config  # noqa: E402
from magma.datasets import get_dataset  # noqa: E402
from magma.loader import eval_loader, make_loader  # noqa: E402
from magma.losses import simclr_loss, vicreg_loss  # noqa: E402
from magma.methods import METHODS  # noqa: E402
from magma import train as T  # noqa: E402
from magma import rundir as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device('cuda:0')
SIZES = dict(dataset='synthetic', img_size=16, batch_size=8, n_per_class=2, magma_layers=(0,), decoder_dim=16,
             decoder_depth=1, decoder_heads=2)
DEPTH = 2                                                           # the ViT's blocks (smoke: 12), see shallow() below
BUDGET = dict(batch=0, step=1, backward=0, eval=1, ckpt=1)          # syncs a GPU may make in each region
# aten ops measured at this commit (the table above): a region that grows past 1.5 times its count fails, so that a
# regression in launches shows (loader: the second batch, by the method's views; step: the second step)
OPS = dict(batch={'byol': 1894, 'mae': 152, 'simclr': 1688, 'vicreg': 1800},
           step={'byol': 1456, 'm-byol': 1507, 'm-mae': 1452, 'mae': 1401, 'mu-mae': 1482, 'u-mae': 1431, 'm-simclr': 1089,
                 'simclr': 1038, 'm-vicreg': 1294, 'vicreg': 1243})


def _ops_max(region, method):
    base = OPS[region].get(method, OPS[region].get(method.removeprefix('m-').removeprefix('mu-').removeprefix('u-')))
    return int(1.5 * base) if base else 10**9                       # a method registered since: syncs only
MEASURED = {}                                                       # method -> counts, for the report at the end


@pytest.fixture(autouse=True)
def shallow(monkeypatch):
    "Every method built by `train.build_parts` here has a ViT of `DEPTH` blocks (MAGMA: block 0 against the last)."
    from magma import methods
    monkeypatch.setattr(T, 'build_method', lambda cfg: methods.create(cfg.method, **{**T.method_kwargs(cfg), 'depth': DEPTH}))


def _cfg(method, device='cuda'):
    return resolve_config('smoke', method=method, device=device, **SIZES)


def _ds(): return get_dataset('synthetic', 'train', n_per_class=2, img_size=16)


def _report(fc, region): return f"{fc.syncs(region)} syncs ({fc.events(region)}), {fc.ops(region)} aten ops"


def _views_key(m): return repr(METHODS[m].views)


# one loader test per distinct set of views: the loader knows no method, only the views the registry gives it
VIEW_SETS = {}
for _m in sorted(METHODS): VIEW_SETS.setdefault(_views_key(_m), []).append(_m)


@pytest.mark.parametrize('path', ['resident', 'pinned'])
@pytest.mark.parametrize('methods', list(VIEW_SETS.values()), ids=lambda ms: '+'.join(ms))
def test_loader_batches_do_not_sync(methods, path):
    "The first and second batch of the training loader on 'cuda:0' make no host sync, on both storage paths."
    ds = _ds()
    with fake_cuda(free_memory=2**36 if path == 'resident' else 0) as fc:
        loader = make_loader(ds, 8, METHODS[methods[0]].views, DEV, seed=0, img_size=16)
        with fc.region('setup'): x, _ = loader.resident()
        assert x.is_cuda == (path == 'resident') and fc.pinned(x) == (path == 'pinned'), path
        batches = iter(loader)
        for k in (1, 2):
            with fc.region(f'batch{k}'): b = next(batches)
            assert all(v.device == DEV for v in b.get('views', [b.get('img')])) and b['label'].device == DEV
            assert fc.syncs(f'batch{k}') == BUDGET['batch'], f"{methods} {path} batch {k}: {_report(fc, f'batch{k}')}"
        assert fc.ops('batch2') <= _ops_max('batch', methods[0]), f"{methods} {path} batch 2: {_report(fc, 'batch2')}"
        for m in methods:
            MEASURED.setdefault(m, {})[f'batch_{path}'] = (fc.syncs('batch1'), fc.syncs('batch2'), fc.ops('batch2'))


@pytest.mark.parametrize('method', sorted(METHODS))
def test_step_eval_checkpoint_sync_budget(method):
    """`train_step` + `EpochStats.add` sync at most once (the guard), the online probe's evaluation at most once, the
    checkpoint's finiteness check at most once; the backward pass (on the CPU: it cannot run on fake tensors) never."""
    ds = _ds()
    with fake_cuda() as fc:
        cfg = _cfg(method)
        batch = next(iter(make_loader(ds, 8, METHODS[method].views, DEV, seed=0, img_size=16)))
        p = T.build_parts(cfg, DEV, len(ds.classes))
        if METHODS[method].uses_magma: p.model.magma_weight = 1.0
        assert next(p.model.parameters()).device == DEV
        stats = T.EpochStats()
        for i in (1, 2):
            with fc.region(f'step{i}'):
                comps, hits, labelled = T.train_step(p, batch, 1e-3, i, 100)
                stats.add(comps, hits, labelled, len(batch['label']))
            assert fc.syncs(f'step{i}') <= BUDGET['step'], f"{method} step {i}: {_report(fc, f'step{i}')}"
        assert fc.ops('step2') <= _ops_max('step', method), f"{method} step 2: {_report(fc, 'step2')}"
        assert fc.backwards == 4, f"{method}: {fc.backwards} backward calls skipped (model and probe, two steps)"
        ev = eval_loader(ds, 10, DEV, img_size=16)
        with fc.region('setup'): ev.resident()
        with fc.region('eval'):
            out = T._probe_accuracy(p.model.encoder, p.probe, ev, DEV, p.autocast, taps=T._tap_blocks(p.model))
        assert 'online_acc' in out and len(ev) == 2
        assert fc.syncs('eval') <= BUDGET['eval'], f"{method} evaluation of {len(ev)} batches: {_report(fc, 'eval')}"
        with fc.region('ckpt'):
            bad = R._bad_tensors(dict(model=p.model.state_dict(), probe=p.probe.state_dict(), opt=p.opt.state_dict()))
        assert bad == [] and fc.syncs('ckpt') <= BUDGET['ckpt'], f"{method} checkpoint check: {_report(fc, 'ckpt')}"
        counts = dict(step=fc.syncs('step2'), step_ops=fc.ops('step2'), eval=fc.syncs('eval'), ckpt=fc.syncs('ckpt'))
    # the backward pass, on the CPU, its would-be syncs counted as if the CPU were the device
    torch.manual_seed(0)
    pc = T.build_parts(_cfg(method, 'cpu'), torch.device('cpu'), len(ds.classes))
    if METHODS[method].uses_magma: pc.model.magma_weight = 1.0
    cb = next(iter(make_loader(ds, 8, METHODS[method].views, 'cpu', seed=0, img_size=16)))
    with count_syncs() as c, c.region('step'): T.train_step(pc, cb, 1e-3, 1, 100)
    assert c.ops('backward') > 100, f"{method}: the backward pass was not seen ({c.ops('backward')} ops)"
    assert c.syncs('backward') == BUDGET['backward'], f"{method} backward (CPU): {c.events('backward')}"
    assert c.syncs('step') <= BUDGET['step'], f"{method} step (CPU, counted as a device): {c.events('step')}"
    MEASURED.setdefault(method, {}).update(counts, backward=c.syncs('backward'))


def test_byol_ema_is_a_few_foreach_ops():
    "BYOL's momentum update is a few fused `_foreach_*` ops for all parameters (was 3 aten ops per parameter)."
    with fake_cuda() as fc:
        p = T.build_parts(_cfg('byol'), DEV, 10)
        n = len(list(p.model.target_encoder.parameters())) + len(list(p.model.target_projector.parameters()))
        with fc.region('ema'): p.model.on_step(1, 100)
        assert fc.syncs('ema') == 0 and fc.ops('ema') <= 8, f"EMA of {n} parameters: {_report(fc, 'ema')}"


@pytest.mark.parametrize('loss', [simclr_loss, vicreg_loss], ids=['simclr', 'vicreg'])
def test_losses_do_not_sync(loss):
    "SimCLR's targets are made on the device and VICReg's off-diagonal is a view: no copy, no boolean mask."
    with fake_cuda() as fc:
        z1, z2 = torch.randn(8, 16, device=DEV), torch.randn(8, 16, device=DEV)
        with fc.region('loss'): v = loss(z1, z2)
        assert v.device == DEV and fc.syncs('loss') == 0, _report(fc, 'loss')


def test_bench_setup_on_fake_cuda(monkeypatch):
    "bench/gpu_step_bench.py's `Bench` builds its parts and loader on 'cuda:0' and steps (imported by path)."
    monkeypatch.undo()                                             # the bench's own model (12 blocks, MAGMA at block 10)
    spec = importlib.util.spec_from_file_location('gpu_step_bench', ROOT / 'bench' / 'gpu_step_bench.py')
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    a = argparse.Namespace(img_size=16, batch_size=8, n_per_class=2, profile='smoke', method='m-mae', lam=1.0,
                           compile_backend=None, log_every=10,
                           decoders={'light': dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)})
    with fake_cuda() as fc:
        with fc.region('setup'): b = bench.Bench(dict(mode='eager', decoder='light', precision='fp32'), a, DEV)
        assert next(b.p.model.parameters()).device == DEV
        b.step()                                                   # step 0: also the log read of its losses
        with fc.region('step'): b.step()
        assert fc.syncs('step') <= 1, f"bench step: {_report(fc, 'step')}"


# ---- the harness itself
def test_harness_catches_a_planted_item():
    "A `.item()` planted in a step is counted (2 syncs: the planted one and the guard)."
    ds = _ds()
    with fake_cuda() as fc:
        batch = next(iter(make_loader(ds, 8, METHODS['mae'].views, DEV, seed=0, img_size=16)))
        p = T.build_parts(_cfg('mae'), DEV, 10)
        net = p.net
        def planted(b):
            res = net(b); res['loss'].item(); return res
        p.net = planted
        with fc.region('step'): T.train_step(p, batch, 1e-3, 0, 10)
        assert fc.syncs('step') == 2 and fc.events('step').count('item: _local_scalar_dense') == 2, _report(fc, 'step')


def test_harness_refuses_to_pin_a_gpu_tensor_as_aten_does():
    "pin_memory() of a CUDA tensor raises ATen's own error; of a CPU tensor it gives a pinned copy."
    with fake_cuda() as fc:
        g = torch.ones(3, device='cuda')
        with pytest.raises(RuntimeError, match="cannot pin 'CUDAFloatType' only dense CPU tensors can be pinned"):
            g.pin_memory()
        h = torch.ones(3).pin_memory()
        assert fc.pinned(h) and fc.pinned(h[1:]) and not fc.pinned(torch.ones(3))
        with fc.region('copy'): h.to(DEV, non_blocking=True)
        assert fc.syncs('copy') == 0


def test_harness_counts_each_kind():
    "Each kind of sync the module docstring lists is counted once where a GPU syncs, and not where it does not."
    orig = torch.cuda.is_available
    with fake_cuda() as fc:
        x, m = torch.ones(4, device='cuda'), torch.ones(4, device='cuda') > 0
        cases = {'item': lambda: float(x.sum()), 'nonzero': lambda: x.nonzero(), 'bool-index': lambda: x[m],
                 'h2d': lambda: torch.ones(3).to(DEV), 'h2d-unpinned': lambda: torch.ones(3).to(DEV, non_blocking=True),
                 'd2h': lambda: x.cpu(), 'tolist': lambda: x.tolist(), 'synchronize': torch.cuda.synchronize}
        for kind, f in cases.items():
            with fc.region(kind): f()
            assert [e.split(':')[0] for e in fc.events(kind)] == [kind], (kind, fc.events(kind))
        with fc.region('none'):
            (x * 2 + 1).sum(); x[torch.arange(2, device=DEV)]; torch.where(m, x, 0.0); torch.ones(3).nonzero()
        assert fc.syncs('none') == 0, fc.events('none')
    assert torch.cuda.is_available is orig                                      # the patches are undone on the way out


def test_zz_print_table(capsys):
    "Print the measured counts (pytest -s shows them): the rows of the module docstring's table."
    rows = []
    for m in sorted(MEASURED):
        c = MEASURED[m]; r, pn = c.get('batch_resident', ('?',) * 3), c.get('batch_pinned', ('?',) * 3)
        rows.append(f"| {m} | {r[0]}/{r[1]}, {pn[0]}/{pn[1]} | {c.get('step')} | {c.get('backward')} | {c.get('eval')} | "
                    f"{c.get('ckpt')} | {r[2]} | {c.get('step_ops')} |")
    with capsys.disabled(): print('\n' + '\n'.join(rows))
