"""The GPU checks: pytest only, every test skipped without CUDA. `make gpu-check` (bench/gpu_check.py) runs them first.

- a compiled and a reduce-overhead (CUDA graphs) `train_step` against the eager one, both against float64;
- the MAGMA kernel in float32 under bf16 autocast, and a bf16 step's loss, against float64;
- a run stopped after epoch 0 and resumed repeats the straight run's step rows (the checkpoint holds the CUDA generator);
- no host-device sync in any method's loader batch, eval batch, `train_step` or `EpochStats.add`, except the non-finite
  guard's one read per step (`at_guard`);
- the checks the notebooks' former `#| cuda` cells made: SyncBatchNorm on a CUDA VICReg (06_vicreg), the augmentation
  on CUDA equal to the CPU's (08a_augment), the loader's resident copy and its batches equal to the CPU's (08b_loader).

Tolerances come from the arithmetic: U32 = 2**-24 and U16 = 2**-8 are the unit roundoffs of float32 and bfloat16.
Each test says how its bound follows from them.
"""
import copy, csv, traceback, warnings
from pathlib import Path
from unittest import mock

import pytest, torch

import magma, magma.train as T
from magma.augment import TensorAugment, ViewAug
from magma.checkpoints import load_checkpoint
from magma.configs import resolve_config
from magma.datasets import STATS, get_dataset, make_synthetic
from magma.loader import eval_loader, make_loader
from magma.manifold import magma_loss
from magma.methods import METHODS, create

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU check)")
DEV = torch.device('cuda')
U32, U16 = 2.0 ** -24, 2.0 ** -8
PKG = str(Path(magma.__file__).resolve().parent)                         # frames of magma's own code start with this


def _mine(stack) -> list:
    return [f for f in stack if str(Path(f.filename).resolve()).startswith(PKG + '/')]
TINY = dict(embed_dim=64, depth=3, num_heads=4, magma_layers=(1,), magma_target=-1)   # a small encoder: cheap compiles
SIZES = dict(img_size=16, batch_size=8, n_per_class=4, decoder_dim=32, decoder_depth=1, decoder_heads=4, loggers='none')


class Syncs:
    """The host-device synchronisations CUDA reports inside the block (`torch.cuda.set_sync_debug_mode('warn')`), each
    with the Python stack that made it."""
    def __enter__(self):
        torch.cuda.synchronize()
        self.found, self._cw = [], warnings.catch_warnings()
        self._cw.__enter__(); warnings.simplefilter('always')
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode('warn')
        return self

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if 'synchroniz' in str(message): self.found.append(traceback.extract_stack()[:-1])

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode('default')
        self._cw.__exit__(*exc)

    def where(self) -> list[str]:
        "Each sync as the innermost magma frame (file:line: code), else the innermost frame."
        out = []
        for st in self.found:
            mine = _mine(st) or st
            out.append(f"{Path(mine[-1].filename).name}:{mine[-1].lineno}: {mine[-1].line}")
        return out


class NoSyncs:
    "A block in which any host-device sync raises (`set_sync_debug_mode('error')`): the second, independent check."
    def __enter__(self): torch.cuda.synchronize(); torch.cuda.set_sync_debug_mode('error')
    def __exit__(self, *exc): torch.cuda.set_sync_debug_mode('default')


def at_guard(stack) -> bool:
    """Whether a sync comes from the trainer's non-finite guard: the innermost magma frame is in magma/train.py, on the
    guard's line (`if not torch.isfinite(...)`: the one host read a step is allowed)."""
    mine = _mine(stack)
    return bool(mine) and str(Path(mine[-1].filename).resolve()) == PKG + '/train.py' and 'finite' in (mine[-1].line or '')


def cfg_of(method: str, **kw):
    return resolve_config('smoke', method=method, dataset='synthetic', device='cuda', **{**SIZES, **kw})


def parts_of(cfg, encoder: dict | None = None):
    "The trainer's parts for `cfg` (seeded: equal on every call), with the small encoder `encoder` if given."
    if not encoder: return T.build_parts(cfg, DEV, 10)
    with mock.patch.object(T, 'build_method', lambda c: create(c.method, **{**T.method_kwargs(c), **encoder})):
        return T.build_parts(cfg, DEV, 10)


def fixed_masks(model, batch_size: int):
    "MAE's masking patched to one fixed draw, so that eager, compiled and float64 steps see the same masks."
    from magma.patches import random_masking
    fixed = random_masking(batch_size, model.encoder.num_patches, model.mask_ratio, DEV)
    return mock.patch('magma.ssl.mae.random_masking', lambda *a, **k: fixed)


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None])


