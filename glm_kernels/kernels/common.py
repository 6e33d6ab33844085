"""Shared pieces of the Triton kernels: interpreter detection, dtypes, compile specs.

Every kernel module in `glm_kernels.kernels` registers its ops with
`glm_kernels.backend.register(op, "triton")` and exposes
`compile_specs() -> list[CompileSpec]`: one entry for every launch
configuration its launcher can choose, for fp16 and bf16, so that
`glm-kernels compile-report` can compile each of them ahead of time for
sm_80 and sm_90 and check registers, spills and shared memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

TL_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise ValueError(f"the triton backend needs CUDA tensors (got a {t.device} tensor); set "
                             "TRITON_INTERPRET=1 to run the kernels on the CPU interpreter, or use backend 'torch'")


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`[..., n]` -> `[N, n]` with unit column stride and rows `>= n` apart (a view when possible)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < n):
        t2 = t2.contiguous()
    return t2


@dataclass
class CompileSpec:
    """One launch configuration of one kernel, as `triton.compile(ASTSource(...))` takes it."""

    kernel: object  # a triton.JITFunction
    signature: dict  # argument name -> "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


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
