"""Count the operations that make the host wait for the device (a "sync" on a GPU), on any device.

`count_syncs()` records, while active:
- the aten ops that read a tensor's value on the host or size an output by the data:
  `_local_scalar_dense` (behind `item()`, `int()`, `float()`, `bool()`, `__index__`), `is_nonzero`,
  `equal`, `nonzero`, `masked_select`, `unique*`, `repeat_interleave` without `output_size`, and
  indexing with a boolean tensor (a `nonzero` inside);
- the Python-level reads that bypass the dispatcher: `Tensor.tolist()`, `Tensor.numpy()`.

On a CUDA machine `torch.cuda.set_sync_debug_mode("warn")` reports the same; this works on the CPU.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "argwhere"}


def _sync_name(func, args, kwargs):
    name = func._schema.name.split("::")[-1]
    if name in _SYNCING:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None and \
            isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
        return name
    if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
        return name + "(bool)"
    return None


def _excluded(patterns) -> bool:
    """Whether a frame on the stack matches one of `patterns` ("path fragment" or "path fragment:function")."""
    if not patterns:
        return False
    frame = sys._getframe(2)
    while frame is not None:
        where = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
        if any(p in where for p in patterns):
            return True
        frame = frame.f_back
    return False


class _SyncMode(TorchDispatchMode):
    def __init__(self, counts: Counter, exclude):
        super().__init__()
        self.counts, self.exclude = counts, exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name is not None and not _excluded(self.exclude):
            self.counts[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(exclude=()):
    """`with count_syncs() as counts:` ... `sum(counts.values())` host syncs, by op name.

    `exclude`: syncs made while a frame matching one of these ("file fragment" or
    "file fragment:function") is on the stack are not counted.
    """
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name):
        def counted(self, *args, **kwargs):
            if not _excluded(exclude):
                counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return counted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _SyncMode(counts, tuple(exclude)):
            yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class _OpMode(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops():
    """`with count_ops() as counts:` every aten op dispatched (each a kernel launch on a GPU, views aside)."""
    counts: Counter = Counter()
    with _OpMode(counts):
        yield counts
