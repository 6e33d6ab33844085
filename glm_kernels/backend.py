"""The one place where an implementation is chosen for each fused op.

Every op in `glm_kernels.ops` registers its implementations here, one per
backend (`register(op, "triton", supports=..., min_capability=...)`), and
calls `call(op, device, backend, *args)` (or `dispatch(op, device, backend)`
for the function alone) to run the chosen one. The choice, highest priority
first:

1. the `backend=` argument of the op (the model passes the `Plan` it asked
   for once, from `config.kernel_backend`, which
   `from_pretrained(..., kernel_backend=...)` sets);
2. the environment variable `GLM_KERNELS_BACKEND` (`torch` or `triton`);
3. automatic: by device, then by call. On a CUDA device the Triton kernel of
   an op runs when the device's compute capability reaches the op's
   `min_capability` (attention: 8.0, where Triton reaches the tensor cores;
   on sm_75 Triton's `tl.dot` is a loop of FMAs and PyTorch's SDPA / cuBLAS
   path is the better one; the element-wise kernels: 7.5) and the kernel's
   `supports(*args)` predicate accepts the call (head dim, dtype, width);
   otherwise the PyTorch op runs. CPU tensors use `torch`.

An explicit request (1 or 2) is strict: asking for a backend that the op does
not have, or a Triton kernel for a call it does not support, raises
`ValueError` naming the op and the reason instead of quietly running
something else.

The device facts (compute capability, opt-in shared memory per block) are
read once per device by `device_info(device)`, which the kernel launchers also
use to choose their block sizes; tests pretend to be another GPU with
`assume_device(TARGETS[75])` (or by patching `_query_cuda_device`).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

ENV_VAR = "GLM_KERNELS_BACKEND"
BACKENDS = ("torch", "triton")
TRITON_MIN_CAPABILITY = (7, 5)  # the oldest target the kernels are compiled and checked for


@dataclass(frozen=True)
class DeviceInfo:
    """What the kernels' launchers and the backend choice need to know about a GPU."""

    capability: tuple[int, int]
    shared_memory: int  # bytes one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    gpus: str = ""

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    @property
    def tensor_cores(self) -> bool:
        """Whether Triton 3.9 lowers fp16/bf16 `tl.dot` to tensor-core MMA here (sm_80 and newer)."""
        return self.capability >= (8, 0)


# NVIDIA's "maximum shared memory per thread block" (CUDA C++ Programming Guide, compute capabilities table).
TARGETS = {
    75: DeviceInfo((7, 5), 64 * 1024, "T4, RTX 20xx"),
    80: DeviceInfo((8, 0), 163 * 1024, "A100, A30"),
    86: DeviceInfo((8, 6), 99 * 1024, "RTX 30xx, A10, A40"),
    89: DeviceInfo((8, 9), 99 * 1024, "RTX 40xx, L4, L40"),
    90: DeviceInfo((9, 0), 227 * 1024, "H100, H200"),
}
# CPU tensors (the Triton interpreter) and meta tensors are configured as on an A100.
DEFAULT_DEVICE = TARGETS[80]

_REGISTRY: dict[str, dict[str, "Impl"]] = {}
_TRITON_STATE = {"loaded": False, "error": None}
_ASSUMED: list[DeviceInfo] = []


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Callable | None = None  # (*args) -> None when the call is supported, else the reason (str)
    min_capability: tuple[int, int] = TRITON_MIN_CAPABILITY


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


# ----------------------------------------------------------------------------- devices


