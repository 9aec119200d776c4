"""Test helper: run code with `device="meta"` as a stand-in for an accelerator on a CPU-only machine.

torch's `meta` device holds shapes and dtypes but no data, and refuses to mix with CPU tensors in one op with the
same error CUDA gives ("Tensor on device cpu is not on the expected device meta!"). Plain meta tensors cannot
be read back, so on their own they stop any loop at its first `.item()`. `MetaDevice` is a TorchDispatchMode that
lets such code run to the end and records every place where a real accelerator would make the host wait:

- a read of a device value on the host (`.item()`, `float()`, `bool()`, `.tolist()`, `.cpu()`, `.numpy()` after
  `.cpu()`): recorded as "d2h"/"item"; the value comes from the CPU tensor the meta tensor was copied from
  (its *shadow*) when there is one, else zeros;
- a blocking copy from the host to the device (`.to(device)` without `non_blocking=True`): "h2d" (CUDA
  synchronises the stream after such a copy);
- an op whose output size depends on device values (`nonzero`, boolean indexing, `bincount`, `unique`, ...):
  "data-dependent", computed on the CPU from shadows;
- an op that takes both a device tensor and a CPU tensor with more than one element and succeeds (CUDA copies
  the CPU index to the device first, blocking): "implicit h2d".

Integer and boolean results (labels, indices, masks) keep their values: an op with a shadowed meta input is also
computed on the shadows (zeros for the inputs without one), so labels indexed, compared or counted on the device
still hold the real values when they come back (floating results, the models' activations, are not: that would
run every model twice). An in-place op drops the shadows of the tensors it writes.

Every record keeps the calling function's name so a failing test says where the synchronisation sits.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
META = torch.device("meta")


def _meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _caller() -> str:
    """The innermost frame outside torch and this helper: where the synchronising call was written."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and not name.endswith("meta_device.py"):
            return f"{frame.f_code.co_name} ({name.rsplit('/', 1)[-1]}:{frame.f_lineno})"
        frame = frame.f_back
    return "?"


class MetaDevice(TorchDispatchMode):
    """Within the block, meta tensors behave like accelerator tensors whose reads are counted (see module doc)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []   # (kind, where)
        self.shadows = WeakIdKeyDictionary()      # meta tensor -> the CPU tensor it was copied from

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _sync(self, kind: str) -> None:
        self.syncs.append((kind, _caller()))

    def _value(self, t: torch.Tensor) -> torch.Tensor:
        """The CPU stand-in of meta tensor `t`: its shadow, else zeros of its shape (True for booleans, so a
        finiteness or emptiness test takes its usual branch)."""
        shadow = self.shadows.get(t)
        if shadow is not None and shadow.shape == t.shape:
            return shadow.to(t.dtype)
        return torch.ones(t.shape, dtype=t.dtype) if t.dtype == torch.bool else torch.zeros(t.shape, dtype=t.dtype)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for k, _ in self.syncs if kind is None or k == kind)

    def where(self) -> list[str]:
        return [f"{k}: {w}" for k, w in self.syncs]

    # ----------------------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is aten._to_copy.default:
            return self._to_copy(func, args, kwargs)
        if func is aten.copy_.default:
            return self._copy(func, args, kwargs)
        if not any(_meta(t) for t in tensors):
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self._sync("item")
            return self._value(args[0]).item()
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            if "same device" in str(error) or "expected device" in str(error) or "Expected all tensors" in str(error):
                raise
            # No meta kernel, or a data-dependent output size: what a GPU computes only after a synchronisation.
            self._sync(f"data-dependent {func.overloadpacket.__name__}")
            cpu_args, cpu_kwargs = tree_map(lambda t: self._value(t) if _meta(t) else t, (args, kwargs))
            result = func(*cpu_args, **cpu_kwargs)
            return tree_map(self._to_meta, result)
        if any(_host(t) and t.numel() > 1 for t in tensors):
            self._sync(f"implicit h2d in {func.overloadpacket.__name__}")
        self._follow(func, args, kwargs, tensors, out)
        return out

    def _follow(self, func, args, kwargs, tensors, out) -> None:
        """Give integer and boolean outputs shadows computed from their inputs' shadows (see the module doc)."""
        if func._schema.is_mutable:
            for t in tensors:
                if _meta(t):
                    self.shadows.pop(t, None)
            return
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outputs or any(t.is_floating_point() or t.is_complex() for t in outputs):
            return
        if not any(t in self.shadows for t in tensors if _meta(t)):
            return
        # Inputs without a shadow (a model's predictions) count as zeros.
        cpu_args, cpu_kwargs = tree_map(lambda t: self._value(t) if _meta(t) else t, (args, kwargs))
        try:
            cpu_out = func(*cpu_args, **cpu_kwargs)
        except (RuntimeError, IndexError, ValueError, NotImplementedError):
            return
        for meta_t, cpu_t in zip(outputs, [t for t in tree_leaves(cpu_out) if isinstance(t, torch.Tensor)],
                                 strict=False):
            if meta_t.shape == cpu_t.shape:
                self.shadows[meta_t] = cpu_t

    def _to_meta(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        out = t.to(META)
        self.shadows[out] = t
        return out

    def _to_copy(self, func, args, kwargs):
        src = args[0]
        target = kwargs.get("device")
        target = torch.device(target) if target is not None else src.device
        if _meta(src) and target.type == "cpu":
            self._sync("d2h")
            return self._value(src).to(kwargs.get("dtype") or src.dtype)
        out = func(*args, **kwargs)
        if _host(src) and target.type == "meta":
            if not kwargs.get("non_blocking", False):
                self._sync("h2d")
            self.shadows[out] = src.to(kwargs.get("dtype") or src.dtype)
        elif _meta(src) and src in self.shadows and target.type == "meta":
            self.shadows[out] = self.shadows[src].to(kwargs.get("dtype") or src.dtype)
        return out

    def _copy(self, func, args, kwargs):
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if _meta(src) and _host(dst):
            self._sync("d2h")
            return dst.copy_(self._value(src))
        if _host(src) and _meta(dst):
            if not non_blocking and src.numel() > 1:   # a 0-dim CPU value is a scalar argument, not a copy
                self._sync("h2d")
            out = func(*args, **kwargs)
            self.shadows[dst] = src.detach().clone().to(dst.dtype).expand(dst.shape).clone()
            return out
        return func(*args, **kwargs)


@contextmanager
def meta_device():
    """`with meta_device() as mode:` run code with device="meta"; `mode.syncs` lists the synchronisations."""
    with MetaDevice() as mode:
        yield mode


def meta_like(t: torch.Tensor, mode: MetaDevice) -> torch.Tensor:
    """`t` on the meta device, remembering its values (as `.to("meta", non_blocking=True)` inside the mode)."""
    out = t.to(META, non_blocking=True)
    mode.shadows[out] = t
    return out
