"""Shared pieces of the Triton kernels: launching, interpreter quirks, dtypes, compile specs.

Every kernel launch goes through `launch(kernel, grid, *args, **kwargs)`: it
runs the kernel with the tensors' CUDA device current (Triton launches on the
current device and its current stream, not the tensors': `torch.cuda.device`
makes the tensors' device current, so the launch also lands on that device's
current stream), and it is where `record_launches()` captures launches
instead of running them. `tests/test_device_guard.py` checks statically that
no kernel module launches any other way.

Every kernel module registers its ops with
`glm_kernels.backend.register(op, "triton", supports=...)` and exposes
`compile_specs(target) -> list[CompileSpec]`: one entry per launch
configuration its launchers can choose on the GPU `target` (a
`backend.DeviceInfo`), fp16, bf16 and fp32. The entries are not written by
hand: `compile_specs` runs the real launchers on meta tensors (shapes chosen
so that every configuration is reached) inside `record_launches()`, and each
recorded launch is bound with the JIT's own binder (`specialization`), which
gives the signature, the constexprs and the specialisation attributes
(16-divisible integers and pointers, integers equal to 1) exactly as a launch
on a GPU computes them. `glm-kernels compile-report` compiles every
distinct specialisation for sm_75, sm_80, sm_86, sm_89 and sm_90.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

TL_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must cast bf16 tiles to fp32 before `tl.dot`.

    Only under the interpreter, where bf16 `tl.dot` returns garbage
    (triton#11584); on a GPU the kernel feeds bf16 tiles to the tensor cores.
    """
    return interpreting() and dtype == torch.bfloat16


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (meta while recording)."""
    for t in tensors:
        if t is None or t.device.type == "cuda" or interpreting() or (_RECORDING and t.device.type == "meta"):
            continue
        raise ValueError(f"the triton backend needs CUDA tensors (got a {t.device} tensor); set "
                         "TRITON_INTERPRET=1 to run the kernels on the CPU interpreter, or use backend 'torch'")


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`, or a contiguous copy when it does not start on a 16-byte boundary (see `as_rows`)."""
    if t is not None and t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`[..., n]` -> `[N, n]` with unit column stride and rows `>= n` apart (a view when possible).

    The row stride is 16-divisible exactly when n is, and the start is 16-byte aligned (else a copy): the
    kernels are compiled for those two specialisations, the ones contiguous rows of any width have.
    """
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and (t2.stride(0) < n or (t2.stride(0) % 16 == 0) != (n % 16 == 0))):
        t2 = t2.contiguous()
    return aligned(t2)


def row_stride(t: torch.Tensor) -> int:
    """Stride of axis 0 of a `[N, n]` tensor from `as_rows`; n for one row (never used, and it specialises as
    contiguous rows do instead of compiling a variant for whatever a one-row view carries)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def strides(t: torch.Tensor, dims: int | None = None) -> tuple[int, ...]:
    """The first `dims` strides of `t` (all but the last by default), 0 for axes of size 1 (see `row_stride`)."""
    dims = t.dim() - 1 if dims is None else dims
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(dims))


# ----------------------------------------------------------------------------- launching


def device_context(device: torch.device):
    """Context that makes `device` current for a launch (CUDA), nothing for CPU (interpreter) tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    def arg(self, name: str):
        """The value passed for the kernel parameter `name`."""
        names = _binder(self.kernel)[0].arg_names
        i = names.index(name)
        return self.args[i] if i < len(self.args) else self.kwargs[name]


_RECORDING: list[list[Launch]] = []


@contextlib.contextmanager
def record_launches():
    """Within the block `launch` records every launch (a list of `Launch`) instead of running it."""
    launches: list[Launch] = []
    _RECORDING.append(launches)
    try:
        yield launches
    finally:
        _RECORDING.pop()


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` on the device of its tensor arguments (all on one device)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"{_name(kernel)}: the tensor arguments must be on one device, got {sorted(map(str, devices))}")
    if _RECORDING:
        _RECORDING[-1].append(Launch(kernel, tuple(grid), args, kwargs))
        return
    with device_context(devices.pop()):
        kernel[grid](*args, **kwargs)


def _name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


# ----------------------------------------------------------------------------- the JIT's specialisation


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    """(JITFunction, binder, backend) for `kernel` (a JITFunction, or an interpreted one: rebuilt with the same
    `do_not_specialize` lists). The binder is the function triton 3.9's `JITFunction.run` calls on every launch
    (`create_function_from_signature`): it returns the bound arguments, the specialisation list whose string
    is the kernel cache key, and the options."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if isinstance(kernel, JITFunction):
        jit = kernel
    else:  # triton.runtime.interpreter.InterpretedFunction
        jit = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"),
                          do_not_specialize_on_alignment=kernel.kwargs.get("do_not_specialize_on_alignment"))
    backend = make_backend(GPUTarget("cuda", 80, 32))
    return jit, create_function_from_signature(jit.signature, jit.params, backend), backend


def specialization_key(kernel, args: tuple, kwargs: dict) -> str:
    """The kernel-cache key triton 3.9 computes for `kernel[grid](*args, **kwargs)` (a new key = a new compile)."""
    from triton.runtime.jit import compute_cache_key

    _, bind, _ = _binder(kernel)
    _, spec, options = bind(*args, **kwargs)
    return compute_cache_key({}, spec, options)