def rel(a, b) -> float: return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- compiled and graphed against eager, against float64
@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_step_matches_eager(mode):
    """M-MAE (MAE + the MAGMA term) `train_step` with the method in `torch.compile` (mode 'reduce-overhead': CUDA graphs
    via compile's trees, recorded on a later call, so three steps are taken) against the eager step, in IEEE fp32, on one
    fixed batch and mask, lr = 0 (the weights stay put: every step is the same computation). Both are compared with a
    float64 copy: compiled code fuses and reorders the same fp32 arithmetic, so its error against float64 must be of
    the eager step's order: at most 4x the eager error plus 64 U32 (a floor for an eager error that is zero by chance),
    for the loss and for all gradients together; the eager error itself must be a float32 one (< 1e-4: TF32 would give
    ~1e-3)."""
    cfg = cfg_of('m-mae', precision='fp32')
    pe, pc = parts_of(cfg, TINY), parts_of(cfg, TINY)
    ref = copy.deepcopy(pe.model).double()
    pc.net = torch.compile(pc.model, **({} if mode == 'default' else dict(mode=mode)))
    g = torch.Generator(device=DEV).manual_seed(0)
    batch = dict(img=torch.randn(8, 3, 16, 16, device=DEV, generator=g), label=torch.randint(0, 10, (8,), device=DEV, generator=g))
    with fixed_masks(pe.model, 8), T.precision_flags('fp32', DEV):
        out = ref(dict(batch, img=batch['img'].double())); out['loss'].backward()
        loss_ref, g_ref = out['loss'].detach(), grads(ref)
        for step in range(3):
            res = {}
            for name, p in (('eager', pe), ('compiled', pc)):
                comps = T.train_step(p, batch, 0.0, step, 10)[0]
                res[name] = (comps['loss'].double().clone(), grads(p.model))
            (le, ge), (lc, gc) = res['eager'], res['compiled']
            e_loss, c_loss = abs(float(le - loss_ref)), abs(float(lc - loss_ref))
            e_g, c_g = rel(ge, g_ref), rel(gc, g_ref)
            msg = f"{mode} step {step}: loss error eager {e_loss:.2e} compiled {c_loss:.2e}; gradient error eager {e_g:.2e} compiled {c_g:.2e}"
            assert e_loss <= 1e-4 * abs(float(loss_ref)) and e_g < 1e-4, msg
            assert c_loss <= 4 * e_loss + 64 * U32 * abs(float(loss_ref)), msg
            assert c_g <= 4 * e_g + 64 * U32, msg


# ---------------------------------------------------------------- bf16 against float64
def test_magma_kernel_is_float32_under_bf16_autocast():
    """Under bf16 autocast the MAGMA term runs in float32 on bf16 features: it equals the float64 value of the same
    (bf16-representable) inputs to float32 accuracy, within 1e-5 of its scale 2 sum(y^2) / B^2 (the trace's two terms
    are each below it). float32 arithmetic errs by ~U32 sqrt(D) in each distance (~1e-6 relative); on these features
    the error measured 2e-9 of the scale on a CPU, and 8e-4 with the kernel forced to bf16 (U16 on the sum of squares):
    the bound sits between them."""
    g = torch.Generator(device=DEV).manual_seed(1)
    z_ref = torch.randn(128, 192, device=DEV, generator=g).bfloat16()
    z_t = (z_ref.float() + 0.5 * torch.randn(128, 192, device=DEV, generator=g)).bfloat16()
    with T.precision_flags('bf16', DEV), torch.autocast('cuda', dtype=torch.bfloat16):
        got = magma_loss(z_ref, z_t)
    want = magma_loss(z_ref.double(), z_t.double())
    assert got.dtype == torch.float32
    scale = 2 * float(z_t.double().pow(2).sum()) / 128 ** 2      # the trace's two terms are each at most this
    assert abs(float(got) - float(want)) <= 1e-5 * scale, (float(got), float(want), scale)


def test_bf16_step_loss_against_float64():
    """An M-MAE step under bf16 autocast (the paper profile's precision on CUDA) against the same step in float64 (same
    weights, batch and mask): the loss agrees within 16 U16 relative. Bound: autocast rounds each matmul's inputs to
    bf16 (relative error U16 each, accumulated in fp32); the loss is a mean of squares of the decoder's output minus the
    target, about eight bf16 matmuls deep with residual paths: a few U16 of relative error, 16 U16 (6%) is the margin.
    The MAGMA part is float32 (the test above), and the step is really bf16: its loss differs from float64 by more than
    float32 would (16 U32)."""
    cfg = cfg_of('m-mae', precision='bf16')
    p = parts_of(cfg, TINY)
    ref = copy.deepcopy(p.model).double()
    g = torch.Generator(device=DEV).manual_seed(2)
    batch = dict(img=torch.randn(8, 3, 16, 16, device=DEV, generator=g), label=torch.randint(0, 10, (8,), device=DEV, generator=g))
    with fixed_masks(p.model, 8), T.precision_flags('bf16', DEV):
        comps = T.train_step(p, batch, 0.0, 0, 10)[0]
        want = ref(dict(batch, img=batch['img'].double()))
    err = abs(float(comps['loss']) - float(want['loss'].detach())) / abs(float(want['loss'].detach()))
    assert p.autocast.fast_dtype == torch.bfloat16 and p.autocast._enabled
    assert 16 * U32 < err <= 16 * U16, (float(comps['loss']), float(want['loss']), err)
    assert abs(float(comps['magma']) - float(want['magma'])) <= 16 * U16 * abs(float(want['magma'])) + 1e-6


