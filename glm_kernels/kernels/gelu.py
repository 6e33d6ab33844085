"""Bias + tanh-GeLU of the GLM MLP as Triton kernels: `y = gelu(x + bias)`.

Op "gelu", same signature and semantics as `_gelu_torch(x, bias)` in `glm_kernels/ops/gelu.py`:

- x: `[..., n]` fp32 / fp16 / bf16, last dim contiguous (leading dims may be
  strided if they flatten to rows without a copy); bias: `[n]` or None.
- y: `[..., n]` in the dtype of x.
- gelu(z) = 0.5*z*(1 + tanh(0.7978845608028654*z*(1 + 0.044715*z*z))),
  evaluated in fp32 on z = x + bias (the sum is not rounded to the low dtype)
  through the identity 0.5*(1 + tanh(u)) = sigmoid(2u), which needs no tanh
  and cannot overflow (the exponent is clamped at 80, where sigmoid is below
  2e-35). Under the interpreter bf16 outputs are rounded to nearest even in
  software (`common.downcast`: the interpreter's own cast truncates).

Tiling: program (row group, column block) handles R consecutive rows of
BLOCK_N columns, reading its bias block once. BLOCK_N = 1024 (narrower rows
are masked: toy widths need no configurations of their own), num_warps = 4 (8 elements per thread),
R = `rows_per_program(N)` = clamp(N // 64, 1, 16). Grid: P = ceil(N / R)
row groups x ceil(n / BLOCK_N) column blocks.

Bytes per launch (counted over all programs, what
`glm_kernels.tools.traffic.count_traffic` measures), N rows, width n,
element size e of x, e_b of bias, [.] = 1 when the feature is on:

Forward `_gelu_fwd_kernel` (fuses the bias add, the fp32 GeLU and the cast):
    reads  N*n*e + P*n*e_b*[bias]        writes N*n*e
Backward `_gelu_bwd_kernel` (the forward saves x and bias, nothing new, and
the backward recomputes z = x + bias and gelu'(z) in fp32;
fuses dx = dy*gelu'(z) with per-program fp32 partial column sums of dx for
dbias, which the host sums; no atomics):
    reads  2*N*n*e + P*n*e_b*[bias]      writes N*n*e*[dx] + 4*P*n*[dbias]
The minimum reads the bias once and writes dbias once (n*e_b); the excess
is (P - 1)*n*e_b in the forward (bias re-reads, L2 hits) and
(P - 1)*n*(e_b + 4) + 4*n - n*e_b in the backward (bias re-reads and fp32
partials instead of one dbias row): 1.03x and 1.06x at N = 1024, n = 16384
(ChatGLM-6B prefill; R = 16, P = 64). Decode (N = 1): the forward is exact,
the backward 1.2x in fp16 (its partial row is fp32). With few rows the
partials are a larger share (P = N below 128 rows): up to 1.5x (forward)
and 2x (backward, fp16), on launches of a few hundred KB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register
from ..backend import TARGETS, DeviceInfo, assume_device
from .common import (DTYPES, TL_TYPE, CompileSpec, aligned, as_rows, check_device, downcast, launch, meta,
                     record_launches, row_stride, specs_from_launches, tensor_dtype)

MIN_BLOCK_N = 1024  # narrower rows (toy models) are masked, and need no configurations of their own
MAX_BLOCK_N = 1024
SQRT_2_OVER_PI = 0.7978845608028654
GELU_C = 0.044715


# ---------------------------------------------------------------- launch configuration


def rows_per_program(n_rows: int) -> int:
    """Rows each program walks (its bias block and dbias partial are read / written once)."""
    return min(16, max(1, n_rows // 64))


def gelu_config(n_cols: int) -> dict:
    """BLOCK_N, num_warps, num_stages for rows of width n_cols (the same for every dtype and direction)."""
    if n_cols < 1:
        raise ValueError(f"gelu: width n={n_cols} must be positive")
    block = min(max(triton.next_power_of_2(n_cols), MIN_BLOCK_N), MAX_BLOCK_N)
    return {"BLOCK_N": block, "num_warps": min(4, max(1, block // 256)), "num_stages": 1}


# ---------------------------------------------------------------- kernels


@triton.jit
def _exp_neg_2u(z):
    """exp(-2u), u = sqrt(2/pi)*z*(1 + 0.044715*z^2), fp32; sigmoid(2u) = 0.5*(1 + tanh(u)) = 1 / (1 + exp(-2u))."""
    u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)
    return tl.exp(tl.minimum(-2.0 * u, 80.0))


@triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
def _gelu_fwd_kernel(X, BIAS, Y, n_rows, n_cols, stride_x, rows_per_prog,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row group, column block): y = gelu(x + bias) on R rows x BLOCK_N columns."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    row0 = pid_r * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        m = cols < tl.where(row < n_rows, n_cols, 0)  # (a scalar-bool & vector mask is not bool in the interpreter)
        row64 = row.to(tl.int64)
        z = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = z + b
        y = z / (1.0 + _exp_neg_2u(z))
        tl.store(Y + row64 * n_cols + cols, downcast(y, Y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
def _gelu_bwd_kernel(DY, X, BIAS, DX, DB_PART, n_rows, n_cols, stride_dy, stride_x, rows_per_prog,
                     HAS_BIAS: tl.constexpr, STORE_DX: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row group, column block): dz = dy * gelu'(x + bias); dx = dz; dbias partial = sum_rows dz."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    if COMPUTE_DB:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid_r * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        m = cols < tl.where(row < n_rows, n_cols, 0)
        row64 = row.to(tl.int64)
        z = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = z + b
        dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        e = _exp_neg_2u(z)
        sg = 1.0 / (1.0 + e)
        # d/dz [z * sigmoid(2u)] = sg + z * 2u' * sg * (1 - sg), with 1 - sg = e * sg (no cancellation)
        du = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        dz = dy * (sg + z * du * (e * sg) * sg)
        if STORE_DX:
            tl.store(DX + row64 * n_cols + cols, downcast(dz, DX.dtype.element_ty), mask=m)
        if COMPUTE_DB:
            acc += dz
    if COMPUTE_DB:
        tl.store(DB_PART + pid_r.to(tl.int64) * n_cols + cols, acc, mask=cmask)


# ---------------------------------------------------------------- host side


def _grid(n_rows: int, n_cols: int, cfg: dict) -> tuple[int, int, int]:
    rpp = rows_per_program(n_rows)
    return rpp, triton.cdiv(n_rows, rpp), triton.cdiv(n_cols, cfg["BLOCK_N"])


class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        shape, n = x.shape, x.shape[-1]
        cfg = gelu_config(n)
        x2 = as_rows(x, n)
        rows = x2.shape[0]
        y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        if rows > 0:
            rpp, p_r, p_c = _grid(rows, n, cfg)
            launch(_gelu_fwd_kernel, (p_r, p_c),
                   x2, bias if bias is not None else x2, y, rows, n, row_stride(x2), rpp,
                   HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"],
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.save_for_backward(x2, bias)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and bias is not None
        rows, n = x2.shape
        cfg = gelu_config(n)
        dy2 = as_rows(dy, n)
        dx = torch.empty((rows, n), dtype=x2.dtype, device=x2.device) if need_x else None
        rpp, p_r, p_c = _grid(rows, n, cfg) if rows > 0 else (1, 0, 0)
        db_part = torch.empty((p_r, n), dtype=torch.float32, device=x2.device) if need_b else None
        if rows > 0:
            launch(_gelu_bwd_kernel, (p_r, p_c),
                   dy2, x2, bias if bias is not None else x2, dx if dx is not None else dy2,
                   db_part if db_part is not None else dy2, rows, n, row_stride(dy2), row_stride(x2), rpp,
                   HAS_BIAS=bias is not None, STORE_DX=need_x, COMPUTE_DB=need_b, BLOCK_N=cfg["BLOCK_N"],
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dbias = db_part.sum(0).to(bias.dtype) if need_b else None
        return (dx.view(ctx.shape) if dx is not None else None), dbias


def _supports(x, bias):
    """None if the Triton GeLU takes this call, else why not."""
    if x.dtype not in TL_TYPE:
        return f"gelu: unsupported dtype {x.dtype}; expected fp32, fp16 or bf16"
    return None


@register("gelu", "triton", supports=_supports)
def _gelu_triton(x, bias):
    """`gelu(x + bias)` (tanh form) on the Triton kernels; x `[..., n]`, bias `[n]` or None; dtype of x."""
    check_device(x, bias)
    if x.dtype not in TL_TYPE:
        raise TypeError(f"gelu: unsupported dtype {x.dtype}; expected fp32, fp16 or bf16")
    n = x.shape[-1]
    gelu_config(n)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"gelu: bias has shape {tuple(bias.shape)}, expected ({n},)")
    return _BiasGeluFn.apply(x, aligned(bias))


# ---------------------------------------------------------------- ahead-of-time compilation


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every (BLOCK_N, num_warps, num_stages) `gelu_config` can return (BLOCK_N = 1 .. 1024, the same on every
    GPU), fp16, bf16 and fp32, forward and backward, recorded from the launchers on meta tensors with widths
    16-divisible and not, with every feature flag on (bias, dx, dbias): the flags only remove code."""
    with assume_device(target or TARGETS[80]), record_launches() as launches:
        for dtype in DTYPES:
            block = MIN_BLOCK_N
            while block <= MAX_BLOCK_N:
                for n in sorted({block, block - 1, block // 2 + 1, 2 * MAX_BLOCK_N if block == MAX_BLOCK_N else 0,
                                 1 if block == MIN_BLOCK_N else 0}):
                    if n >= 1 and gelu_config(n)["BLOCK_N"] == block:
                        x, b = meta(3, 5, n, dtype=dtype).requires_grad_(), meta(n, dtype=dtype).requires_grad_()
                        y = _gelu_triton(x, b)
                        y.backward(meta(*y.shape, dtype=dtype))
                block *= 2

    def label(ln, consts):
        return f"{TL_TYPE[tensor_dtype(ln)]} BLOCK_N={consts['BLOCK_N']} warps={ln.kwargs['num_warps']}"

    return specs_from_launches(launches, label, lambda ln: {"dtype": tensor_dtype(ln)})
