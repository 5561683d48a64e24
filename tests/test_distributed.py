"""Two gloo processes on CPU: the global-batch MAGMA graph and plain DDP equal a single process."""
import os, tempfile
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from magma.base import SSLMethod
from magma.manifold import magma_loss
import magma.methods

B, D, E = 6, 5, 8            # per-rank batch, input dim, feature dim
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    f1, f2 = nn.Linear(D, E), nn.Linear(D, E)
    with torch.no_grad():
        for p in list(f1.parameters()) + list(f2.parameters()): p.copy_(torch.randn(p.shape, generator=g))
    return f1, f2


def _global_worker(rank, world, init, out):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    torch.manual_seed(1); X = torch.randn(world * B, D)
    f1, f2 = _layers()
    x = X[rank * B:(rank + 1) * B]
    m = SSLMethod(magma_layers=(0,), magma_target=2, magma_weight=1.0, magma_global=True,
                  img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4)
    log = {}
    loss = m.add_magma(torch.zeros(()), {0: f1(x), 2: f2(x)}, log)
    loss.backward()
    grads = [p.grad.clone() for p in list(f1.parameters()) + list(f2.parameters())]
    for g in grads: dist.all_reduce(g); g /= world                        # what DDP does to parameter gradients
    if rank == 0: torch.save(dict(grads=grads, logged=log['magma']), out)
    dist.destroy_process_group()


def _ddp_worker(rank, world, init, out):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0); model = magma.methods.create('m-mae', **TINY)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(2); imgs = torch.randn(world * B, 3, 16, 16)
    torch.manual_seed(100 + rank)                                          # per-rank masks
    loss = ddp({'img': imgs[rank * B:(rank + 1) * B]})['loss']
    loss.backward(); opt.step()
    if rank == 0: torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


def _spawn(fn, world=2, extra=False):
    "Run `fn` in `world` gloo processes: what rank 0 saved (and, with `extra`, the folder the ranks wrote in)."
    d = tempfile.mkdtemp()
    init, out = f"file://{os.path.join(d, 'store')}", os.path.join(d, 'out.pt')
    mp.spawn(fn, args=(world, init, out), nprocs=world, join=True)
    return (torch.load(out, weights_only=True), out) if extra else torch.load(out, weights_only=True)