# ---------------------------------------------------------------- stop and resume on CUDA (10_train's #| cuda cell)
def test_stop_and_resume_repeats_the_straight_run(tmp_path):
    """M-MAE on CUDA, 2 epochs: a run stopped after epoch 0 and resumed logs the straight run's step rows. On CUDA the
    masks come from the CUDA generator, whose state the checkpoint holds (one per process). Losses are compared to
    1e-5 relative (~100 U32: kernels may sum in another order between the two runs; a wrong mask or weight moves the
    loss by ~1e-2); epochs and steps exactly."""
    cu = dict(method='m-mae', n_per_class=8, batch_size=16, magma_start=1, epochs=2, log_every=1, device='cuda', resume='auto',
              loggers='none')
    def rows(d): return [r for r in csv.DictReader(open(d / 'metrics.csv')) if r['kind'] == 'step']
    T.train(resolve_config('smoke', out_dir=str(tmp_path / 'a'), **cu), progress=False)
    T.train(resolve_config('smoke', out_dir=str(tmp_path / 'b'), **cu), stop_after=1, progress=False)
    assert len(load_checkpoint(tmp_path / 'b' / 'checkpoint.safetensors', keys=('cuda_rng',))['cuda_rng']) == 1
    T.train(resolve_config('smoke', out_dir=str(tmp_path / 'b'), **cu), progress=False)
    a, b = rows(tmp_path / 'a'), rows(tmp_path / 'b')
    assert len(a) == len(b) > 4 and [(r['epoch'], r['step']) for r in a] == [(r['epoch'], r['step']) for r in b]
    for x, y in zip(a, b):
        for k in ('loss', 'magma'):
            assert abs(float(x[k]) - float(y[k])) <= 1e-5 * abs(float(x[k])) + 1e-30, (k, x, y)


# ---------------------------------------------------------------- no host sync but the guard's
@pytest.mark.parametrize('method', sorted(METHODS))
def test_no_sync_but_the_guard(method):
    """Every method on CUDA: its loader's batches and the eval loader's batch make no host-device sync; `train_step`
    makes at most one, at the non-finite guard (`at_guard`); `EpochStats.add` none. The dataset's one copy to the GPU
    (`Loader.resident`) and the first step (cuBLAS handles, optimizer state) come before; steps 1 and 2 are checked."""
    cfg = cfg_of(method, precision='fp32')
    ds = get_dataset('synthetic', 'train', n_per_class=4, img_size=16)
    loader = make_loader(ds, 8, METHODS[method].views, DEV, seed=0, img_size=16)
    ev = eval_loader(ds, 16, DEV, img_size=16)
    loader.resident(); ev.resident()
    p, stats, batches = parts_of(cfg), T.EpochStats(), iter(loader)
    with T.precision_flags('fp32', DEV):
        T.train_step(p, next(batches), 1e-4, 0, 10)
        for step in (1, 2):
            with Syncs() as s: b = next(batches)
            assert not s.found, f"{method}: loader batch {step} synced at {s.where()}"
            with Syncs() as s: comps, hits, labelled = T.train_step(p, b, 1e-4, step, 10)
            bad = [w for st, w in zip(s.found, s.where()) if not at_guard(st)]
            assert not bad and len(s.found) <= 1, f"{method}: train_step {step} synced {len(s.found)} times: {s.where()}"
            with Syncs() as s: stats.add(comps, hits, labelled, len(b['label']))
            assert not s.found, f"{method}: EpochStats.add synced at {s.where()}"
        with Syncs() as s: e = next(iter(ev))
        assert not s.found and e['img'].is_cuda, f"{method}: eval batch synced at {s.where()}"
        with NoSyncs(): next(batches), next(iter(ev))                # the same, with syncs raising


