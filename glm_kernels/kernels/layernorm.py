"""Alpha-residual LayerNorm of the GLM block as Triton kernels: `y = LayerNorm(x * alpha + residual)`.

Op "layernorm", same signature and semantics as `_layernorm_torch` in
`glm_kernels/ops/layernorm.py`:

    layernorm(x, residual, alpha, weight, bias, eps, return_sum=False) -> y | (y, s)

- x, residual: `[..., h]`, fp32 / fp16 / bf16, same shape and dtype, last dim
  contiguous (leading dims may be strided if they flatten to rows without a
  copy; otherwise they are copied). residual may be None: then the op is the
  plain `LayerNorm(x)` (alpha is ignored, as in the torch implementation) and
  `return_sum` returns x itself, as the torch implementation does.
- weight, bias: `[h]` or None. eps, alpha: Python floats.
- y (and s = x * alpha + residual when `return_sum`): `[..., h]` in the dtype
  of x. The sum and the statistics are computed in fp32; the sum is rounded
  to the input dtype only where it is stored, never before normalising (the
  torch op rounds x * alpha and the sum to the low dtype first).
- Gradients: x (alpha * g), residual (g), weight, bias, where g is the
  LayerNorm input gradient plus the incoming gradient of the returned sum;
  any subset of the inputs may require grad, and only what is needed is
  computed and stored.

Widths 1 <= h <= 16384 (ChatGLM-6B: 4096); wider rows raise ValueError.
BLOCK = next power of two of h, at least MIN_BLOCK = 128 (one warp of 4 elements
per thread: narrower rows are masked, and need no configurations of their own).
`ln_config(h, direction)` picks the kernels:
the whole row sits in registers up to BLOCK 8192 in the forward and BLOCK
4096 in the backward (8 resp. 4 elements per thread, BLOCK/256 resp.
BLOCK/128 warps, at most 16); wider rows would spill (the backward also
holds the dweight/dbias accumulators), so they are walked in chunks of 2048
columns by 16 warps. num_stages = 1 everywhere (no loop pipelining, no
shared-memory staging).

Bytes each launch moves, counted over all programs (what
`glm_kernels.tools.traffic.count_traffic` measures; the tests check each
formula exactly). N rows, width h, element size e of x and residual, e_w / e_b
of weight / bias; [f] = 1 when f is on, else 0; R = `rows_per_program(N)`
(1 below 256 rows, else min(16, N // 128)); P = ceil(N / R) programs.

Forward, h <= 8192, `_ln_fwd_kernel`: R consecutive rows per program, weight
and bias read once per program and held in registers. Fuses the alpha-scaled
residual add, the fp32 mean/variance, the affine transform, the optional
store of the sum, and the per-row fp32 mean/rstd the backward needs (only
written when a gradient is required):
    reads  N*h*e*(1 + [residual]) + P*h*(e_w + e_b)
    writes N*h*e*(1 + [return_sum]) + 8*N*[grad]
  Excess over the minimum (weight and bias read once): (P - 1)*h*(e_w + e_b),
  re-reads of 2*h*e shared bytes that hit L2. ChatGLM-6B prefill (N = 1024,
  h = 4096, fp16; R = 8, P = 128): 1.08x with residual, 1.12x for the plain
  LayerNorm (x only). Below 256 rows every row gets its own program
  (parallelism first), so a batch of decode rows re-reads weight and bias per
  row; a single decode row (N = 1) is exactly the minimum.
Forward, 8192 < h <= 16384, `_ln_fwd_chunked_kernel`: one row per program,
two passes over 2048-column chunks: pass 1 forms s (storing it if asked) and
merges per-chunk (count, mean, M2) with Chan's formula (no sum-of-squares
cancellation), pass 2 re-forms s and writes y:
    reads  2*N*h*e*(1 + [residual]) + N*h*(e_w + e_b)
    writes N*h*e*(1 + [return_sum]) + 8*N*[grad]
  About 2x the minimum reads: the second pass re-reads the row (96 KB at
  h = 16384 fp16 with residual, from L1/L2); the price of not spilling.

Backward, h <= 4096, `_ln_bwd_kernel`: R rows per program; fuses
g = rstd*(w*dy - xhat*mean(xhat*w*dy) - mean(w*dy)) (s re-formed in fp32 from
x and r: nothing rounded is reused), the sum's gradient, dx = alpha*g,
dresidual = g, and per-program fp32 partials of dweight = sum(dy*xhat) and
dbias = sum(dy) (no atomics; the host sums the [P, h] partials, 4*P*h bytes
each):
    reads  N*h*e*(2 + [residual] + [dsum]) + 8*N + P*h*e_w*[dx or dr]
    writes N*h*e*([dx] + [dr]) + 4*P*h*([dw] + [db])
  Excess: (P - 1)*h*e_w weight re-reads (L2) and the fp32 partials. ChatGLM-6B
  prefill with residual: 1.03x when the LayerNorm parameters are frozen
  (P-Tuning v2), 1.12x with dweight and dbias (+4.2 MB partials, summed on the
  host); a single row writes fp32 partials of 8*h bytes each.
Backward, 4096 < h <= 16384: the per-program dweight/dbias accumulators do
not fit in registers beside the row, so the backward splits as PyTorch's CUDA
LayerNorm does. `_ln_bwd_dx_kernel` (one row per program, two passes over
2048-column chunks: sums, then g, dx, dresidual):
    reads  2*N*h*(e*(2 + [residual]) + e_w) + N*h*e*[dsum] + 8*N
    writes N*h*e*([dx] + [dr])
then, if dweight or dbias is needed, `_ln_bwd_dwdb_kernel` (program = R rows
x 1024 columns, fp32 partials as above):
    reads  N*h*e*(1 + [dw]*(1 + [residual])) + 8*N*ceil(h/1024)*[dw]
    writes 4*P*h*([dw] + [db])
  dy, x, r are read twice (pass 2 and the column kernel): about 2x the
  minimum, the price of no atomics and no spills at the widest rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import register
from ..backend import TARGETS, DeviceInfo, assume_device
from .common import (DTYPES, TL_TYPE, CompileSpec, aligned, as_rows, check_device, downcast, launch, meta,
                     record_launches, residual_sum, row_stride, specs_from_launches, tensor_dtype)

MAX_H = 16384             # widest supported row
MIN_BLOCK = 128           # narrowest tile (narrower rows are masked)
WHOLE_ROW_MAX = {"fwd": 8192, "bwd": 4096}  # widest BLOCK kept whole in registers without spilling
CHUNK = 2048              # column chunk of the chunked kernels (wider rows)
DWDB_BLOCK = 1024         # column block of the split dweight/dbias kernel


# ---------------------------------------------------------------- launch configuration


def rows_per_program(n_rows: int) -> int:
    """Rows each program of the whole-row kernels handles (weight and bias are read once per program)."""
    if n_rows < 256:
        return 1
    return min(16, n_rows // 128)


def ln_config(h: int, direction: str = "fwd") -> dict:
    """Launch config of the `direction` ("fwd" / "bwd") kernels for rows of width h (the same for every dtype).

    BLOCK = next power of two of h, at least MIN_BLOCK. Up to WHOLE_ROW_MAX[direction] the row is one BLOCK in registers with
    8 (forward) or 4 (backward) elements per thread, 1 to 16 warps; wider rows are walked in chunks of
    CHUNK columns by 16 warps (``chunked``): whole 8192-wide rows spill in the backward on sm_90 (its
    dweight/dbias accumulators live beside the row) and 16384-wide ones spill in both directions.
    """
    if not 1 <= h <= MAX_H:
        raise ValueError(f"layernorm: hidden size h={h} is not supported by the triton kernels (1 <= h <= {MAX_H})")
    block = max(MIN_BLOCK, triton.next_power_of_2(h))
    if block <= WHOLE_ROW_MAX[direction]:
        # 8 elements per thread forward, 4 backward; but 8 for the 2048-wide backward (with 16 warps ptxas spilled
        # 8 bytes of the fp32 variant on sm_90)
        per_thread = 8 if direction == "fwd" or block == 2048 else 4
        return {"BLOCK": block, "chunked": False, "num_warps": min(16, max(1, block // (32 * per_thread))),
                "num_stages": 1}
    return {"BLOCK": block, "chunked": True, "CHUNK": CHUNK, "num_warps": 16, "num_stages": 1}


def dwdb_config() -> dict:
    """Config of the split dweight/dbias column kernel (chunked widths only)."""
    return {"BLOCK": DWDB_BLOCK, "num_warps": 4, "num_stages": 1}


# ---------------------------------------------------------------- kernels


# Row counts change with every call: never specialised (one compiled kernel per configuration and width class).
_ROWS = ["n_rows", "rows_per_prog"]


@triton.jit(do_not_specialize=_ROWS)
def _ln_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD,
                   n_rows, h, stride_x, stride_r, rows_per_prog, alpha, eps,
                   HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   STORE_SUM: tl.constexpr, STORE_STATS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """R consecutive rows per program: s = x*alpha + r (fp32), y = (s - mean) * rstd * w + b."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < h
    # weight and bias stay in their storage dtype across the row loop (half the registers of fp32 for
    # fp16/bf16): at BLOCK = 16384 fp32 copies beside the fp32 row would spill
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        m = cols < tl.where(row < n_rows, h, 0)  # (a scalar-bool & vector mask has a non-bool dtype in the interpreter)
        row64 = row.to(tl.int64)
        s = residual_sum(X, R, row64 * stride_x + cols, row64 * stride_r + cols, m, alpha, HAS_RES)
        if STORE_SUM:
            tl.store(S + row64 * h + cols, downcast(s, S.dtype.element_ty), mask=m)
        mean = tl.sum(s, axis=0) / h
        d = tl.where(cmask, s - mean, 0.0)
        var = tl.sum(d * d, axis=0) / h
        rstd = 1.0 / tl.sqrt(var + eps)
        y = d * rstd
        if HAS_W:
            y = y * w.to(tl.float32)
        if HAS_B:
            y = y + b.to(tl.float32)
        tl.store(Y + row64 * h + cols, downcast(y, Y.dtype.element_ty), mask=m)
        if STORE_STATS:
            tl.store(MEAN + row, mean, mask=row < n_rows)
            tl.store(RSTD + row, rstd, mask=row < n_rows)


