"""Weight-only INT8/INT4 linear layers as Triton kernels (op "quant_linear", triton backend).

    quant_linear(x, weight, scale, bits, bias=None) -> y = x @ W^T (+ bias)

THUDM's layout (the `chatglm-6b-int8` / `-int4` checkpoints):

- x: `[..., in]` fp16 / bf16 / fp32 (rows need not be contiguous when they
  flatten without a copy); y: `[..., out]` in x's dtype.
- weight: int8 storage, contiguous. bits 8: `[out, in]`, q = weight.
  bits 4: `[out, in/2]`, byte j of a row holds element 2j in the HIGH nibble
  and element 2j+1 in the LOW nibble, each a 4-bit two's complement value
  (byte 0xF1 = (-1, 1)); in must be even.
- scale: `[out]`, fp16 (the checkpoint's) or x's dtype (a model converted
  with `.to(dtype)` converts it too); W = q * scale[:, None].
- bias: `[out]` in x's dtype, or None.

What is fused: the weights stay packed in global memory and are read once
per output tile; each tile is unpacked in registers, multiplied by x with
fp32 accumulation, and the epilogue applies the per-row scale, adds the bias
and rounds once to x's dtype. The scale factors out of the sum over `in` (it
belongs to the output row), so the forward multiplies the integer values q
(exact in fp16, bf16 and fp32) and scales the fp32 sum once. A 4-bit tile is
loaded as BLOCK_K/2 bytes per row, split into nibbles (`b >> 4` and
`((b & 15) ^ 8) - 8` on the sign-extended byte) and interleaved in registers
(`tl.join` + `tl.reshape`: column 2j the high nibble, 2j + 1 the low one).
Nothing of W is ever written.

Kernels:

1. `_qgemv_kernel` (decode, at most GEMV_MAX_ROWS = 8 rows): program
   (output block of BLOCK_N rows, K split) multiplies its weight tiles with
   the BLOCK_M = next_pow2(M) rows of x by broadcasting (no 16-row `tl.dot`
   tile for one token), reducing over BLOCK_K per step. When the output
   blocks alone give fewer than GEMV_TARGET_PROGRAMS programs, `in` is
   split into ranges of whole K tiles: each split writes an fp32 partial
   `[splits, M, out]` and `_qgemv_reduce` sums the splits in a fixed order
   (deterministic, no atomics) and applies the epilogue; with one split the
   GEMV applies it. BLOCK_M * BLOCK_N * BLOCK_K = 8192 (64 fp32 products per
   thread at 4 warps): (BLOCK_N, BLOCK_K) = (64, 128), (32, 128), (32, 64),
   (16, 64) for BLOCK_M = 1, 2, 4, 8, two stages; the same on every GPU.
2. `_qgemm_kernel` (more rows): x tiles times integer weight tiles with
   `tl.dot`: fp16/bf16 tiles on tensor cores on sm_80+, fp32 IEEE (FMA) dots
   for fp32 and on sm_75 (where Triton emits no MMA; fp16/bf16 tiles are
   cast to fp32: the same products). Program axis 0 runs over row blocks,
   so the programs that share a weight tile run together.
3. `_qgemm_dx_kernel` (backward): dX = dY @ W, program (row block, column
   block of `in`) walks `out` in BLOCK_N steps; each weight tile is
   dequantized to fp32 in registers (q * scale), rounded to dY's dtype (the
   weight an fp16/bf16 matmul against the dequantized W uses) and fed to
   `tl.dot`. dbias = dY summed over rows in fp32 (torch). Weight and scale
   never get gradients; nothing but them is saved for the backward.

Configurations (`gemm_config(dtype, info, direction)`, by
`backend.device_info`; BLOCK_N runs over `out` and BLOCK_K over `in`: the
forward reduces over BLOCK_K, the dX kernel over BLOCK_N):

    kind      where                          forward M,N,K,warps,stages  dX M,N,K,warps,stages
    mma_227k  fp16/bf16, sm_90 (227 KiB)     128, 128, 32, 8, 4          128, 128, 64, 8, 4
    mma_163k  fp16/bf16, sm_80 (163 KiB)     128, 128, 32, 8, 4          128,  64, 64, 8, 4
    mma_99k   fp16/bf16, sm_86/89 (99 KiB)   128, 128, 32, 8, 3          128,  64, 64, 8, 3
    fma       fp32 (every GPU), sm_75        32,  64, 32, 8, 2           64,  32, 64, 8, 1

Chosen with the compile report: larger FMA tiles (64 x 64 forward, two
stages in dX) spill in their not-16-divisible variants on sm_86/sm_90, and
a 128 x 128 x 64 tensor-core forward uses all 255 registers on sm_80.

Integers that change from call to call (rows M, K-tiles per split, splits,
the bias flag) are in `do_not_specialize`: a generation compiles each kernel
once. `out` and `in` (and the strides) are specialised as the JIT does
(16-divisible or not), per layer, never per step.

Bytes, decode (`tools/bytes_table.quant_linear_decode_bytes`, checked
against the interpreter's counts in tests/test_kernel_quant_linear.py), M
rows, N = out, K = in, e / e_s element sizes of x / scale, B = N*K*bits/8
packed weight bytes, P = ceil(N / BLOCK_N) output blocks, S splits:

    S = 1: loads B + P*M*K*e + N*(e_s + e*[bias]), stores M*N*e
    S > 1: loads B + P*M*K*e + S*M*N*4 + M*N*(e_s + e*[bias]),
           stores S*M*N*4 + M*N*e
    minimum: B + M*K*e + N*(e_s + e*[bias]) + M*N*e

The P*M*K*e term re-reads the few KB of x per output block (L1/L2 hits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import TARGETS, DeviceInfo, assume_device, device_info, register
from .common import (DTYPES, TL_TYPE, CompileSpec, aligned, as_rows, check_device, dot_upcast, downcast, launch,
                     meta, record_launches, row_stride, specs_from_launches)

GEMV_MAX_ROWS = 8
GEMV_TARGET_PROGRAMS = 512  # about 4 programs per SM of a 132-SM H100 streaming weights (a choice, not timed)
GEMV_TILES = {1: (64, 128), 2: (32, 128), 4: (32, 64), 8: (16, 64)}  # BLOCK_M -> (BLOCK_N, BLOCK_K)
GEMV_WARPS = 4
REDUCE_BLOCK = 512
GEMM = {  # kind -> {direction: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)}
    "mma_227k": {"fwd": (128, 128, 32, 8, 4), "dx": (128, 128, 64, 8, 4)},
    "mma_163k": {"fwd": (128, 128, 32, 8, 4), "dx": (128, 64, 64, 8, 4)},
    "mma_99k": {"fwd": (128, 128, 32, 8, 3), "dx": (128, 64, 64, 8, 3)},
    "fma": {"fwd": (32, 64, 32, 8, 2), "dx": (64, 32, 64, 8, 1)},
}
BITS = (4, 8)


# ----------------------------------------------------------------------------- configurations


def gemv_config(rows: int, n: int, k: int) -> dict:
    """BLOCK_M/N/K, warps and the K split of the decode kernel for `rows` <= 8 rows of x, `n` outputs, `k` inputs."""
    if not 1 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"quant_linear: the GEMV takes 1 to {GEMV_MAX_ROWS} rows, got {rows}")
    block_m = triton.next_power_of_2(rows)
    block_n, block_k = GEMV_TILES[block_m]
    blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(k, block_k)
    splits = max(1, min(tiles, triton.cdiv(GEMV_TARGET_PROGRAMS, blocks)))
    per_split = triton.cdiv(tiles, splits)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": GEMV_WARPS, "num_stages": 2,
            "blocks": blocks, "splits": triton.cdiv(tiles, per_split), "tiles_per_split": per_split}


def gemm_kind(dtype: torch.dtype, info: DeviceInfo) -> str:
    """"fma" for fp32 (IEEE dots are FMAs on every GPU) and on sm_75 (no MMA from Triton); else the tensor-core
    tiles for the GPU's shared memory per block (more pipeline stages, and wider dX tiles on sm_90)."""
    if dtype == torch.float32 or not info.tensor_cores:
        return "fma"
    if info.shared_memory >= 200 * 1024:
        return "mma_227k"
    return "mma_163k" if info.shared_memory >= 160 * 1024 else "mma_99k"


