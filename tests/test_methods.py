"""Heavier checks of magma.losses / magma.methods: agreement with lightly (a dev-only dependency) and the
cross-process gather under torch.distributed (two CPU processes, gloo)."""
import os, socket
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from magma.losses import simclr_loss, vicreg_loss
from magma.base import gather

lightly_loss = pytest.importorskip("lightly.loss")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simclr_matches_lightly(seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    ref = lightly_loss.NTXentLoss(temperature=0.2)(z1, z2)
    assert torch.allclose(simclr_loss(z1, z2, 0.2), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vicreg_matches_lightly_with_half_var_weight(seed):
    g = torch.Generator().manual_seed(seed)
    # small scale so the variance hinge is active (std < 1)
    z1, z2 = 0.3 * torch.randn(32, 24, generator=g), 0.3 * torch.randn(32, 24, generator=g)
    ref = lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)(z1, z2)
    ours = vicreg_loss(z1, z2, sim_weight=25.0, var_weight=12.5, cov_weight=1.0)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    # and solo-learn's default (25) differs from lightly's by exactly half the variance sum
    assert not torch.allclose(vicreg_loss(z1, z2), ref, atol=1e-3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _worker(rank, world, port, z1, z2, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    ga, gb = gather(a), gather(b)
    loss = simclr_loss(ga, gb, 0.2)
    loss.backward()
    q.put((rank, ga.shape[0], loss.item(), a.grad.clone()))
    dist.barrier(); dist.destroy_process_group()


def test_gather_with_gradient_two_processes():
    "Two processes: each sees the global batch's loss, and gradients flow back through all_gather."
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    port = _free_port()
    ps = [ctx.Process(target=_worker, args=(r, 2, port, z1, z2, q)) for r in range(2)]
    for p in ps: p.start()
    res = sorted(q.get(timeout=120) for _ in ps)
    for p in ps: p.join(timeout=60)
    full1, full2 = z1.clone().requires_grad_(True), z2.clone()
    ref = simclr_loss(full1, full2, 0.2); ref.backward()
    for rank, n, loss, grad in res:
        assert n == 8 and abs(loss - ref.item()) < 1e-5
        # all_gather's backward sums the ranks' gradients: 2 ranks x the same global loss
        assert torch.allclose(grad, 2 * full1.grad[rank * 4:(rank + 1) * 4], atol=1e-5)


@pytest.mark.parametrize("method,key,value", [("simclr", "proj_hidden_dim", 0), ("simclr", "proj_hidden_dim", -5),
                                              ("m-vicreg", "proj_output_dim", 0), ("byol", "final_tau", 1.5)])
def test_method_keys_range_checked(method, key, value):
    "Issue 22, item 11: a method's own key out of range fails where the method is built, one line naming it (was: accepted, or a raw torch error)."
    from magma.methods import create
    with pytest.raises(ValueError) as e:
        create(method, img_size=16, patch_size=4, **{key: value})
    assert f"{key}={value!r}: must be" in str(e.value) and "\n" not in str(e.value)
