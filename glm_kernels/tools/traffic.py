"""Bytes a Triton kernel moves, counted under the interpreter (`TRITON_INTERPRET=1`).

    from glm_kernels.tools.traffic import count_traffic
    with count_traffic() as counts:
        run_kernels()
    counts["_attn_fwd_kernel"].loaded      # bytes loaded over all programs (an upper bound of DRAM reads)
    counts["_attn_fwd_kernel"].loaded_unique  # bytes at distinct addresses (a lower bound)

Every masked and unmasked `tl.load` / `tl.store` of each launch is counted,
keyed by kernel name and summed over launches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class KernelTraffic:
    launches: int = 0
    loaded: int = 0
    stored: int = 0
    loaded_unique: int = 0
    stored_unique: int = 0


@dataclass
class _Launch:
    name: str
    loaded: int = 0
    stored: int = 0
    load_addrs: list = field(default_factory=list)
    store_addrs: list = field(default_factory=list)


def _unique_bytes(chunks) -> int:
    if not chunks:
        return 0
    addrs = np.concatenate([a for a, _ in chunks])
    sizes = np.concatenate([np.full(a.shape, s, dtype=np.int64) for a, s in chunks])
    _, first = np.unique(addrs, return_index=True)
    return int(sizes[first].sum())


@contextlib.contextmanager
def count_traffic():
    """Count loads and stores of every Triton launch inside the block (interpreter only)."""
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    orig_load, orig_store, orig_call = builder.create_masked_load, builder.create_masked_store, executor.__call__
    counts: dict[str, KernelTraffic] = {}
    stack: list[_Launch] = []

    def record(kind, ptrs, mask):
        if not stack:
            return
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)
        addrs = np.asarray(ptrs.data)[active].astype(np.int64)
        launch = stack[-1]
        if kind == "load":
            launch.loaded += addrs.size * itemsize
            launch.load_addrs.append((addrs, itemsize))
        else:
            launch.stored += addrs.size * itemsize
            launch.store_addrs.append((addrs, itemsize))

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        record("load", ptrs, mask)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        record("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        stack.append(_Launch(getattr(self.fn, "__name__", str(self.fn))))
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            launch = stack.pop()
            c = counts.setdefault(launch.name, KernelTraffic())
            c.launches += 1
            c.loaded += launch.loaded
            c.stored += launch.stored
            c.loaded_unique += _unique_bytes(launch.load_addrs)
            c.stored_unique += _unique_bytes(launch.store_addrs)

    builder.create_masked_load, builder.create_masked_store, executor.__call__ = load, store, call
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = orig_load, orig_store, orig_call