@triton.jit(do_not_specialize=_ROWS)
def _ln_bwd_kernel(DY, DS, X, R, W, MEAN, RSTD, DX, DR, DW_PART, DB_PART,
                   n_rows, h, stride_dy, stride_ds, stride_x, stride_r, rows_per_prog, alpha,
                   HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_DSUM: tl.constexpr,
                   STORE_DX: tl.constexpr, STORE_DR: tl.constexpr, COMPUTE_DW: tl.constexpr,
                   COMPUTE_DB: tl.constexpr, BLOCK: tl.constexpr):
    """Fused backward, R rows per program, dweight/dbias partials accumulated in fp32 registers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < h
    NEED_G: tl.constexpr = STORE_DX or STORE_DR
    if HAS_W and NEED_G:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if COMPUTE_DW:
        dw = tl.zeros([BLOCK], dtype=tl.float32)
    if COMPUTE_DB:
        db = tl.zeros([BLOCK], dtype=tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        valid = row < n_rows
        m = cols < tl.where(valid, h, 0)
        row64 = row.to(tl.int64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        if NEED_G or COMPUTE_DW:
            s = residual_sum(X, R, row64 * stride_x + cols, row64 * stride_r + cols, m, alpha, HAS_RES)
            mean = tl.load(MEAN + row, mask=valid, other=0.0)
            rstd = tl.load(RSTD + row, mask=valid, other=0.0)
            xhat = tl.where(m, (s - mean) * rstd, 0.0)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
        if NEED_G:
            if HAS_W:
                wdy = w * dy
            else:
                wdy = dy
            c1 = tl.sum(xhat * wdy, axis=0) / h
            c2 = tl.sum(wdy, axis=0) / h
            g = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DSUM:
                g += tl.load(DS + row64 * stride_ds + cols, mask=m, other=0.0).to(tl.float32)
            if STORE_DR:
                tl.store(DR + row64 * h + cols, downcast(g, DR.dtype.element_ty), mask=m)
            if STORE_DX:
                tl.store(DX + row64 * h + cols, downcast((g * alpha), DX.dtype.element_ty), mask=m)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * h + cols, dw, mask=cmask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid.to(tl.int64) * h + cols, db, mask=cmask)


@triton.jit
def _ln_fwd_chunked_kernel(X, R, W, B, Y, S, MEAN, RSTD,
                           h, stride_x, stride_r, alpha, eps,
                           HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           STORE_SUM: tl.constexpr, STORE_STATS: tl.constexpr,
                           CHUNK: tl.constexpr):
    """Forward for rows wider than the register file holds: one row per program, two passes over CHUNK columns.

    Pass 1 forms s = x*alpha + r in fp32 (storing it if asked) and merges per-chunk (count, mean, M2) with
    Chan's formula (no sum-of-squares cancellation); pass 2 re-forms s and writes y.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    n_chunks = tl.cdiv(h, CHUNK)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(0, n_chunks):
        cols = c * CHUNK + offs
        m = cols < h
        s = residual_sum(X, R, row * stride_x + cols, row * stride_r + cols, m, alpha, HAS_RES)
        if STORE_SUM:
            tl.store(S + row * h + cols, downcast(s, S.dtype.element_ty), mask=m)
        n_c = tl.minimum(h - c * CHUNK, CHUNK).to(tl.float32)
        mean_c = tl.sum(s, axis=0) / n_c
        d = tl.where(m, s - mean_c, 0.0)
        m2_c = tl.sum(d * d, axis=0)
        total = count + n_c
        delta = mean_c - mean
        mean = mean + delta * (n_c / total)
        m2 = m2 + m2_c + delta * delta * (count * n_c / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / h + eps)
    if STORE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    for c in range(0, n_chunks):
        cols = c * CHUNK + offs
        m = cols < h
        s = residual_sum(X, R, row * stride_x + cols, row * stride_r + cols, m, alpha, HAS_RES)
        y = (s - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * h + cols, downcast(y, Y.dtype.element_ty), mask=m)


