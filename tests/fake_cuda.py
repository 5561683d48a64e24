"""A fake-CUDA harness: run magma's GPU path on a CPU-only torch and count the host-device syncs a real GPU would make.

API (stable: other tests import it)
-----------------------------------
    from fake_cuda import fake_cuda, count_syncs

    with fake_cuda(free_memory=2**36) as fc:      # torch's FakeTensorMode: tensors made for 'cuda' claim device cuda:0
        x = torch.ones(4, device='cuda')          # (no data, no CUDA); CPU tensors stay real (their values are real)
        with fc.region('step'):                   # syncs and aten ops are recorded per named region
            ...
        fc.syncs('step')      -> int              # host-device syncs a GPU would make in that region
        fc.events('step')     -> list[str]        # each sync, as 'kind: op' (kind below)
        fc.ops('step')        -> int              # aten ops called in that region (a regression in launches shows here)
        fc.backwards          -> int              # backward calls skipped (see below)

    with count_syncs() as c:                      # no fake tensors: real CPU tensors counted as if on the device, for
        ...                                       # the parts fake tensors cannot run (backward); same region API

Syncs counted (kind): 'item' (`.item()`, `bool()`, `float()`, `int()` of a device tensor: aten._local_scalar_dense),
'nonzero' (nonzero, argwhere, one-argument torch.where), 'bool-index' (indexing or index_put with a bool tensor,
masked_select), 'h2d' (a blocking CPU->device copy: `_to_copy`/`copy_` without non_blocking), 'h2d-unpinned' (a
non-blocking CPU->device copy from memory that is not pinned: CUDA stages it through the host), 'd2h' (a device->CPU
copy into unpinned memory or without non_blocking), 'tolist', 'synchronize' (torch.cuda.synchronize).

What a fake value is: a sync's result has no data behind it, so `.item()` gives True / 1 / 1.0 (a guard sees a finite
loss), `nonzero` and boolean masks select every element, `tolist` gives ones.

`pin_memory()` behaves as ATen's: a CPU tensor is copied and marked pinned (as are its views); a non-CPU tensor raises
the RuntimeError ATen raises ("cannot pin 'CUDAFloatType' only dense CPU tensors can be pinned").

Inside `fake_cuda` only: torch.cuda.is_available / device_count / current_device / is_bf16_supported / mem_get_info /
set_device / synchronize / set_sync_debug_mode / get_sync_debug_mode / manual_seed are patched (restored after);
`fc.set_device_calls` records set_device's arguments.

Autograd cannot run on fake CUDA tensors (the engine asks the CUDA driver for the device: "hasPrimaryContext expects a
valid device index"), so inside `fake_cuda` `Tensor.backward` does not run the engine: it gives every leaf that would
receive a gradient a zero gradient of its shape (so the optimizer's step runs on fake tensors) and counts the call in
`fc.backwards`. The backward pass itself is counted on the CPU with `count_syncs` (tests/test_fake_cuda.py).
"""
from __future__ import annotations
import contextlib, weakref
from collections import Counter, defaultdict

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

__all__ = ['fake_cuda', 'count_syncs', 'SyncCounter', 'pin_error']

aten = torch.ops.aten
_NONZERO = {aten.nonzero.default, aten.argwhere.default}
_INDEX = {aten.index.Tensor, aten._unsafe_index.Tensor}
_INDEX_PUT = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def pin_error(t: torch.Tensor) -> RuntimeError:
    "The error ATen's pin_memory raises for non-CPU tensor `t` (its own message, asked of ATen on a meta tensor)."
    try:
        with _disable_current_modes(): torch.empty(0, dtype=t.dtype, device='meta').pin_memory()
    except RuntimeError as e:
        return RuntimeError(str(e).replace("'Meta", f"'{t.device.type.upper()}"))
    return RuntimeError(f"cannot pin '{t.device}' tensor: only dense CPU tensors can be pinned")


def _on_device(t, cpu_as_device: bool) -> bool:
    return isinstance(t, torch.Tensor) and (t.device.type != 'cpu' or cpu_as_device)


