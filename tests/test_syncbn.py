"""Two gloo processes on CPU: VICReg with its projector's BatchNorm synchronized (`model.sync_batchnorm()`) under DDP
equals one process on the concatenated batch with plain BatchNorm1d; without the conversion it does not."""
import functools, os, sys, tempfile
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from magma.base import gather
import magma.methods

B = 6                        # per-rank batch
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, proj_hidden_dim=24, proj_output_dim=16)
# the module the VICReg notebook exports to (magma.ssl.vicreg)
VICREG = sys.modules[type(magma.methods.create('vicreg', **TINY)).__module__]


def _views(world):
    torch.manual_seed(2)
    return [torch.randn(world * B, 3, 16, 16), torch.randn(world * B, 3, 16, 16) * 2 + 0.5]


def _step(model, net, views):
    "One forward/backward of `net` on `views`; the projector's outputs (one per view), the loss, gradients and buffers."
    outs = []
    hook = model.projector.register_forward_hook(lambda mod, inp, o: outs.append(o.detach()))
    res = net({'views': views}); res['loss'].backward(); hook.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return dict(z=outs, loss=res['loss'].detach(), grads=grads, bufs={k: v.clone() for k, v in model.named_buffers()})


def _worker(rank, world, init, out, sync):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0); model = magma.methods.create('vicreg', **TINY)
    if sync: assert model.sync_batchnorm() is model                     # what the trainer does before DDP
    bn_types = [type(m).__name__ for m in model.projector if 'BatchNorm' in type(m).__name__]
    net = nn.parallel.DistributedDataParallel(model)                   # averages parameter gradients over the ranks
    res = _step(model, net, [v[rank * B:(rank + 1) * B] for v in _views(world)])
    with torch.no_grad(): res['z'] = [gather(z) for z in res['z']]    # all ranks' rows, in rank order
    if rank == 0: torch.save(dict(res, bn_types=bn_types), out)
    dist.destroy_process_group()


def _spawn(fn, world=2, **kw):
    d = tempfile.mkdtemp()
    init, out = f"file://{os.path.join(d, 'store')}", os.path.join(d, 'out.pt')
    mp.spawn(functools.partial(fn, **kw) if kw else fn, args=(world, init, out), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def _single():
    "The reference: one process, plain BatchNorm1d, the concatenated batch."
    torch.manual_seed(0); model = magma.methods.create('vicreg', **TINY)
    assert model.sync_batchnorm() is model and type(model.projector[1]) is nn.BatchNorm1d   # no process group: a no-op
    return _step(model, model, _views(2))


def _close(a, b, rel=3e-5, atol=2e-5):
    "Equal up to float32 summation order, on the scale of the tensor: the largest difference against the largest entry."
    return a.shape == b.shape and float((a - b).abs().max()) <= rel * float(b.abs().max()) + atol


def test_synced_projector_equals_single_process_on_concatenated_batch():
    res, ref = _spawn(_worker, sync=True), _single()
    assert res['bn_types'] == ['GatherBatchNorm1d'] * 2                 # CPU: our BatchNorm, not nn.SyncBatchNorm
    for a, b in zip(res['z'], ref['z'], strict=True): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res['loss'], ref['loss'], rtol=1e-5, atol=1e-6)
    assert res['grads'].keys() == ref['grads'].keys()
    assert any(k.startswith('projector.1.') for k in ref['grads'])     # the BatchNorm's own parameters are compared too
    bad = [k for k, v in ref['grads'].items() if not _close(res['grads'][k], v)]
    assert not bad, f"gradients differ: {bad}"
    for k, v in ref['bufs'].items(): torch.testing.assert_close(res['bufs'][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert int(res['bufs']['projector.1.num_batches_tracked']) == 2     # one update per view, as in one process


def test_unsynced_projector_differs():
    "Plain BatchNorm1d per process normalizes each half batch on its own: the same check fails, so the one above can fail."
    res, ref = _spawn(_worker, sync=False), _single()
    assert res['bn_types'] == ['BatchNorm1d'] * 2
    assert not _close(res['z'][0], ref['z'][0]) and not _close(res['z'][1], ref['z'][1])
    assert not _close(res['grads']['projector.0.weight'], ref['grads']['projector.0.weight'])
    assert not _close(res['grads']['projector.1.weight'], ref['grads']['projector.1.weight'])
    assert not _close(res['bufs']['projector.1.running_var'], ref['bufs']['projector.1.running_var'])


def test_conversion_keeps_checkpoints_loadable():
    "The converted projector has BatchNorm1d's state-dict names: a checkpoint saved either way loads into the other."
    torch.manual_seed(0); plain = magma.methods.create('vicreg', **TINY)
    torch.manual_seed(1); synced = magma.methods.create('vicreg', **TINY)
    synced.projector = VICREG.convert_sync_batchnorm(synced.projector, cuda=False)
    assert isinstance(synced.projector[4], VICREG.GatherBatchNorm1d)
    synced.load_state_dict(plain.state_dict())
    for k, v in plain.state_dict().items(): assert torch.equal(synced.state_dict()[k], v), k