@triton.jit
def _dx_chunk(DY, X, R, W, row, cols, m, stride_dy, stride_x, stride_r, alpha,
              HAS_RES: tl.constexpr, HAS_W: tl.constexpr):
    """(w * dy, x * alpha + r) of one chunk of a row, in fp32: what both passes of the split backward read."""
    wdy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_W:
        wdy = wdy * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    s = residual_sum(X, R, row * stride_x + cols, row * stride_r + cols, m, alpha, HAS_RES)
    return wdy, s


@triton.jit
def _ln_bwd_dx_kernel(DY, DS, X, R, W, MEAN, RSTD, DX, DR,
                      h, stride_dy, stride_ds, stride_x, stride_r, alpha,
                      HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_DSUM: tl.constexpr,
                      STORE_DX: tl.constexpr, STORE_DR: tl.constexpr,
                      CHUNK: tl.constexpr):
    """Split backward for the widest rows, part 1: one row per program, two passes over CHUNK columns.

    Pass 1 sums xhat*w*dy and w*dy; pass 2 re-forms them and writes dx = alpha*g, dresidual = g.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    n_chunks = tl.cdiv(h, CHUNK)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc1 = tl.zeros([CHUNK], dtype=tl.float32)
    acc2 = tl.zeros([CHUNK], dtype=tl.float32)
    for c in range(0, n_chunks):
        cols = c * CHUNK + offs
        m = cols < h
        wdy, s = _dx_chunk(DY, X, R, W, row, cols, m, stride_dy, stride_x, stride_r, alpha, HAS_RES, HAS_W)
        acc1 += tl.where(m, (s - mean) * rstd, 0.0) * wdy
        acc2 += wdy
    c1 = tl.sum(acc1, axis=0) / h
    c2 = tl.sum(acc2, axis=0) / h
    for c in range(0, n_chunks):
        cols = c * CHUNK + offs
        m = cols < h
        wdy, s = _dx_chunk(DY, X, R, W, row, cols, m, stride_dy, stride_x, stride_r, alpha, HAS_RES, HAS_W)
        g = (wdy - ((s - mean) * rstd * c1 + c2)) * rstd
        if HAS_DSUM:
            g += tl.load(DS + row * stride_ds + cols, mask=m, other=0.0).to(tl.float32)
        if STORE_DR:
            tl.store(DR + row * h + cols, downcast(g, DR.dtype.element_ty), mask=m)
        if STORE_DX:
            tl.store(DX + row * h + cols, downcast((g * alpha), DX.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_ROWS)
def _ln_bwd_dwdb_kernel(DY, X, R, MEAN, RSTD, DW_PART, DB_PART,
                        n_rows, h, stride_dy, stride_x, stride_r, rows_per_prog, alpha,
                        HAS_RES: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Split backward, part 2: program (row group, column block) sums dy*xhat and dy over its rows in fp32."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < h
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row0 = pid_r * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row0 + i
        valid = row < n_rows
        m = cols < tl.where(valid, h, 0)
        row64 = row.to(tl.int64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            s = residual_sum(X, R, row64 * stride_x + cols, row64 * stride_r + cols, m, alpha, HAS_RES)
            mean = tl.load(MEAN + row, mask=valid, other=0.0)
            rstd = tl.load(RSTD + row, mask=valid, other=0.0)
            dw += dy * tl.where(m, (s - mean) * rstd, 0.0)
        if COMPUTE_DB:
            db += dy
    if COMPUTE_DW:
        tl.store(DW_PART + pid_r.to(tl.int64) * h + cols, dw, mask=cmask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid_r.to(tl.int64) * h + cols, db, mask=cmask)


# ---------------------------------------------------------------- host side


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, alpha, weight, bias, eps, return_sum, needs_stats):
        shape, h = x.shape, x.shape[-1]
        cfg = ln_config(h, "fwd")
        x2 = as_rows(x, h)
        r2 = as_rows(residual, h) if residual is not None else None
        n = x2.shape[0]
        y = torch.empty((n, h), dtype=x.dtype, device=x.device)
        s = torch.empty((n, h), dtype=x.dtype, device=x.device) if return_sum else None
        mean = torch.empty((n,), dtype=torch.float32, device=x.device) if needs_stats else None
        rstd = torch.empty((n,), dtype=torch.float32, device=x.device) if needs_stats else None
        ptrs = (x2, r2 if r2 is not None else x2, weight if weight is not None else x2,
                bias if bias is not None else x2, y, s if s is not None else y,
                mean if mean is not None else y, rstd if rstd is not None else y)
        flags = dict(HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                     STORE_SUM=s is not None, STORE_STATS=needs_stats,
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        # an absent residual's stride mirrors x's, so it specialises alike (only HAS_RES tells them apart)
        stride_r = row_stride(r2) if r2 is not None else row_stride(x2)
        if n > 0 and not cfg["chunked"]:
            rpp = rows_per_program(n)
            launch(_ln_fwd_kernel, (triton.cdiv(n, rpp),),
                   *ptrs, n, h, row_stride(x2), stride_r, rpp, float(alpha), float(eps), BLOCK=cfg["BLOCK"], **flags)
        elif n > 0:
            launch(_ln_fwd_chunked_kernel, (n,),
                   *ptrs, h, row_stride(x2), stride_r, float(alpha), float(eps), CHUNK=cfg["CHUNK"], **flags)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2, r2, weight, bias, mean, rstd)
        ctx.alpha, ctx.shape = float(alpha), shape
        if return_sum:
            return y.view(shape), s.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        x2, r2, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_r, _, need_w, need_b = ctx.needs_input_grad[:5]
        need_w, need_b = need_w and weight is not None, need_b and bias is not None
        n, h = x2.shape
        alpha = ctx.alpha if r2 is not None else 1.0
        if dy is None:  # only the returned sum was used: it is a plain add, no LayerNorm gradient
            dx = (ds.float() * alpha).to(x2.dtype) if need_x else None
            dr = ds.clone() if need_r else None
            return dx, dr, None, None, None, None, None, None
        dy2 = as_rows(dy, h)
        ds2 = as_rows(ds, h) if ds is not None else None
        dx = torch.empty((n, h), dtype=x2.dtype, device=x2.device) if need_x else None
        dr = torch.empty((n, h), dtype=x2.dtype, device=x2.device) if need_r and r2 is not None else None
        cfg = ln_config(h, "bwd")
        rpp = rows_per_program(n)
        n_prog = triton.cdiv(n, rpp) if n > 0 else 0
        dw_part = torch.empty((n_prog, h), dtype=torch.float32, device=x2.device) if need_w else None
        db_part = torch.empty((n_prog, h), dtype=torch.float32, device=x2.device) if need_b else None
        dummy = dy2
        x_ptrs = (dy2, ds2 if ds2 is not None else dummy, x2, r2 if r2 is not None else dummy,
                  weight if weight is not None else dummy, mean, rstd,
                  dx if dx is not None else dummy, dr if dr is not None else dummy)
        strides = (row_stride(dy2), row_stride(ds2) if ds2 is not None else row_stride(dy2), row_stride(x2),
                   row_stride(r2) if r2 is not None else row_stride(x2))
        flags = dict(HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_DSUM=ds2 is not None,
                     STORE_DX=dx is not None, STORE_DR=dr is not None,
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        parts = (dw_part if dw_part is not None else mean, db_part if db_part is not None else mean)
        if n > 0 and not cfg["chunked"]:
            launch(_ln_bwd_kernel, (n_prog,), *x_ptrs, *parts, n, h, *strides, rpp, alpha,
                   COMPUTE_DW=need_w, COMPUTE_DB=need_b, BLOCK=cfg["BLOCK"], **flags)
        elif n > 0:
            if dx is not None or dr is not None:
                launch(_ln_bwd_dx_kernel, (n,), *x_ptrs, h, *strides, alpha, CHUNK=cfg["CHUNK"], **flags)
            if need_w or need_b:
                dcfg = dwdb_config()
                launch(_ln_bwd_dwdb_kernel, (n_prog, triton.cdiv(h, dcfg["BLOCK"])),
                       dy2, x2, r2 if r2 is not None else dummy, mean, rstd, *parts,
                       n, h, strides[0], strides[2], strides[3], rpp, alpha,
                       HAS_RES=r2 is not None, COMPUTE_DW=need_w, COMPUTE_DB=need_b, BLOCK=dcfg["BLOCK"],
                       num_warps=dcfg["num_warps"], num_stages=dcfg["num_stages"])
        dweight = dw_part.sum(0).to(weight.dtype) if need_w else None
        dbias = db_part.sum(0).to(bias.dtype) if need_b else None
        dx = dx.view(ctx.shape) if dx is not None else None
        dr = dr.view(ctx.shape) if dr is not None else None
        return dx, dr, None, dweight, dbias, None, None, None


def _supports(x, residual, alpha, weight, bias, eps, return_sum=False):
    """None if the Triton LayerNorm takes this call, else why not."""
    if x.dtype not in TL_TYPE:
        return f"layernorm: unsupported dtype {x.dtype}; expected fp32, fp16 or bf16"
    if not 1 <= x.shape[-1] <= MAX_H:
        return f"layernorm: hidden size h={x.shape[-1]} is not supported by the triton kernels (1 <= h <= {MAX_H})"
    return None


@register("layernorm", "triton", supports=_supports)
def _layernorm_triton(x, residual, alpha, weight, bias, eps, return_sum=False):
    """`LayerNorm(x * alpha + residual)` (plain `LayerNorm(x)` when residual is None) on the Triton kernels.

    x, residual `[..., h]` fp32/fp16/bf16, weight/bias `[h]` or None; returns y `[..., h]` in the dtype of
    x, or `(y, x * alpha + residual)` with `return_sum` (x itself when residual is None, like the torch op).
    """
    check_device(x, residual, weight, bias)
    if x.dtype not in TL_TYPE:
        raise TypeError(f"layernorm: unsupported dtype {x.dtype}; expected fp32, fp16 or bf16")
    h = x.shape[-1]
    ln_config(h)  # ValueError for unsupported widths before anything runs
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layernorm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (h,):
            raise ValueError(f"layernorm: {name} has shape {tuple(p.shape)}, expected ({h},)")
    weight, bias = aligned(weight), aligned(bias)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    needs_stats = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    sum_out = return_sum and residual is not None
    out = _LayerNormFn.apply(x, residual, alpha, weight, bias, eps, sum_out, needs_stats)
    if return_sum and residual is None:
        return out, x
    return out


# ---------------------------------------------------------------- ahead-of-time compilation


def _widths(block: int) -> list[int]:
    """Row widths reaching the BLOCK `block`: 16-divisible and not (both specialisations occur), within (block/2, block]."""
    widths = (block, block - 1, block // 2 + 1, 1, 2) if block == MIN_BLOCK else (block, block - 1, block // 2 + 1)
    return sorted({w for w in widths if max(MIN_BLOCK, triton.next_power_of_2(w)) == block})


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every configuration `ln_config` (both directions) and `dwdb_config` can return (the same on every GPU), for
    fp16, bf16 and fp32, recorded from the launchers on meta tensors at widths of every BLOCK = 2**k
    (1 <= h <= MAX_H), 16-divisible and not.

    Each is recorded with every feature flag on (residual, weight, bias, sum and stats stores; all four
    gradients and the sum gradient): the variant with the most live registers, the flags only remove code.
    """
    with assume_device(target or TARGETS[80]), record_launches() as launches:
        for dtype in DTYPES:
            for k in range(int(math.log2(MIN_BLOCK)), int(math.log2(MAX_H)) + 1):
                for h in _widths(2 ** k):
                    x, r = (meta(3, 5, h, dtype=dtype).requires_grad_() for _ in range(2))
                    w, b = (meta(h, dtype=dtype).requires_grad_() for _ in range(2))
                    y, s = _layernorm_triton(x, r, 7.5, w, b, 1e-5, return_sum=True)
                    torch.autograd.backward((y, s), (meta(*y.shape, dtype=dtype), meta(*s.shape, dtype=dtype)))

    def label(ln, consts):
        block = consts.get("BLOCK", consts.get("CHUNK"))
        name = ln.kernel.__name__ if hasattr(ln.kernel, "__name__") else ln.kernel.fn.__name__
        kind = "CHUNK" if "CHUNK" in consts else "BLOCK"
        wide = f"BLOCK>{WHOLE_ROW_MAX['bwd' if 'bwd' in name else 'fwd']} " if kind == "CHUNK" else ""
        return f"{TL_TYPE[tensor_dtype(ln)]} {wide}{kind}={block} warps={ln.kwargs['num_warps']}"

    return specs_from_launches(launches, label, lambda ln: {"dtype": tensor_dtype(ln)})