class SyncCounter(TorchDispatchMode):
    "Records every aten op and every would-be host-device sync, per region (see the module docstring)."
    def __init__(self, cpu_as_device: bool = False, fake: bool = False):
        super().__init__()
        self.cpu_as_device, self.fake = cpu_as_device, fake
        self._ops, self._events, self.stack = Counter(), defaultdict(list), ['all']
        self._pinned = weakref.WeakValueDictionary()      # id -> tensor: pinned host tensors (and their views)
        self.backwards, self.set_device_calls = 0, []

    # -- regions
    @contextlib.contextmanager
    def region(self, name: str):
        self.stack.append(name)
        try: yield self
        finally: self.stack.pop()

    def syncs(self, region: str = 'all') -> int: return len(self._events[region])
    def events(self, region: str = 'all') -> list: return list(self._events[region])
    def ops(self, region: str = 'all') -> int: return self._ops[region]

    def sync(self, kind: str, what: str):
        for r in dict.fromkeys(self.stack): self._events[r].append(f"{kind}: {what}")

    # -- pinned memory
    def pinned(self, t) -> bool: return self._pinned.get(id(t)) is t
    def _pin(self, t):
        self._pinned[id(t)] = t
        return t

    # -- the dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for r in dict.fromkeys(self.stack): self._ops[r] += 1
        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        dev = kwargs.get('device')
        if self.fake and not any(isinstance(a, FakeTensor) for a in tensors) and (dev is None or torch.device(dev).type == 'cpu') \
                and func not in (aten._pin_memory.default, aten.is_pinned.default, aten.pin_memory.default) \
                and not kwargs.get('pin_memory'):
            with _disable_current_modes(): return self._views(func, args, func(*args, **kwargs))  # host work stays real
        name = str(func.overloadpacket.__name__)
        cad = self.cpu_as_device
        # pinned memory, as ATen has it
        if func in (aten.is_pinned.default,):
            return self.pinned(args[0]) if args[0].device.type == 'cpu' else False
        if func in (aten._pin_memory.default, aten.pin_memory.default):
            t = args[0]
            if t.device.type != 'cpu': raise pin_error(t)
            if self.pinned(t): return t
            with _disable_current_modes() if not isinstance(t, FakeTensor) else contextlib.nullcontext():
                return self._pin(t.clone())
        if kwargs.get('pin_memory') and (dev is None or torch.device(dev).type == 'cpu'):
            kw = dict(kwargs, pin_memory=False)
            with _disable_current_modes() if self.fake else contextlib.nullcontext(): return self._pin(func(*args, **kw))
        # syncs
        if func is aten._local_scalar_dense.default:       # a fake CPU tensor (a copy of a device one) has no data either
            if _on_device(args[0], cad): self.sync('item', name)
            if isinstance(args[0], FakeTensor):
                dt = args[0].dtype
                return True if dt == torch.bool else 1.0 if dt.is_floating_point or dt.is_complex else 1
        if func in _NONZERO:
            if _on_device(args[0], cad): self.sync('nonzero', name)
            if isinstance(args[0], FakeTensor):
                t = args[0]
                return torch.zeros(t.numel(), t.dim(), dtype=torch.long, device=t.device)
        if func in _INDEX or func in _INDEX_PUT:
            idx = args[1]
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in idx):
                if _on_device(args[0], cad): self.sync('bool-index', name)
                if isinstance(args[0], FakeTensor): args = (args[0], _all_true(idx), *args[2:])
        if func is aten.masked_select.default:
            if _on_device(args[0], cad): self.sync('bool-index', name)
            if isinstance(args[0], FakeTensor):
                n = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
                return torch.empty(n, dtype=args[0].dtype, device=args[0].device)
        if func is aten._to_copy.default:
            src, to = args[0], torch.device(dev) if dev is not None else args[0].device
            self._copy(src, to, kwargs.get('non_blocking', False), None, name)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            nb = args[2] if len(args) > 2 else kwargs.get('non_blocking', False)
            self._copy(src, dst.device, nb, dst, name)
        return self._views(func, args, func(*args, **kwargs))

    def _views(self, func, args, out):
        "A view of a pinned tensor is pinned (the same memory)."
        if func.is_view and args and isinstance(args[0], torch.Tensor) and self.pinned(args[0]):
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor): self._pin(o)
        return out

    def _copy(self, src, to: torch.device, non_blocking: bool, dst, name: str):
        frm = src.device
        if frm.type == 'cpu' and to.type != 'cpu':
            if not non_blocking: self.sync('h2d', f"{name} {tuple(src.shape)}")
            elif not self.pinned(src): self.sync('h2d-unpinned', f"{name} {tuple(src.shape)}")
        elif frm.type != 'cpu' and to.type == 'cpu':
            if not non_blocking or dst is None or not self.pinned(dst): self.sync('d2h', f"{name} {tuple(src.shape)}")


