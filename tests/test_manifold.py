"""Heavier checks of magma.manifold that do not belong in the notebook's quick cells."""
import math
import pytest
import torch
from magma.manifold import MaxNumel, magma_loss, pairwise_sq_dists, rbf_affinity


def test_full_size_forward_backward_has_no_BxBxD_tensor():
    "B=4096, D=768 on CPU: every tensor made by any aten op, forward and backward, has at most B*B elements."
    B, D = 4096, 768
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(B, D, generator=g, requires_grad=True)
    y = torch.randn(B, D, generator=g, requires_grad=True)
    with MaxNumel() as m:
        loss = magma_loss(zr, y)
        loss.backward()
    assert m.max_numel <= B * B, f"{m.op} made a tensor of {m.max_numel} elements"
    assert m.max_numel < B * B * D // 100
    assert torch.isfinite(loss) and torch.isfinite(zr.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("B,D", [(5, 7), (32, 16), (64, 192)])
def test_float32_matches_float64_double_loop(B, D):
    "The float32 path agrees with a float64 double loop over Eq. 2 with the official kernel, on fresh inputs."
    zr, y = torch.randn(B, D) * 2, torch.randn(B, D)
    zd, yd = zr.double(), y.double()
    d = [[float(((zd[i] - zd[j]) ** 2).sum()) for j in range(B)] for i in range(B)]
    vals = [d[i][j] for i in range(B) for j in range(B) if i != j and d[i][j] > 0]
    m = sum(vals) / len(vals)
    gamma = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    W = [[0.0 if i == j else math.exp(-d[i][j] / gamma) for j in range(B)] for i in range(B)]
    Dg = [1e-4 + sum(row) for row in W]
    total = 0.0
    for i in range(B):
        total += float((yd[i] ** 2).sum())
        for j in range(B):
            total -= W[i][j] * float(yd[i] @ yd[j]) / math.sqrt(Dg[i] * Dg[j])
    assert math.isclose(float(magma_loss(zr, y)), total / B**2, rel_tol=1e-4, abs_tol=1e-6)


def test_autocast_bf16_inputs_give_float32_kernel():
    "Under bf16 autocast the kernel still runs in float32 and matches the float32 result on the same (rounded) inputs."
    zr, y = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W, gamma = rbf_affinity(zr)
        loss = magma_loss(zr, y)
    assert W.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, magma_loss(zr.float(), y.float()))


def test_degenerate_batches_are_finite_everywhere():
    for zr in [torch.zeros(16, 8), torch.ones(2, 3), torch.randn(1, 8).repeat(32, 1)]:
        zr = zr.clone().requires_grad_()
        y = torch.randn(len(zr), 4, requires_grad=True)
        for kw in [{}, {"normalized": False}, {"bandwidth": "paper"}, {"repulsive": True}]:
            loss = magma_loss(zr, y, **kw)
            gz, gy = torch.autograd.grad(loss, (zr, y))
            assert torch.isfinite(loss) and torch.isfinite(gz).all() and torch.isfinite(gy).all(), kw
    assert pairwise_sq_dists(torch.zeros(3, 2)).abs().sum() == 0