@functools.lru_cache(maxsize=None)
def _query_cuda_device(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return DeviceInfo((props.major, props.minor), int(shared), props.name)


def device_info(device: torch.device | str) -> DeviceInfo:
    """Compute capability and per-block shared memory of `device`, read once per CUDA device.

    CPU and meta tensors get `DEFAULT_DEVICE` (A100). Inside `assume_device(info)` every device is `info`.
    """
    if _ASSUMED:
        return _ASSUMED[-1]
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_DEVICE
    return _query_cuda_device(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def assume_device(info: DeviceInfo):
    """Within the block, `device_info` returns `info` for every device (tests, ahead-of-time compile specs)."""
    _ASSUMED.append(info)
    try:
        yield info
    finally:
        _ASSUMED.pop()


# ----------------------------------------------------------------------------- registry


def register(op: str, backend: str, supports: Callable | None = None,
             min_capability: tuple[int, int] = TRITON_MIN_CAPABILITY) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the `backend` implementation of `op`.

    `supports(*args)` (the op's arguments) returns None when the implementation takes the call, else a
    short reason; `min_capability` is the oldest CUDA compute capability where automatic mode picks it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}; known: {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Impl(fn, supports, tuple(min_capability))
        return fn

    return deco


def available(op: str) -> tuple[str, ...]:
    """Backends that implement `op`."""
    _load_triton_kernels()
    return tuple(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    _load_triton_kernels()
    return sorted(_REGISTRY)


def requested_backend(backend=None) -> str | None:
    """The explicitly requested backend (argument, else environment), validated, or None."""
    if isinstance(backend, Plan):
        return backend.requested
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


def capability_choice(op: str, info: DeviceInfo) -> tuple[str, str]:
    """(backend, reason) that automatic mode uses for `op` on a CUDA device described by `info`."""
    _load_triton_kernels()
    impls = _REGISTRY[op]
    triton = impls.get("triton")
    if triton is None:
        why = f" (triton could not be imported: {_TRITON_STATE['error']})" if _TRITON_STATE["error"] else ""
        return "torch", f"no triton kernel{why}"
    if info.capability < triton.min_capability:
        need = ".".join(map(str, triton.min_capability))
        return "torch", f"compute capability {info.capability[0]}.{info.capability[1]} < {need}"
    return "triton", ""


@dataclass(frozen=True, eq=False)
class Plan:
    """The backend decision for one model on one device, made once (`plan(device, backend)`).

    `requested` is the explicit backend (strict) or None; `choices[op]` the automatic choice by capability.
    Passed as the `backend=` argument of the ops, it replaces the per-call device lookups; calls the
    chosen Triton kernel does not support still fall back to torch in automatic mode.
    """

    device: torch.device
    requested: str | None
    info: DeviceInfo | None
    choices: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)


def plan(backend: str | None, device: torch.device | str) -> Plan:
    """The model's backend plan for `device`: asked once per (device, request, environment), then cached."""
    return _plan(requested_backend(backend), torch.device(device), tuple(_ASSUMED[-1:]))


@functools.lru_cache(maxsize=64)
def _plan(requested, device, assumed) -> Plan:
    _load_triton_kernels()
    info = device_info(device) if device.type == "cuda" else None
    choices, reasons = {}, {}
    for op in _REGISTRY:
        if info is None:
            choices[op], reasons[op] = "torch", f"{device.type} tensors"
        else:
            choices[op], reasons[op] = capability_choice(op, info)
    return Plan(device, requested, info, choices, reasons)


def _triton_on_this_device(op: str, device: torch.device):
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend 'triton' was requested for op {op!r} on a {device.type} tensor: Triton "
                         "kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before triton is imported) "
                         "to run on the CPU interpreter")


def resolve(op: str, device: torch.device | str, backend=None, args: tuple | None = None) -> str:
    """Name of the backend that runs `op` on `device` (for the call `args`, when given)."""
    _load_triton_kernels()
    device = torch.device(device)
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no op named {op!r} is registered; known ops: {sorted(_REGISTRY)}")
    explicit = requested_backend(backend)
    if explicit is not None:
        impl = impls.get(explicit)
        if impl is None:
            why = f"; triton could not be imported: {_TRITON_STATE['error']}" if _TRITON_STATE["error"] else ""
            raise ValueError(
                f"backend {explicit!r} was requested but op {op!r} has no {explicit} implementation "
                f"(available: {', '.join(impls)}){why}"
            )
        if explicit == "triton":
            _triton_on_this_device(op, device)
        reason = impl.supports(*args) if impl.supports is not None and args is not None else None
        if reason:
            raise ValueError(f"backend {explicit!r} was requested for op {op!r}, which does not support this call: "
                             f"{reason}")
        return explicit
    if isinstance(backend, Plan) and backend.device != device:  # a model spread over devices: that device's plan
        backend = plan(backend.requested, device)
    if device.type != "cuda" or "triton" not in impls:
        choice = "torch"
    elif isinstance(backend, Plan) and op in backend.choices:
        choice = backend.choices[op]
    else:
        choice = capability_choice(op, device_info(device))[0]
    if choice == "triton":
        impl = impls["triton"]
        if args is None or impl.supports is None or impl.supports(*args) is None:
            return "triton"
    if "torch" in impls:
        return "torch"
    raise ValueError(f"op {op!r} has no implementation for device {device} (available: {', '.join(impls)})")


def dispatch(op: str, device: torch.device | str, backend=None, args: tuple | None = None) -> Callable:
    """The implementation of `op` to run for tensors on `device` (checked against `args` when given)."""
    name = resolve(op, device, backend, args)
    return _REGISTRY[op][name].fn


def call(op: str, device: torch.device | str, backend, *args):
    """Run `op` on `args` with the implementation `resolve` picks for this call."""
    return dispatch(op, device, backend, args)(*args)


def unsupported_reason(op: str, backend: str, *args) -> str | None:
    """Why `backend`'s implementation of `op` does not take this call (None when it does)."""
    _load_triton_kernels()
    impl = _REGISTRY[op][backend]
    return impl.supports(*args) if impl.supports is not None else None


# ----------------------------------------------------------------------------- the support table

TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def support_table() -> str:
    """Markdown: per GPU generation and dtype, which path each op takes in automatic mode at ChatGLM-6B's shapes.

    Derived from `capability_choice` and the kernels' `supports` predicates on 6B-shaped meta tensors
    (`docs/kernels.md` holds this table; a test checks it is current).
    """
    _load_triton_kernels()
    calls = _six_b_calls()
    names = [op for op in ("rope", "attention", "softmax", "layernorm", "gelu", "lm_loss", "quant_linear")
             if op in _REGISTRY]
    lines = ["| GPU | target | dtype | " + " | ".join(f"`{op}`" for op in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for sm, info in TARGETS.items():
        for dtype in TABLE_DTYPES:
            cells = []
            for op in names:
                choice, reason = capability_choice(op, info)
                if choice == "triton" and op in calls:
                    reason = unsupported_reason(op, "triton", *calls[op](dtype)) or ""
                    choice = "torch" if reason else "triton"
                cells.append("Triton" if choice == "triton" else f"PyTorch ({reason})")
            lines.append(f"| {info.gpus} | sm_{sm} | {DTYPE_NAMES[dtype]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def support_summary() -> str:
    """Markdown for the README: per GPU generation and dtype, the path automatic mode takes at 6B shapes.

    The same decisions as `support_table`, one cell per dtype ("Triton" when every op runs its kernel, else the
    ops that run PyTorch and why).
    """
    rows = [line.split(" | ") for line in support_table().splitlines()[2:]]
    names = [c.strip(" |`") for c in support_table().splitlines()[0].split(" | ")[3:]]
    cells: dict = {}
    for gpu, target, dtype, *paths in rows:
        torch_ops = [f"`{op}`" for op, path in zip(names, paths) if not path.strip(" |").startswith("Triton")]
        reasons = sorted({path.strip(" |")[len("PyTorch ("):-1] for path in paths
                          if not path.strip(" |").startswith("Triton")})
        cells.setdefault((gpu.strip("| "), target), []).append(
            "Triton" if not torch_ops else f"Triton; {', '.join(torch_ops)} PyTorch ({'; '.join(reasons)})")
    lines = ["| GPU | target | " + " | ".join(DTYPE_NAMES[d] for d in TABLE_DTYPES) + " |",
             "|---|---|" + "---|" * len(TABLE_DTYPES)]
    for (gpu, target), per_dtype in cells.items():
        lines.append(f"| {gpu} | {target} | " + " | ".join(per_dtype) + " |")
    return "\n".join(lines)


def _six_b_calls() -> dict:
    """Representative calls of each op at ChatGLM-6B's shapes (meta tensors), for the support table."""
    from .ops.mask import GLMMask

    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def attention(dtype):
        q = meta(128, 1, 32, 128, dtype=dtype)
        mask = GLMMask(0, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        return q, q, q, 0, mask, False, None, None

    return {
        "rope": lambda dtype: (meta(128, 1, 3 * 4096, dtype=dtype), meta(1, 2, 128, dtype=torch.long),
                               meta(2048, 64, dtype=dtype), meta(2048, 64, dtype=dtype), 32, None, None),
        "attention": attention,
        "softmax": lambda dtype: (meta(1, 32, 128, 128, dtype=dtype), None, 1.0),
        "layernorm": lambda dtype: (meta(128, 1, 4096, dtype=dtype), None, 1.0, meta(4096, dtype=dtype),
                                    meta(4096, dtype=dtype), 1e-5, False),
        "gelu": lambda dtype: (meta(128, 1, 16384, dtype=dtype), meta(16384, dtype=dtype)),
        # a decode step of the 4-bit query_key_value projection (THUDM layout: [out, in/2] int8, fp16 scale)
        "quant_linear": lambda dtype: (meta(1, 1, 4096, dtype=dtype), meta(12288, 2048, dtype=torch.int8),
                                       meta(12288, dtype=torch.float16), 4, meta(12288, dtype=dtype)),
    }