def _all_true(idx):
    "Boolean masks among the indices `idx` replaced by the long indices of every position (the mask all true)."
    out = []
    for i in idx:
        if i is None or i.dtype not in (torch.bool, torch.uint8): out.append(i); continue
        flat = torch.arange(i.numel(), device=i.device)
        strides = [1] * i.dim()
        for k in range(i.dim() - 2, -1, -1): strides[k] = strides[k + 1] * i.shape[k + 1]
        out += [flat // s % n for s, n in zip(strides, i.shape)]
    return out


def _fake_tolist(counter: SyncCounter, orig):
    def tolist(self):
        if _on_device(self, counter.cpu_as_device): counter.sync('tolist', f"tolist {tuple(self.shape)}")
        if not isinstance(self, FakeTensor): return orig(self)
        v = True if self.dtype == torch.bool else 1.0 if self.dtype.is_floating_point else 1
        def nest(shape): return v if not shape else [nest(shape[1:]) for _ in range(shape[0])]
        return nest(tuple(self.shape))
    return tolist


def _leaves(t: torch.Tensor) -> list:
    "The leaf tensors a backward from `t` would give a gradient (AccumulateGrad nodes of its graph)."
    seen, out, todo = set(), [], [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen: continue
        seen.add(fn)
        if hasattr(fn, 'variable'): out.append(fn.variable)
        todo += [f for f, _ in fn.next_functions]
    return out


@contextlib.contextmanager
def _patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items(): setattr(obj, k, v)
    try: yield
    finally:
        for k, v in old.items(): setattr(obj, k, v)


class _FakeMode(FakeTensorMode):
    "FakeTensorMode that never constant-folds a copy onto the device (torch.cuda.is_available is patched to True)."
    @property
    def avoid_device_init(self) -> bool: return True


@contextlib.contextmanager
def count_syncs(cpu_as_device: bool = True):
    "Count on real (CPU) tensors what would sync on a device: see the module docstring."
    c = SyncCounter(cpu_as_device=cpu_as_device)
    orig = torch.Tensor.backward
    def backward(self, *a, **k):                       # the backward pass in a region of its own, 'backward'
        with c.region('backward'): return orig(self, *a, **k)
    with _patched(torch.Tensor, tolist=_fake_tolist(c, torch.Tensor.tolist), backward=backward), c:
        yield c


@contextlib.contextmanager
def fake_cuda(free_memory: int = 2**36, total_memory: int = 2**37):
    "FakeTensorMode with 'cuda:0' tensors and a `SyncCounter` (yielded); torch.cuda patched as far as magma needs it."
    c = SyncCounter(fake=True)
    c.free_memory, c.sync_debug_mode = free_memory, 0
    orig_tolist, orig_backward = torch.Tensor.tolist, torch.Tensor.backward

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        if not isinstance(self, FakeTensor): return orig_backward(self, gradient, retain_graph, create_graph, inputs)
        c.backwards += 1
        with torch.no_grad():
            for leaf in _leaves(self):
                if leaf.grad is None: leaf.grad = torch.zeros_like(leaf)
    def set_device(d): c.set_device_calls.append(d)
    def synchronize(device=None): c.sync('synchronize', 'torch.cuda.synchronize')
    def set_mode(m): c.sync_debug_mode = m
    cuda = dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                is_bf16_supported=lambda *a, **k: True, mem_get_info=lambda device=None: (c.free_memory, total_memory),
                set_device=set_device, synchronize=synchronize, set_sync_debug_mode=set_mode,
                get_sync_debug_mode=lambda: c.sync_debug_mode, manual_seed=lambda seed: None)
    fm = _FakeMode(allow_non_fake_inputs=True)
    tolist = _fake_tolist(c, orig_tolist)
    with _patched(torch.cuda, **cuda), _patched(torch.Tensor, tolist=tolist, backward=backward), \
            _patched(FakeTensor, tolist=tolist), fm, c:
        yield c
