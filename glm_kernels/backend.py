"""The one place where an implementation is chosen for each fused op.

Every op in `glm_kernels.ops` registers its implementations here, one per
backend, and calls `dispatch(op, device, backend)` to get the function to run.
The choice, highest priority first:

1. the `backend=` argument of the op (the model passes
   `config.kernel_backend`, which `from_pretrained(..., kernel_backend=...)`
   sets);
2. the environment variable `GLM_KERNELS_BACKEND` (`torch` or `triton`);
3. by device: CUDA tensors use `triton` where the op has a Triton
   implementation, everything else uses `torch`.

An explicit request (1 or 2) is strict: asking for a backend that the op does
not have raises `ValueError` instead of quietly running something else.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

ENV_VAR = "GLM_KERNELS_BACKEND"
BACKENDS = ("torch", "triton")

_REGISTRY: dict[str, dict[str, Callable]] = {}
_TRITON_STATE = {"loaded": False, "error": None}


def _load_triton_kernels() -> None:
    """Import `glm_kernels.kernels` once, registering the Triton implementations."""
    if _TRITON_STATE["loaded"]:
        return
    _TRITON_STATE["loaded"] = True
    try:
        from . import kernels

        kernels.load_all()
    except ImportError as err:  # no triton on this machine: the torch backend serves every op
        _TRITON_STATE["error"] = err


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}; known: {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def available(op: str) -> tuple[str, ...]:
    """Backends that implement `op`."""
    return tuple(_REGISTRY.get(op, {}))


def requested_backend(backend: str | None = None) -> str | None:
    """The explicitly requested backend (argument, else environment), validated, or None."""
    if backend is not None:
        source = "backend argument"
    else:
        backend = os.environ.get(ENV_VAR) or None
        source = f"environment variable {ENV_VAR}"
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise ValueError(f"{source} is {backend!r}; expected one of {BACKENDS}")
    return backend


def _device_preference(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "torch")
    return ("torch",)


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Name of the backend that runs `op` on `device`."""
    _load_triton_kernels()
    device = torch.device(device)
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no op named {op!r} is registered; known ops: {sorted(_REGISTRY)}")
    explicit = requested_backend(backend)
    if explicit is not None:
        if explicit not in impls:
            why = f"; triton could not be imported: {_TRITON_STATE['error']}" if _TRITON_STATE["error"] else ""
            raise ValueError(
                f"backend {explicit!r} was requested but op {op!r} has no {explicit} implementation "
                f"(available: {', '.join(impls)}){why}"
            )
        if explicit == "triton" and device.type != "cuda" and not _interpreting():
            raise ValueError(f"backend 'triton' was requested for op {op!r} on a {device.type} tensor: Triton "
                             "kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before triton is imported) "
                             "to run on the CPU interpreter")
        return explicit
    for name in _device_preference(device):
        if name in impls:
            return name
    raise ValueError(f"op {op!r} has no implementation for device {device} (available: {', '.join(impls)})")


def dispatch(op: str, device: torch.device | str, backend: str | None = None) -> Callable:
    """The implementation of `op` to run for tensors on `device`."""
    return _REGISTRY[op][resolve(op, device, backend)]
