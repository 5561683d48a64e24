"""Heavier checks of magma.manifold that do not belong in the notebook's quick cells."""
import math
import pytest
import torch
from magma.manifold import BlockTaps, MagmaLoss, MaxNumel, magma_loss, pairwise_sq_dists, rbf_affinity


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


# --- BlockTaps on magma's own encoder --------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["timm", "mae"])
def test_block_taps_equal_magma_encoder_taps(flavour):
    "magma's encoder is a timm VisionTransformer: BlockTaps gives its inline taps, on full and on masked (visible-only) inputs."
    from timm.models.vision_transformer import VisionTransformer
    from magma.backbone import create_backbone
    torch.manual_seed(0)
    enc = create_backbone('vit_tiny', flavour, img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2).double()
    assert isinstance(enc, VisionTransformer) and enc.num_prefix_tokens == 1
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(5)])
    for keep in (None, ids_keep):
        with BlockTaps(enc, (1, 2, -1)) as taps:
            _, want = enc.encode(x, taps=(1, 2, -1), ids_keep=keep)
            got = dict(taps)
        assert sorted(got) == sorted(want) == [-1, 1, 2]
        for b in want: torch.testing.assert_close(got[b], want[b], rtol=0, atol=1e-12)   # the same float64 ops


# --- MagmaLoss(gather=True) with two gloo processes -------------------------------------------------------------------

B, D, E, WORLD = 6, 5, 8, 2
CASES = [dict(), dict(normalized=False), dict(bandwidth="paper"), dict(repulsive=True)]


class _Net(torch.nn.Module):
    "Two float64 linear 'blocks' whose outputs stand in for a ViT's taps 0 and 1."
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.f0, self.f1 = torch.nn.Linear(D, E).double(), torch.nn.Linear(D, E).double()
        with torch.no_grad():
            for p in self.parameters(): p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    def forward(self, x): return {0: self.f0(x), 1: self.f1(x)}


def _batch():
    return torch.randn(WORLD * B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gather_worker(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    x = _batch()[rank * B:(rank + 1) * B]
    res = []
    for kw in CASES:
        net = _Net(); ddp = torch.nn.parallel.DistributedDataParallel(net)
        loss = MagmaLoss(pairs=[(0, 1)], gather=True, **kw)(ddp(x))
        loss.backward()                                        # DDP averages the parameter gradients over processes
        local = MagmaLoss(pairs=[(0, 1)], gather=False, **kw)(net(x)).detach()
        res.append(dict(loss=loss.detach(), grads=[p.grad.clone() for p in net.parameters()], local=local))
    try:                                                       # unequal batches: both ranks refuse, before any gather
        MagmaLoss(pairs=[(0, 1)], gather=True)(_Net()(x[:B - rank]))
        err = None
    except ValueError as e:
        err = str(e)
    torch.save(dict(cases=res, err=err), f"{out}.{rank}")
    dist.destroy_process_group()


def test_gather_equals_single_process_on_concatenated_batch():
    """Two gloo processes with MagmaLoss(gather=True) under DDP: on each rank the loss is the single-process loss of the
    concatenated batch, and the DDP-averaged gradients are its gradients; gather=False gives each rank's local loss.
    float64 throughout: the two computations differ only in summation order (row shares added by all_reduce, gradient
    contributions added by the all_gather's backward), a few ulps of sums of ~100 terms, so rtol 1e-10 holds with a wide
    margin, while the local graph differs from the global one at the 1e-1 level (checked: the test can fail)."""
    import os, tempfile
    import torch.multiprocessing as mp
    d = tempfile.mkdtemp()
    init, out = f"file://{os.path.join(d, 'store')}", os.path.join(d, 'out')
    mp.spawn(_gather_worker, args=(WORLD, init, out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    X = _batch()
    for i, kw in enumerate(CASES):
        net = _Net(); full = MagmaLoss(pairs=[(0, 1)], **kw)(net(X)); full.backward()
        want = [p.grad for p in net.parameters()]
        for r, res in enumerate(ranks):
            got = res['cases'][i]
            torch.testing.assert_close(got['loss'], full.detach(), rtol=1e-10, atol=0, msg=f"{kw} rank {r}")
            scale = max(float(b.abs().max()) for b in want)     # f0.bias's true gradient is 0 (distances ignore a shift):
            for a, b in zip(got['grads'], want):                  # its entries are rounding noise at eps x the others' size
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale, msg=f"{kw} rank {r}")
            xr = X[r * B:(r + 1) * B]
            local = MagmaLoss(pairs=[(0, 1)], **kw)(_Net()(xr)).detach()
            torch.testing.assert_close(got['local'], local, rtol=1e-12, atol=0)
            assert not torch.allclose(local, full, rtol=1e-3), kw              # local and global graphs differ
    for res in ranks:
        assert res['err'] is not None and "same batch size on every process, got [6, 5]" in res['err'], res['err']