def test_sync_recorder_catches_a_planted_sync():
    """The recorders themselves: a planted `.item()` is found (once, with its line, not taken for the guard) and raises
    under `NoSyncs`; a clean block records none; only the guard's line in magma/train.py is the guard."""
    x = torch.ones(3, device=DEV)
    with Syncs() as s: y = x * 2
    assert not s.found
    with Syncs() as s: (y.sum() > 0).item()
    assert len(s.found) == 1 and not at_guard(s.found[0]) and 'item()' in s.where()[0], s.where()
    with pytest.raises(RuntimeError, match='synchroniz'):
        with NoSyncs(): (y.sum() > 0).item()
    def guard_like(t):
        if not torch.isfinite(t): pass                                   # a line with 'finite', but outside magma/train.py
    with Syncs() as s: guard_like(y.sum())
    assert len(s.found) == 1 and not at_guard(s.found[0])


# ---------------------------------------------------------------- the notebooks' former #| cuda cells
def test_vicreg_converts_to_syncbatchnorm_on_cuda_and_steps():
    "06_vicreg: a VICReg on CUDA is converted to nn.SyncBatchNorm (in place, two layers), and a step's loss and grads are finite, on CUDA."
    from magma.ssl.vicreg import GatherBatchNorm1d, convert_sync_batchnorm
    m = create('vicreg', img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, proj_hidden_dim=64, proj_output_dim=32,
               magma_layers=(1,), magma_target=-1).to(DEV)
    assert convert_sync_batchnorm(m.projector) is m.projector
    assert sum(isinstance(l, torch.nn.SyncBatchNorm) for l in m.projector) == 2
    assert not any(isinstance(l, GatherBatchNorm1d) for l in m.projector)
    out = m({'views': [torch.randn(16, 3, 16, 16, device=DEV) for _ in range(2)]}); out['loss'].backward()
    assert torch.isfinite(out['loss']).item() and m.projector[1].weight.grad.is_cuda
    assert all(torch.isfinite(q.grad).all() for q in m.parameters() if q.grad is not None)


_ONE = (ViewAug(),)
_TWO = (ViewAug(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5),) * 2
_ASYM = (ViewAug(jitter_p=0.8, gray_p=0.2, blur_p=1.0), ViewAug(jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2))
# CPU against CUDA, in IEEE fp32 as a run has it (precision_flags: cuDNN's TF32 off for the blur's convolution): the
# same draws (made on the CPU) and the same float32 arithmetic in another order, ~20 ops deep on values within
# [0, 1], then divided by the std (>= 0.2): errors of a few U32 x 5; 1e-4 (~1,600 U32 at 1) leaves a wide margin and
# still catches a wrong op, draw or order (errors of 1e-2 and more).
ATOL = 1e-4


def _stack(o): return torch.stack(list(o) if isinstance(o, tuple) else [o])


def test_augment_on_cuda_equals_cpu_and_never_syncs():
    "08a_augment: TensorAugment on CUDA gives the CPU's views for the same generator, and makes no host sync."
    x = make_synthetic(16, seed=0)[0]
    with T.precision_flags('fp32', DEV):
        for views in (_ONE, _TWO, _ASYM):
            a = TensorAugment(views, 32, *STATS['synthetic'])
            cpu, gpu = a(x, torch.Generator().manual_seed(0)), a(x.to(DEV), torch.Generator().manual_seed(0))
            torch.testing.assert_close(_stack(gpu).cpu(), _stack(cpu), rtol=0, atol=ATOL)
        xg = x.to(DEV)
        for views in (_ONE, _TWO, _ASYM):
            a = TensorAugment(views, 32, *STATS['synthetic']); a.stats(DEV)        # mean and std: copied once per device
            with Syncs() as s: a(xg, torch.Generator().manual_seed(1))
            assert not s.found, f"{views}: augmentation synced at {s.where()}"
            with NoSyncs(): a(xg, torch.Generator().manual_seed(2))


def test_loader_on_cuda_equals_cpu_copies_once_and_never_syncs():
    "08b_loader: the tensor path on CUDA copies the dataset once, yields the CPU's batches, and a whole epoch makes no sync."
    ds = get_dataset('synthetic', n_per_class=10)
    cpu = list(make_loader(ds, 16, _TWO, seed=3))
    gl = make_loader(ds, 16, _TWO, 'cuda', seed=3)
    assert gl.resident()[0].is_cuda and gl.resident()[0] is gl.resident()[0]
    with T.precision_flags('fp32', DEV):
        with Syncs() as s: gb = list(gl)
        assert not s.found, f"the loader synced at {s.where()}"
        with NoSyncs(): list(gl)
        assert len(gb) == len(cpu) == 6
        for a, b in zip(cpu, gb):
            assert torch.equal(a['index'], b['index']) and torch.equal(a['label'], b['label'].cpu())
            for v in (0, 1): torch.testing.assert_close(b['views'][v].cpu(), a['views'][v], rtol=0, atol=ATOL)
