"""
Count, on CPU, the operations that would make a CUDA device sync with the host:
the GPU path's sync budget is then testable without a GPU.

Two layers of torch's dispatch are watched:

- aten ops (a ``TorchDispatchMode``): ``_local_scalar_dense`` (``.item()``,
  ``bool()``, ``int()``, ``float()`` of a tensor, ``if tensor``), ``nonzero`` (also
  single-argument ``torch.where``), ``masked_select``, ``masked_scatter``, the
  ``unique`` family, ``bincount``, ``equal``, ``repeat_interleave`` without
  ``output_size``, and indexing or index assignment by a boolean mask (``x[mask]``,
  ``x[mask] = y``), whose sizes are known only once the mask is counted;
- Python-level copies to the host (a ``TorchFunctionMode``): ``.tolist()``,
  ``.numpy()``, ``.cpu()``, ``.to("cpu")``, which on CPU tensors reach no aten op.

``SyncCounter.phase`` names what runs (set by :func:`watch_methods`), so a test can
tell the syncs made inside a method from the others.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::argwhere",
    "aten::masked_select",
    "aten::masked_scatter",
    "aten::masked_scatter_",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::bincount",
    "aten::equal",
    "aten::allclose",
    "aten::is_nonzero",
}
INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
HOST_COPIES = {"tolist", "numpy", "cpu"}


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS:
            self.counter.add(name)
        elif name in INDEX_OPS and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
            self.counter.add(f"{name} (boolean mask)")
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and (
                len(args) < 4 or args[3] is None):
            self.counter.add(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES:
            self.counter.add(f"Tensor.{name}")
        elif name == "to" and any(a == "cpu" for a in (*args[1:], kwargs.get("device"))
                                  if isinstance(a, str)):
            self.counter.add("Tensor.to('cpu')")
        return func(*args, **kwargs)


class SyncCounter:
    """``with SyncCounter() as syncs: ...``; then ``syncs.total``, ``syncs.by_phase``."""

    def __init__(self):
        self.phase = "other"
        self.by_phase: Counter = Counter()
        self.ops: Counter = Counter()
        self._stack = contextlib.ExitStack()

    def add(self, op: str):
        self.by_phase[self.phase] += 1
        self.ops[(self.phase, op)] += 1

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def __enter__(self):
        self._stack.enter_context(_Function(self))
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc):
        self._stack.close()


def watch_methods(monkeypatch, counter: SyncCounter, cls, names, calls: Counter):
    """Wrap methods of ``cls`` so that ``counter.phase`` names them while they run
    and ``calls`` counts their calls (key: ``"Class.method"``)."""
    for name in names:
        method = getattr(cls, name)
        key = f"{cls.__name__}.{name}"

        def wrapper(*args, __method=method, __key=key, **kwargs):
            calls[__key] += 1
            outer, counter.phase = counter.phase, __key
            try:
                return __method(*args, **kwargs)
            finally:
                counter.phase = outer

        functools.update_wrapper(wrapper, method)
        monkeypatch.setattr(cls, name, wrapper)