def gemm_config(dtype: torch.dtype, info: DeviceInfo | None = None, direction: str = "fwd") -> dict:
    """Tiles, warps and stages of the GEMM ("fwd") or dX ("dx") kernel for x's dtype on the GPU `info` (default:
    A100). BLOCK_N is over out and BLOCK_K over in in both: the forward reduces over BLOCK_K, the dX kernel over
    BLOCK_N."""
    block_m, block_n, block_k, warps, stages = GEMM[gemm_kind(dtype, info or TARGETS[80])][direction]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


def _upcast(dtype: torch.dtype, info: DeviceInfo) -> bool:
    """Cast fp16/bf16 tiles to fp32 before `tl.dot`: under the interpreter for bf16 (its bf16 dot is broken), and
    where Triton emits no tensor-core MMA (sm_75): there a dot is fp32 FMAs anyway (16-bit products are exact)."""
    return dot_upcast(dtype) or (dtype != torch.float32 and not info.tensor_cores)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no TF32 (PyTorch's default); 16-bit: ignored


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _nibbles(packed):
    """int8 bytes -> (high, low) 4-bit two's complement values as int32 in [-8, 7] (elements 2j, 2j+1)."""
    b = packed.to(tl.int32)  # sign-extending: the high nibble is the byte's sign
    return b >> 4, ((b & 15) ^ 8) - 8


@triton.jit
def _weight_tile(w_rows, n_ok, k0, K, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Integer weights q[n, k0:k0 + BLOCK_K] `[BLOCK_N, BLOCK_K]` (0 outside the matrix) of the rows `w_rows`
    (pointers `[BLOCK_N, 1]`): int8 bytes, or for 4 bits BLOCK_K/2 bytes whose nibbles are interleaved in
    registers (join + reshape: column 2j the high nibble, 2j + 1 the low one)."""
    if BITS == 8:
        k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0)
    else:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        hi, lo = _nibbles(tl.load(w_rows + j[None, :], mask=n_ok[:, None] & (j < K // 2)[None, :], other=0))
        return tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. `b` may hold integers (|q| <= 127, exact in fp16, bf16 and fp32): cast to a's dtype, or both to
    fp32 with UPCAST (the interpreter's int -> bf16 cast is wrong, so integers go to fp32 directly)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def _epilogue(acc, rows, row_ok, n, n_ok, SCALE, BIAS, OUT, stride_om, has_bias):
    """OUT[rows, n] = acc * scale[n] (+ bias[n]), rounded once to OUT's dtype. acc: fp32 `[len(rows), len(n)]`."""
    y = acc * tl.load(SCALE + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if has_bias != 0:
        y += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_om + n[None, :], downcast(y, OUT.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- decode: GEMV with split K


@triton.jit(do_not_specialize=["M", "tiles_per_split", "n_splits", "has_bias"])
def _qgemv_kernel(X, W, SCALE, BIAS, OUT, PART, M, N, K, stride_xm, stride_wn, stride_om,
                  tiles_per_split, n_splits, has_bias,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (pid_n, pid_k): sum_k x[m, k] * q[n, k] over split pid_k for BLOCK_N outputs and every row m;
    one split: the epilogue; several: the fp32 partial to PART[pid_k, m, n]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = W + n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * tiles_per_split * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, tl.minimum(K, k_start + tiles_per_split * BLOCK_K), BLOCK_K):
        k = k0 + offs_k
        q = _weight_tile(w_rows, n_ok, k0, K, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * q[None, :, :], axis=2)
    if n_splits == 1:
        _epilogue(acc, rows, row_ok, n, n_ok, SCALE, BIAS, OUT, stride_om, has_bias)
    else:
        part = PART + (pid_k * M + rows).to(tl.int64)[:, None] * N + n[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "n_splits", "has_bias"])
def _qgemv_reduce(PART, SCALE, BIAS, OUT, M, N, stride_om, n_splits, has_bias, BLOCK: tl.constexpr):
    """Program (row m, output block): the partials of every split summed in split order, then the epilogue."""
    m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    acc = tl.zeros([1, BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(PART + (s * M + m).to(tl.int64) * N + n, mask=n_ok, other=0.0)[None, :]
    rows = m + tl.arange(0, 1)
    _epilogue(acc, rows, rows < M, n, n_ok, SCALE, BIAS, OUT, stride_om, has_bias)


# ----------------------------------------------------------------------------- prefill / training: GEMM


@triton.jit(do_not_specialize=["M", "has_bias"])
def _qgemm_kernel(X, W, SCALE, BIAS, OUT, M, N, K, stride_xm, stride_wn, stride_om, has_bias,
                  BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (pid_m, pid_n): OUT tile = x[rows] @ q[n]^T (tl.dot, fp32 accumulator), then the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = W + n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        q = _weight_tile(w_rows, n_ok, k0, K, BITS, BLOCK_N, BLOCK_K)
        acc = _dot(x, tl.trans(q), acc, UPCAST, PRECISION)
    _epilogue(acc, rows, row_ok, n, n_ok, SCALE, BIAS, OUT, stride_om, has_bias)


@triton.jit(do_not_specialize=["M"])
def _qgemm_dx_kernel(DY, W, SCALE, DX, M, N, K, stride_dym, stride_wn, stride_dxm,
                     BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (pid_m, pid_k): DX[rows, BLOCK_K columns] = dY[rows] @ (q * scale)[:, columns], walking all N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    k0 = pid_k * BLOCK_K
    dy_rows = DY + rows.to(tl.int64)[:, None] * stride_dym
    dtype = DY.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < N
        dy = tl.load(dy_rows + n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        q = _weight_tile(W + n.to(tl.int64)[:, None] * stride_wn, n_ok, k0, K, BITS, BLOCK_N, BLOCK_K)
        s = tl.load(SCALE + n, mask=n_ok, other=0.0).to(tl.float32)
        # W = q * scale in fp32, rounded to dY's dtype: the dequantized weight an fp16/bf16 matmul would use
        acc = _dot(dy, downcast(q.to(tl.float32) * s[:, None], dtype), acc, UPCAST, PRECISION)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dxm + k[None, :], downcast(acc, dtype),
             mask=row_ok[:, None] & (k < K)[None, :])


# ----------------------------------------------------------------------------- host side

_NO_PARTIALS: dict = {}


def _no_partials(device: torch.device) -> torch.Tensor:
    """An fp32 stand-in for the partials of a one-split GEMV (never written), made once per device: the
    kernel's PART argument keeps one type, so one split or several is one specialisation."""
    device = torch.device(device)
    if device not in _NO_PARTIALS:
        _NO_PARTIALS[device] = torch.empty(4, dtype=torch.float32, device=device)
    return _NO_PARTIALS[device]


def _forward(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias, bits: int) -> torch.Tensor:
    """`[M, K]` rows (from `as_rows`) -> `[M, N]` in x's dtype: the GEMV (M <= 8) or the GEMM."""
    M, K = x2.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    has_bias = int(bias is not None)
    b = bias if bias is not None else out  # never read without a bias; x's dtype, as a bias (one specialisation)
    if M <= GEMV_MAX_ROWS:
        cfg = gemv_config(M, N, K)
        splits = cfg["splits"]
        part = torch.empty((splits, M, N), dtype=torch.float32, device=x2.device) if splits > 1 else \
            _no_partials(x2.device)
        launch(_qgemv_kernel, (cfg["blocks"], splits), x2, weight, scale, b, out, part, M, N, K,
               row_stride(x2), weight.stride(0), N, cfg["tiles_per_split"], splits, has_bias,
               BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if splits > 1:
            launch(_qgemv_reduce, (M, triton.cdiv(N, REDUCE_BLOCK)), part, scale, b, out, M, N, N, splits, has_bias,
                   BLOCK=REDUCE_BLOCK, num_warps=4, num_stages=1)
        return out
    info = device_info(x2.device)
    cfg = gemm_config(x2.dtype, info)
    launch(_qgemm_kernel, (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])),
           x2, weight, scale, b, out, M, N, K, row_stride(x2), weight.stride(0), N, has_bias,
           BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
           UPCAST=_upcast(x2.dtype, info), PRECISION=_precision(x2.dtype),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _input_grad(dy2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """dX = dY @ W for `[M, N]` rows of dY: `[M, K]` in dY's dtype."""
    M, N = dy2.shape
    dx = torch.empty((M, K), dtype=dy2.dtype, device=dy2.device)
    if M == 0:
        return dx
    if N == 0:
        return dx.zero_()
    info = device_info(dy2.device)
    cfg = gemm_config(dy2.dtype, info, "dx")
    launch(_qgemm_dx_kernel, (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"])),
           dy2, weight, scale, dx, M, N, K, row_stride(dy2), weight.stride(0), K,
           BITS=bits, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
           UPCAST=_upcast(dy2.dtype, info), PRECISION=_precision(dy2.dtype),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx


class _QuantLinearFn(torch.autograd.Function):
    """Gradients for x (dY @ W on the dX kernel) and the bias (dY summed in fp32); none for weight and scale."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, bits):
        K = x.shape[-1]
        out = _forward(as_rows(x, K), weight, scale, bias, bits)
        ctx.save_for_backward(weight, scale)
        ctx.bits, ctx.x_shape, ctx.bias_dtype = bits, x.shape, None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, scale = ctx.saved_tensors
        dy2 = as_rows(dy, weight.shape[0])
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(dy2, weight, scale, ctx.bits, ctx.x_shape[-1]).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dbias = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, None, None, dbias, None


def _supports(x, weight, scale, bits, bias=None):
    """None if the Triton kernels take `quant_linear(x, weight, scale, bits, bias)`, else what is wrong with it."""
    if bits not in BITS:
        return f"quant_linear: bits must be 4 or 8, got {bits!r}"
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, scale)):
        return f"quant_linear: the triton kernels take tensors in THUDM's layout, got a {type(weight).__name__} weight"
    if x.dtype not in TL_TYPE:
        return f"quant_linear: x must be fp16, bf16 or fp32, got {x.dtype}"
    if weight.dtype != torch.int8 or weight.dim() != 2:
        return f"quant_linear: weight must be a 2-D int8 tensor (THUDM layout), got {weight.dtype} " \
               f"{tuple(weight.shape)}"
    if not weight.is_contiguous():
        return f"quant_linear: weight must be contiguous (strides {weight.stride()}); copying it on every call " \
               "would cost more than the matmul"
    n, packed = weight.shape
    k = x.shape[-1] if x.dim() else 0
    if bits == 4 and k % 2:
        return f"quant_linear: 4-bit weights pack two inputs per byte, so in must be even; x has in={k}"
    if k < 1 or packed * 8 // bits != k:
        shape = f"[{n}, {k * bits // 8}]" if k > 0 else f"[{n}, in*{bits}/8]"
        return f"quant_linear: x has in={k}, so a {bits}-bit weight must be {shape}, got {tuple(weight.shape)}"
    # The kernels are compiled for 16-divisible sizes and row strides (every ChatGLM-6B linear, the LM head
    # included); other sizes would double the specialisations to compile and prove for every GPU.
    if n % 16 or k % 16 or (k * bits // 8) % 16:
        return f"quant_linear: the triton kernels take out, in and the packed row ({bits}-bit: in*{bits}/8) in " \
               f"multiples of 16, got out={n}, in={k}"
    if scale.dtype not in (torch.float16, x.dtype) or tuple(scale.shape) != (n,):
        return f"quant_linear: scale must be [{n}] fp16 or {TL_TYPE[x.dtype]} (x's dtype), got {scale.dtype} " \
               f"{tuple(scale.shape)}"
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        return f"quant_linear: bias must be [{n}] {x.dtype}, got {bias.dtype} {tuple(bias.shape)}"
    devices = {t.device for t in (x, weight, scale, bias) if t is not None}
    if len(devices) > 1:
        return f"quant_linear: x, weight, scale and bias must be on one device, got {sorted(map(str, devices))}"
    return None


@register("quant_linear", "triton", supports=_supports, min_capability=(7, 5))
def _quant_linear_triton(x, weight, scale, bits, bias=None):
    """y = x @ (q * scale)^T (+ bias): x `[..., in]`, THUDM's packed int8/int4 weight, y `[..., out]` in x's dtype."""
    reason = _supports(x, weight, scale, bits, bias)
    if reason:
        raise ValueError(reason)
    check_device(x, weight, scale, bias)
    weight, scale = aligned(weight), aligned(scale.contiguous())
    if bias is not None:
        bias = aligned(bias.contiguous())
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantLinearFn.apply(x, weight, scale, bias, bits)
    k = x.shape[-1]
    return _forward(as_rows(x, k), weight, scale, bias, bits).view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- compile specs


def _dtype(ln) -> torch.dtype:
    """x's dtype: of the output (forward kernels) or of dY (the dX kernel)."""
    return ln.arg("DY").dtype if "dx" in ln.kernel.__name__ else ln.arg("OUT").dtype


def _label(ln, consts) -> str:
    parts = [TL_TYPE[_dtype(ln)], f"scale={TL_TYPE[ln.arg('SCALE').dtype]}"]
    parts += [f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK") or k == "BITS"]
    return " ".join(parts + [f"w{ln.kwargs['num_warps']} s{ln.kwargs['num_stages']}"])


# Shapes (out, in) reaching every configuration with the specialisations of run time: `_supports` takes 16-divisible
# out, in and in*bits/8 only (every ChatGLM-6B layer), so one shape; long enough to split K in the GEMV.
SPEC_SHAPES = ((192, 512),)


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every configuration the launchers choose on `target` (default A100): the GEMV for each BLOCK_M (rows 1, 2,
    3, 8) with its split-K reduction, the GEMM forward and the dX kernel (70 rows), for bits 4 and 8, x in fp16,
    bf16 and fp32 with an fp16 scale or one in x's dtype, recorded from `_quant_linear_triton` on meta tensors.
    Each (x dtype, scale dtype) is grouped on its own (`specs_from_launches` groups by the set of dtypes, the same
    for fp16 x with fp32 partials and fp32 x with an fp16 scale)."""
    specs = []
    for dtype in DTYPES:
        for scale_dtype in sorted({torch.float16, dtype}, key=str):
            with assume_device(target or TARGETS[80]), record_launches() as launches:
                for bits in BITS:
                    for n, k in SPEC_SHAPES:
                        w = meta(n, k * bits // 8, dtype=torch.int8)
                        s, b = meta(n, dtype=scale_dtype), meta(n, dtype=dtype)
                        for rows in (1, 2, 3, 8):
                            _quant_linear_triton(meta(rows, k, dtype=dtype), w, s, bits, b)
                        x = meta(70, k, dtype=dtype).requires_grad_()
                        y = _quant_linear_triton(x, w, s, bits, b)
                        y.backward(meta(*y.shape, dtype=dtype))
            specs += specs_from_launches(launches, _label,
                                         lambda ln: {"dtype": _dtype(ln), "scale": ln.arg("SCALE").dtype})
    return specs