def test_global_batch_magma_equals_single_process_on_concatenated_batch():
    res = _spawn(_global_worker)
    torch.manual_seed(1); X = torch.randn(2 * B, D)
    f1, f2 = _layers()
    full = magma_loss(f1(X), f2(X))
    full.backward()
    want = [p.grad for p in list(f1.parameters()) + list(f2.parameters())]
    torch.testing.assert_close(res['logged'], full.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(res['grads'], want): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the local term alone (one rank's batch) is a different, smaller graph: the check can fail
    assert not torch.allclose(magma_loss(f1(X[:B]), f2(X[:B])), full)


def test_plain_ddp_one_step_equals_single_process():
    res = _spawn(_ddp_worker)
    torch.manual_seed(0); model = magma.methods.create('m-mae', **TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(2); imgs = torch.randn(2 * B, 3, 16, 16)
    losses = []
    for r in range(2):                                                     # the same per-rank masks, in one process
        torch.manual_seed(100 + r); losses.append(model({'img': imgs[r * B:(r + 1) * B]})['loss'])
    (sum(losses) / 2).backward(); opt.step()
    for k, v in model.state_dict().items(): torch.testing.assert_close(res[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _parts(model):
    "`magma.train.TrainParts` around `model` with plain SGD (an update that shows a gradient off by a factor), fp32."
    from magma.train import TrainParts
    probe = nn.Linear(TINY['embed_dim'], 3)
    return TrainParts(model, probe, torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(probe.parameters(), lr=0.1),
                      torch.amp.GradScaler('cpu', enabled=False), torch.autocast('cpu', enabled=False))


def _accum_worker(rank, world, init, out):
    "One `train_step` under DDP with accum_steps=2: each rank's B images in two micro-batches, the first under no_sync()."
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    from magma.train import train_step
    torch.manual_seed(0); p = _parts(magma.methods.create('mae', **TINY))
    p.ddp = p.net = nn.parallel.DistributedDataParallel(p.model)
    torch.manual_seed(2); imgs = torch.randn(world * B, 3, 16, 16)
    torch.manual_seed(100 + rank)                                          # per-rank masks
    train_step(p, {'img': imgs[rank * B:(rank + 1) * B], 'label': torch.zeros(B, dtype=torch.long)}, lr=0.1, step=0, total_steps=1,
               accum_steps=2)
    if rank == 0: torch.save({k: v.clone() for k, v in p.model.state_dict().items()}, out)
    dist.destroy_process_group()


def test_ddp_accumulation_equals_single_process():
    """Two processes accumulating two micro-batches each make the step of one process on the four micro-batches: for
    MAE (no MAGMA), with the same masks (on the CPU, two draws of B/2 rows of noise are one draw of B)."""
    res = _spawn(_accum_worker)
    torch.manual_seed(0); model = magma.methods.create('mae', **TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(2); imgs = torch.randn(2 * B, 3, 16, 16)
    losses = []
    for r in range(2):
        torch.manual_seed(100 + r); losses.append(model({'img': imgs[r * B:(r + 1) * B]})['loss'])
    (sum(losses) / 2).backward(); opt.step()
    for k, v in model.state_dict().items(): torch.testing.assert_close(res[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0); moved = magma.methods.create('mae', **TINY).state_dict()
    assert any(not torch.allclose(moved[k], v) for k, v in model.state_dict().items())    # the step moved the weights: the check can fail


def _train_worker(rank, world, init, out):
    """`train()` under a 2-process gloo group, set up as torchrun would, with two micro-batches per process: the global
    batch is split, the lr is scaled by the global batch, and the MAGMA graph spans the processes by default."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    from magma.train import train
    res = train(profile='smoke', method='m-mae', n_per_class=4, epochs=1, batch_size=8, accum_steps=2, lr=1e-3, device='cpu',
                out_dir=os.path.join(os.path.dirname(out), 'run'), progress=False)
    if rank == 0: torch.save(dict(batch=res.summary['batch'], magma_global=res.model.magma_global, world=res.summary['world_size']), out)
    dist.destroy_process_group()


@pytest.mark.slow(reason="about 50 s (two processes); the arithmetic itself: 09_configs' batch_arithmetic cell")
def test_global_batch_arithmetic_under_ddp():
    res = _spawn(_train_worker)
    # independent arithmetic: the global batch 8 over 2 processes in micro-batches of 2, lr 1e-3 x 8 / 256, a graph of 2 x 2
    assert res['batch'] == dict(global_batch=8, per_process_batch=4, accum_steps=2, micro_batch=2, world_size=2, base_lr=1e-3,
                                lr=1e-3 * 8 / 256, magma_graph=4)
    assert res['magma_global'] is True and res['world'] == 2
    from magma.configs import resolve_config
    from magma.train import batch_arithmetic
    one = batch_arithmetic(resolve_config('smoke', batch_size=8), 1)            # one process: the same lr, a local graph
    assert (one["per_process_batch"], one["lr"], one["magma_graph"]) == (8, 1.5e-4 * 8 / 256, 8)
    assert batch_arithmetic(resolve_config('smoke', batch_size=8, magma_global=False), 2)['magma_graph'] == 4
    with pytest.raises(ValueError, match=r"batch_size=9 \(the global batch\) is not divisible by the 2 processes"):
        batch_arithmetic(resolve_config('smoke', batch_size=9), 2)



def _rows(run):
    import csv
    with open(os.path.join(run, 'metrics.csv')) as f:
        return [(r['epoch'], r['step'], r['loss'], r['magma']) for r in csv.DictReader(f) if r['kind'] == 'step']


def _epoch_rows(run):
    "The epoch rows of a run's log, every column but the timings (the probe's online_train_acc and online_acc too)."
    import csv
    with open(os.path.join(run, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in ('images_per_sec', 'epoch_seconds')}
                for r in csv.DictReader(f) if r['kind'] == 'epoch']


def _resume_worker(rank, world, init, out):
    """Two gloo processes: a straight 2-epoch M-MAE run, and the same run stopped after epoch 0 and resumed (`resume='auto'`)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    from magma.train import train
    from magma.checkpoints import load_checkpoint
    import magma.train as T
    probes, real_row = [], T.epoch_row
    def spy(stats, p, *a, **k):                                            # this rank's probe at each epoch's end
        probes.append({n: v.detach().clone() for n, v in p.probe.state_dict().items()})
        return real_row(stats, p, *a, **k)
    T.epoch_row = spy
    d = os.path.dirname(out)
    kw = dict(profile='smoke', method='m-mae', n_per_class=4, epochs=2, batch_size=8, img_size=16, magma_start=1, log_every=1,
              device='cpu', loggers='none', progress=False)
    a = train(out_dir=os.path.join(d, 'straight'), **kw)
    train(out_dir=os.path.join(d, 'resumed'), stop_after=1, **kw)
    rng = load_checkpoint(os.path.join(d, 'resumed', 'checkpoint.safetensors'), keys=('rng',))['rng'] if rank == 0 else None
    b = train(out_dir=os.path.join(d, 'resumed'), resume='auto', **kw)
    torch.save(probes, f"{out}.probes{rank}")                             # straight epochs 0, 1; resumed 0 (stopped), 1
    if rank == 0:
        torch.save(dict(a={k: v.clone() for k, v in a.model.state_dict().items()}, b={k: v.clone() for k, v in b.model.state_dict().items()},
                        rows_a=_rows(os.path.join(d, 'straight')), rows_b=_rows(os.path.join(d, 'resumed')), rng=rng,
                        epochs_a=_epoch_rows(os.path.join(d, 'straight')),
                        epochs_b=_epoch_rows(os.path.join(d, 'resumed'))), out)
    dist.destroy_process_group()


@pytest.mark.slow(reason="about 65 s (two processes, three sittings); one process's generators: 09b_rundir's resumable-state cells")
def test_ddp_resume_restores_every_ranks_generators():
    """Under DDP each rank draws its own masks; the checkpoint holds every rank's generator state and each rank restores
    its own, so the resumed run repeats the straight run's steps (losses averaged over the ranks) and weights exactly.
    (Before, every rank restored rank 0's state, so rank 1's masks in epoch 1 changed.)"""
    res, out = _spawn(_resume_worker, extra=True)
    assert len(res['rng']) == 2 and not torch.equal(res['rng'][0], res['rng'][1])     # two ranks, two different states
    assert res['rows_a'] == res['rows_b'] and len(res['rows_a']) == 10                   # 5 steps an epoch, every one logged
    for k in res['a']: torch.testing.assert_close(res['a'][k], res['b'][k], rtol=0, atol=0, msg=k)
    # the online probe (issue 31, N58/N59): its gradient is averaged over the ranks, so both ranks hold one probe,
    # the one rank 0 checkpoints; the resumed run's epoch rows (online_train_acc, online_acc) and probes are the
    # straight run's.
    # Before, each rank trained its own probe and the resume gave rank 1 rank 0's: its epoch-1 probe differed.
    assert res['epochs_a'] == res['epochs_b'] and len(res['epochs_a']) == 2 and 'online_train_acc' in res['epochs_a'][0]
    probes = [torch.load(f"{out}.probes{r}", weights_only=True) for r in range(2)]
    assert all(len(p) == 4 for p in probes)
    for r in range(2):
        for k in probes[r][1]:
            same = dict(rtol=0, atol=0, msg=f"rank {r} {k}")
            torch.testing.assert_close(probes[r][3][k], probes[r][1][k], **same)      # resumed == straight
            torch.testing.assert_close(probes[r][1][k], probes[0][1][k], **same)      # the ranks agree
    assert not torch.equal(probes[0][0]['weight'], probes[0][1]['weight'])     # the probe trained: the checks can fail