def bind(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) of a launch, as `JITFunction._pack_args` builds them for compiling."""
    jit, binder, backend = _binder(kernel)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


# ----------------------------------------------------------------------------- compile specs


@dataclass
class Variant:
    """One specialisation of a launch configuration: what `triton.compile(ASTSource(...))` takes."""

    signature: dict  # argument name -> "*fp16", "i32", "constexpr", ...
    constexprs: dict  # {(index,): value}, the JIT's constexprs (declared ones and integers equal to 1)
    attrs: dict  # {(index,): [["tt.divisibility", 16]]}: 16-divisible integers and pointers
    label: str = ""


@dataclass
class CompileSpec:
    """One launch configuration of one kernel (constexprs, warps, stages) and its run-time specialisations."""

    kernel: object  # a triton.JITFunction
    constexprs: dict  # declared constexpr parameters -> value
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    extra: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)  # representative (args, kwargs) reaching this configuration

    @property
    def name(self) -> str:
        return _name(self.kernel)

    def variants(self) -> list[Variant]:
        """The distinct specialisations of the representative calls (needs triton's JIT, not the interpreter)."""
        seen, out = set(), []
        for args, kwargs in self.calls:
            key = specialization_key(self.kernel, args, kwargs)
            if key in seen:
                continue
            seen.add(key)
            signature, constexprs, attrs, _ = bind(self.kernel, args, kwargs)
            out.append(Variant(signature, constexprs, attrs, _variant_label(self.kernel, signature, constexprs, attrs)))
        return out


def _variant_label(kernel, signature: dict, constexprs: dict, attrs: dict) -> str:
    """Which specialised arguments are not 16-divisible, and which integers are 1 (compiled as constants)."""
    jit, _, _ = _binder(kernel)
    names = list(signature)
    dns = {p.name for p in jit.params if p.do_not_specialize}
    declared = {p.name for p in jit.params if p.is_constexpr}
    divisible = {names[path[0]] for path, attr in attrs.items() if attr}
    ones = [names[path[0]] for path, value in constexprs.items()
            if names[path[0]] not in declared and value == 1 and value is not True]
    odd = [n for n, ty in signature.items()
           if ty != "constexpr" and ty[0] in "i*" and n not in dns and n not in divisible]
    parts = (["not 16-divisible: " + ",".join(odd)] if odd else []) + (["=1: " + ",".join(ones)] if ones else [])
    return "; ".join(parts) or "16-divisible"


def specs_from_launches(launches: list[Launch], label=None, extra=None) -> list[CompileSpec]:
    """Group recorded launches into one `CompileSpec` per (kernel, constexprs, warps, stages), keeping their calls.

    `label(launch, constexprs)` and `extra(launch)` describe a configuration; the default label is the dtype of the
    first tensor argument and the constexprs.
    """
    specs: dict = {}
    for ln in launches:
        jit, _, _ = _binder(ln.kernel)
        declared = [p.name for p in jit.params if p.is_constexpr]
        consts = {k: v for k, v in ln.kwargs.items() if k in declared}
        warps, stages = ln.kwargs.get("num_warps", 4), ln.kwargs.get("num_stages", 3)
        dtypes = tuple(sorted({str(a.dtype) for a in ln.args if isinstance(a, torch.Tensor)}))
        key = (_name(ln.kernel), dtypes, tuple(sorted((k, repr(v)) for k, v in consts.items())), warps, stages)
        if key not in specs:
            text = label(ln, consts) if label else _default_label(ln, consts)
            specs[key] = CompileSpec(ln.kernel, consts, warps, stages, text, extra(ln) if extra else {})
        specs[key].calls.append((ln.args, {k: v for k, v in ln.kwargs.items()}))
    return list(specs.values())


def tensor_dtype(ln: Launch) -> torch.dtype:
    return next(a.dtype for a in ln.args if isinstance(a, torch.Tensor))


def _default_label(ln: Launch, consts: dict) -> str:
    shown = " ".join(f"{k}={v}" for k, v in consts.items() if k not in ("UPCAST", "PRECISION"))
    return f"{TL_TYPE.get(tensor_dtype(ln), '?')} {shown} w{ln.kwargs.get('num_warps', 4)}" \
           f" s{ln.kwargs.get('num_stages', 3)}"


def meta(*shape, dtype=torch.float16) -> torch.Tensor:
    """A tensor without storage, for recording launches at any shape."""
    return torch.empty(*shape, dtype=dtype, device="meta")


# The interpreter (triton 3.9) converts fp32 to bf16 by truncating the mantissa, where a GPU rounds to
# nearest even (cvt.rn.bf16.f32). Under the interpreter, kernels round by hand so their bf16 results are
# what the GPU computes; compiled kernels never see the branch (the constexpr is False when compiling).
INTERPRETER_BF16_RNE = tl.constexpr(interpreting())


@triton.jit
def bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, with integer ops (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def downcast(x, dtype: tl.constexpr):
    """fp32 `x` in `dtype`, rounded to nearest even as a GPU does (also under the interpreter)."""
    if INTERPRETER_BF16_RNE and dtype == tl.bfloat16:
        return bf16_rne(x)
    else:
        return x.to(dtype)


@triton.jit
def residual_sum(X, R, x_off, r_off, mask, alpha, HAS_RES: tl.constexpr):
    """`x * alpha + r` in fp32 (just x without a residual): the alpha-residual join of the GLM block."""
    s = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = s * alpha + tl.load(R + r_off, mask=mask, other=0.0).to(tl.float32)
    return s
