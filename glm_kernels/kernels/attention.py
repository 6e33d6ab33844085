"""GLM attention in Triton: flash-style forward and backward, and split-K decoding.

One pass over the keys `[past | new]` for each block of queries, with an
online softmax (fp32 running max, sum and accumulator); the `[sq, sk]` scores
and probabilities are never written. Keys come from two tensors, the past
(P-Tuning prefix, then cached tokens) and the new tokens, so nothing is
concatenated; a key tile that straddles the two is loaded with two disjoint
masked loads.

Shapes (any strides with a unit last stride): q `[sq, b, nh, hd]`, new k/v
`[sk, b, nh, hd]`, past k/v `[La, b, nh, hd]`; output `[sq, b, nh*hd]`,
ready for the `dense` projection. hd in {32, 64, 128}; fp32, fp16, bf16
(`_supports` says why any other call is not taken; in automatic mode the
backend then runs the PyTorch op).

Masks (constexpr `MASK_MODE`):
1 `GLMMask`, computed in the kernel from the prefix length and each row's
  left padding and context length (never materialised). No mask at all is
  the GLM mask whose prefix covers every key (P = L, not causal): every
  column visible, at the cost of a few integer compares per score;
2 an explicit boolean mask `[b or 1, 1, sq, La + sk]` (one byte per entry).
A masked logit is the original's finite fill, `-10000 * (layer_id + 1)` in
natural-log units, so a row with every key masked is uniform, never NaN.
Scores are `q.k / sqrt(hd)` accumulated in fp32 (the layer coefficient of
the original cancels; it only protected fp16 scores from overflow).

Backward recomputes the probabilities from the saved log-sum-exp (FA2 split:
a dK/dV kernel over key blocks, a dQ kernel over query blocks), giving
gradients for q, the new k/v and the past k/v (the P-Tuning prefix). With a
causal GLM mask both skip what no row can see: the dQ kernel stops at the
last key its tile sees, the dK/dV kernel starts at the first query block that
sees its key block (prefix and context columns are seen by every row; left
padding rows without a prefix attend uniformly to every key and are always
visited for dV).

Decoding (sq = 1, no gradient) uses a split-K variant: each program reduces a
chunk of the keys of one head to (max, sum, partial output) with vector
products, and a second kernel combines the chunks: no 16/64-row query tile
is wasted on one query. Every integer that changes from one step to the next
(past length, keys per split, number of splits) is in `do_not_specialize`:
a 2048-token generation compiles each kernel once.

Offsets: every `index * stride` is formed in int64 (a KV cache of b*L*nh*hd
elements passes 2^31 at b*L > 2^19 for the 6B shapes).

Launch configurations depend on the GPU (`backend.device_info`): fp16/bf16 on
sm_80+ use tensor cores (`tl.dot` -> MMA) and large tiles where shared
memory allows (163/227 KiB on sm_80/sm_90, 99 KiB on sm_86/sm_89); on sm_75
(64 KiB, no MMA from Triton) and for fp32 (IEEE `tl.dot` is FMA on every
GPU) smaller tiles keep the accumulators in registers without spills.
`compile_specs(target)` records every configuration the launchers choose on
that target; `glm-kernels compile-report` proves they fit.

Bytes (e = element size, H = b*nh heads, L = La + sk keys, M = mask bytes):
- forward: reads q `sq*H*hd*e` + keys and values `2*L*H*hd*e` per query block
  (`ceil(sq/BLOCK_M)` times; a reload from L2 on a GPU, once from DRAM) +
  pad and context (8 bytes per program) + masks (mode 2: `b*sq*L`), writes
  o `sq*H*hd*e` + lse `sq*H*4`. Minimum: q + k + v + o; the extra is the
  4-byte lse per query row (4/(hd*e) of o: 1.6% at hd=128 fp16), kept for
  the backward.
- decode: reads q, k, v once (`(1 + 2L)*H*hd*e`) and 8 bytes per program,
  writes partials `splits*H*(hd+2)*4` and reads them back, writes o `H*hd*e`.
See docs/kernels.md for the figures at the 6B shapes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import TARGETS, DeviceInfo, assume_device, device_info, register
from ..ops.mask import GLMMask
from .common import (DTYPES, TL_TYPE, CompileSpec, check_device, dot_upcast, downcast, launch, meta,
                     record_launches, specs_from_launches, strides, tensor_dtype)

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
MASK_GLM, MASK_BOOL = 1, 2
MASK_NAMES = {MASK_GLM: "glm", MASK_BOOL: "bool"}


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _head(nh, AXIS: tl.constexpr):
    """(bh, b, h) of this program: program axis AXIS runs over batch x heads; b and h as int64."""
    bh = tl.program_id(AXIS)
    return bh, (bh // nh).to(tl.int64), (bh % nh).to(tl.int64)


@triton.jit
def _pad_ctx(PAD, CTX, b, MASK_MODE: tl.constexpr):
    """Left padding and context length of batch row b (GLM mask), zeros otherwise."""
    pad = 0
    ctx = 0
    if MASK_MODE == 1:
        pad = tl.load(PAD + b)
        ctx = tl.load(CTX + b)
    return pad, ctx


@triton.jit
def _tile(base, idx, stride, d):
    """Pointers `[len(idx), HD]` of rows `idx` (int64 offsets) of a tensor with unit last stride."""
    return base + idx.to(tl.int64)[:, None] * stride + d[None, :]


@triton.jit
def _visible(rows, cols, t_q, P, pad, ctx, causal, MB, stride_mq, stride_mk, row_ok, col_ok,
             MASK_MODE: tl.constexpr):
    """Bool `[BLOCK_M, BLOCK_N]`: may query `rows` attend the global key columns `cols`."""
    if MASK_MODE == 1:
        t_k = cols - P
        vis = (t_q[:, None] >= pad) & (t_k[None, :] >= pad)
        vis = vis & ((t_k[None, :] < ctx) | (t_k[None, :] <= t_q[:, None]) | (causal == 0))
        vis = vis | (cols < P)[None, :]
    else:
        m = tl.load(MB + rows.to(tl.int64)[:, None] * stride_mq + cols.to(tl.int64)[None, :] * stride_mk,
                    mask=row_ok[:, None] & col_ok[None, :], other=1)
        vis = m == 0
    return vis


@triton.jit
def _row_limits(pad, ctx, pid_m, sq, L, P, causal, BLOCK_M: tl.constexpr, MASK_MODE: tl.constexpr,
                KEEP_UNIFORM: tl.constexpr):
    """Key columns `[0, hi)` a query tile needs.

    With a causal GLM mask, keys past the last one any row of the tile can see
    are skipped. KEEP_UNIFORM (the forward): not when the tile holds padding
    rows without a prefix, which attend uniformly to every key.
    """
    hi = L
    if MASK_MODE == 1:
        T = L - P
        last_tq = T - sq + tl.minimum(pid_m * BLOCK_M + BLOCK_M, sq) - 1
        skip = causal != 0
        if KEEP_UNIFORM:
            skip = skip & ((P != 0) | (T - sq + pid_m * BLOCK_M >= pad))
        hi = tl.where(skip, tl.minimum(L, P + tl.maximum(last_tq + 1, ctx)), L)
    return hi


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, hi, col0, rows, row_ok, t_q, P, pad, ctx, causal,
                 mb, stride_mq, stride_mk, qk_scale, masked_value, d,
                 BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of one query tile with keys `0 .. hi-1` of one segment (global column col0 + j)."""
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        k = tl.load(_tile(K, j, stride_ks, d), mask=ok[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        vis = _visible(rows, col0 + j, t_q, P, pad, ctx, causal, mb, stride_mq, stride_mk, row_ok, ok, MASK_MODE)
        qk = tl.where(vis, qk, masked_value)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile(V, j, stride_vs, d), mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(downcast(p, v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_segment(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, hi, col0, rows, row_ok, t_q, P, pad, ctx, causal,
                mb, stride_mq, stride_mk, qk_scale, masked_value, d,
                BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        k = tl.load(_tile(K, j, stride_ks, d), mask=ok[:, None], other=0.0)
        v = tl.load(_tile(V, j, stride_vs, d), mask=ok[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        vis = _visible(rows, col0 + j, t_q, P, pad, ctx, causal, mb, stride_mq, stride_mk, row_ok, ok, MASK_MODE)
        qk = tl.where(vis, qk, masked_value)
        p = tl.where(ok[None, :], tl.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = tl.where(vis, p * (dp - delta[:, None]), 0.0)  # the constant fill blocks the gradient of masked scores
        dq += _dot(downcast(ds, k.dtype), k, UPCAST, PRECISION)
    return dq


# ----------------------------------------------------------------------------- forward

# Integers that change from call to call (lengths, counts) and the mask's layout: never specialised, so a new
# length or mask never recompiles. Tensor strides and pointers are specialised (16-divisible: the launcher
# guarantees it, see `_aligned`).
_SIZES = ["sq", "La", "L", "P", "nh", "causal", "MB", "stride_mb", "stride_mq"]


@triton.jit(do_not_specialize=_SIZES)
def _attn_fwd(Q, PK, PV, K, V, O, LSE, PAD, CTX, MB,
              sq, La, L, P, nh, causal,
              stride_qs, stride_qb, stride_qh,
              stride_pks, stride_pkb, stride_pkh, stride_pvs, stride_pvb, stride_pvh,
              stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
              stride_os, stride_ob, stride_mb, stride_mq, stride_mk,
              qk_scale, masked_value,
              HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = _head(nh, 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = rows < sq
    q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qs, d), mask=row_ok[:, None], other=0.0)
    t_q = L - P - sq + rows
    pad, ctx = _pad_ctx(PAD, CTX, b, MASK_MODE)
    hi = _row_limits(pad, ctx, pid_m, sq, L, P, causal, BLOCK_M, MASK_MODE, True)
    mb = MB + b * stride_mb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, PK + b * stride_pkb + h * stride_pkh,
                                 PV + b * stride_pvb + h * stride_pvh, stride_pks, stride_pvs, tl.minimum(La, hi), 0,
                                 rows, row_ok, t_q, P, pad, ctx, causal, mb, stride_mq, stride_mk, qk_scale,
                                 masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                                 stride_ks, stride_vs, tl.maximum(hi - La, 0), La, rows, row_ok, t_q, P, pad, ctx,
                                 causal, mb, stride_mq, stride_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE,
                                 UPCAST, PRECISION)
    out = acc / l_i[:, None]
    tl.store(_tile(O + b * stride_ob + h * HD, rows, stride_os, d), downcast(out, O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * sq + rows, m_i + tl.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["sq", "nh"])
def _attn_bwd_delta(O, DO, DELTA, sq, nh, stride_os, stride_ob, stride_dos, stride_dob,
                    HD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[bh, i] = sum_d dO * O (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh, b, h = _head(nh, 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    ok = rows < sq
    o = tl.load(_tile(O + b * stride_ob + h * HD, rows, stride_os, d), mask=ok[:, None], other=0.0)
    do = tl.load(_tile(DO + b * stride_dob + h * HD, rows, stride_dos, d), mask=ok[:, None], other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * sq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _kv_segment(K, V, DK, DV, b, h, stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
                stride_gs, stride_gb, stride_gh):
    """Head (b, h) of one key segment (past or new): its K, V, dK, dV pointers and row strides."""
    return (K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, DK + b * stride_gb + h * stride_gh,
            DV + b * stride_gb + h * stride_gh, stride_ks, stride_vs, stride_gs)


@triton.jit
def _dkdv_rows(dk, dv, start, k, v, cols, ok, q_base, do_base, LSE, DELTA, bh, sq, T, P, pad, ctx, causal,
               mb, stride_qs, stride_dos, stride_mq, stride_mk, qk_scale, masked_value, d,
               BLOCK_M: tl.constexpr, MASK_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add one block of queries `[start, start + BLOCK_M)` to dK, dV of a key block."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < sq
    t_q = T - sq + rows
    q = tl.load(_tile(q_base, rows, stride_qs, d), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(do_base, rows, stride_dos, d), mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * sq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
    qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    vis = _visible(rows, cols, t_q, P, pad, ctx, causal, mb, stride_mq, stride_mk, row_ok, ok, MASK_MODE)
    qk = tl.where(vis, qk, masked_value)
    p = tl.where(ok[None, :], tl.exp2(qk - lse[:, None]), 0.0)
    dv += _dot(tl.trans(downcast(p, do.dtype)), do, UPCAST, PRECISION)
    dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
    ds = tl.where(vis, p * (dp - delta[:, None]), 0.0)  # the constant fill blocks the gradient of masked scores
    dk += _dot(tl.trans(downcast(ds, q.dtype)), q, UPCAST, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_SIZES + ["blocks_past"])
def _attn_bwd_dkdv(Q, PK, PV, K, V, DO, LSE, DELTA, DPK, DPV, DK, DV, PAD, CTX, MB,
                   sq, La, L, P, nh, causal, blocks_past,
                   stride_qs, stride_qb, stride_qh,
                   stride_pks, stride_pkb, stride_pkh, stride_pvs, stride_pvb, stride_pvh,
                   stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
                   stride_dos, stride_dob, stride_mb, stride_mq, stride_mk,
                   stride_dps, stride_dpb, stride_dph, stride_dks, stride_dkb, stride_dkh,
                   qk_scale, sm_scale, masked_value,
                   HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys (of the past or of the new segment) over the queries that can see it."""
    pid_n = tl.program_id(0)
    bh, b, h = _head(nh, 1)
    if pid_n < blocks_past:
        Kp, Vp, DKp, DVp, stride_k, stride_v, stride_g = _kv_segment(
            PK, PV, DPK, DPV, b, h, stride_pks, stride_pkb, stride_pkh, stride_pvs, stride_pvb, stride_pvh,
            stride_dps, stride_dpb, stride_dph)
        j0 = pid_n * BLOCK_N
        n = La
        col0 = 0
    else:
        Kp, Vp, DKp, DVp, stride_k, stride_v, stride_g = _kv_segment(
            K, V, DK, DV, b, h, stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
            stride_dks, stride_dkb, stride_dkh)
        j0 = (pid_n - blocks_past) * BLOCK_N
        n = L - La
        col0 = La
    j = j0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HD)
    ok = j < n
    cols = col0 + j
    k = tl.load(_tile(Kp, j, stride_k, d), mask=ok[:, None], other=0.0)
    v = tl.load(_tile(Vp, j, stride_v, d), mask=ok[:, None], other=0.0)
    T = L - P
    pad, ctx = _pad_ctx(PAD, CTX, b, MASK_MODE)
    # Query blocks to visit: with a causal GLM mask, a key block of tokens at or after the context is seen only by
    # queries at or after its first token (prefix and context columns are seen by every row); left padding rows
    # of a prefix-less mask see every key uniformly (their dV terms are not zero), so they are always visited.
    row_lo = 0
    uniform_hi = 0
    if MASK_MODE == 1:
        first_t = col0 + j0 - P
        skip = (causal != 0) & (first_t >= 0) & (first_t >= ctx)
        row_lo = tl.where(skip, tl.minimum(tl.maximum(first_t - (T - sq), 0), sq), 0) // BLOCK_M * BLOCK_M
        uniform_hi = tl.where(skip & (P == 0), tl.minimum(tl.maximum(pad - (T - sq), 0), sq), 0)
    uniform_end = tl.cdiv(uniform_hi, BLOCK_M) * BLOCK_M
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * HD
    mb = MB + b * stride_mb
    dk = tl.zeros([BLOCK_N, HD], tl.float32)
    dv = tl.zeros([BLOCK_N, HD], tl.float32)
    for start in range(0, uniform_end, BLOCK_M):
        dk, dv = _dkdv_rows(dk, dv, start, k, v, cols, ok, q_base, do_base, LSE, DELTA, bh, sq, T, P, pad, ctx,
                            causal, mb, stride_qs, stride_dos, stride_mq, stride_mk, qk_scale, masked_value, d,
                            BLOCK_M, MASK_MODE, UPCAST, PRECISION)
    for start in range(tl.maximum(row_lo, uniform_end), sq, BLOCK_M):
        dk, dv = _dkdv_rows(dk, dv, start, k, v, cols, ok, q_base, do_base, LSE, DELTA, bh, sq, T, P, pad, ctx,
                            causal, mb, stride_qs, stride_dos, stride_mq, stride_mk, qk_scale, masked_value, d,
                            BLOCK_M, MASK_MODE, UPCAST, PRECISION)
    dk = dk * sm_scale
    tl.store(_tile(DKp, j, stride_g, d), downcast(dk, DK.dtype.element_ty), mask=ok[:, None])
    tl.store(_tile(DVp, j, stride_g, d), downcast(dv, DV.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=_SIZES)
def _attn_bwd_dq(Q, PK, PV, K, V, DO, LSE, DELTA, DQ, PAD, CTX, MB,
                 sq, La, L, P, nh, causal,
                 stride_qs, stride_qb, stride_qh,
                 stride_pks, stride_pkb, stride_pkh, stride_pvs, stride_pvb, stride_pvh,
                 stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
                 stride_dos, stride_dob, stride_mb, stride_mq, stride_mk, stride_dqs, stride_dqb, stride_dqh,
                 qk_scale, sm_scale, masked_value,
                 HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = _head(nh, 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = rows < sq
    q = tl.load(_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qs, d), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(DO + b * stride_dob + h * HD, rows, stride_dos, d), mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * sq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
    t_q = L - P - sq + rows
    pad, ctx = _pad_ctx(PAD, CTX, b, MASK_MODE)
    # dS is zero on masked keys (fully masked rows included), so no row needs the keys past `hi`
    hi = _row_limits(pad, ctx, pid_m, sq, L, P, causal, BLOCK_M, MASK_MODE, False)
    mb = MB + b * stride_mb
    dq = tl.zeros([BLOCK_M, HD], tl.float32)
    dq = _dq_segment(dq, q, do, lse, delta, PK + b * stride_pkb + h * stride_pkh, PV + b * stride_pvb + h * stride_pvh,
                     stride_pks, stride_pvs, tl.minimum(La, hi), 0, rows, row_ok, t_q, P, pad, ctx, causal, mb,
                     stride_mq, stride_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    dq = _dq_segment(dq, q, do, lse, delta, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                     stride_ks, stride_vs, tl.maximum(hi - La, 0), La, rows, row_ok, t_q, P, pad, ctx, causal, mb,
                     stride_mq, stride_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(_tile(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dqs, d), downcast(dq, DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------- decoding


@triton.jit
def _decode_segment(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, lo, hi, col0, t_q, P, pad, ctx, causal, mb,
                    stride_mk, qk_scale, masked_value, d, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        cols = col0 + j
        k = tl.load(_tile(K, j, stride_ks, d), mask=ok[:, None], other=0.0).to(tl.float32)
        qk = tl.sum(q[None, :] * k, 1) * qk_scale
        if MASK_MODE == 1:
            t_k = cols - P
            vis = (t_q >= pad) & (t_k >= pad) & ((t_k < ctx) | (t_k <= t_q) | (causal == 0))
            vis = vis | (cols < P)
        else:
            vis = tl.load(mb + cols.to(tl.int64) * stride_mk, mask=ok, other=1) == 0
        qk = tl.where(vis, qk, masked_value)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        v = tl.load(_tile(V, j, stride_vs, d), mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["La", "L", "P", "nh", "causal", "tiles_per_split", "num_splits", "MB", "stride_mb"])
def _attn_decode_partial(Q, PK, PV, K, V, PART, PAD, CTX, MB,
                         La, L, P, nh, causal, tiles_per_split, num_splits,
                         stride_qb, stride_qh,
                         stride_pks, stride_pkb, stride_pkh, stride_pvs, stride_pvb, stride_pvh,
                         stride_ks, stride_kb, stride_kh, stride_vs, stride_vb, stride_vh,
                         stride_mb, stride_mk,
                         qk_scale, masked_value,
                         HD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr):
    """One query per head: (max, sum, un-normalised output) over one chunk of the keys."""
    split = tl.program_id(0)
    bh, b, h = _head(nh, 1)
    d = tl.arange(0, HD)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32)
    t_q = L - P - 1
    pad, ctx = _pad_ctx(PAD, CTX, b, MASK_MODE)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, L)
    mb = MB + b * stride_mb
    m_i = tl.zeros([], tl.float32) - float("inf")
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([HD], tl.float32)
    acc, m_i, l_i = _decode_segment(acc, m_i, l_i, q, PK + b * stride_pkb + h * stride_pkh,
                                    PV + b * stride_pvb + h * stride_pvh, stride_pks, stride_pvs,
                                    tl.minimum(lo, La), tl.minimum(hi, La), 0, t_q, P, pad, ctx,
                                    causal, mb, stride_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE)
    acc, m_i, l_i = _decode_segment(acc, m_i, l_i, q, K + b * stride_kb + h * stride_kh,
                                    V + b * stride_vb + h * stride_vh, stride_ks, stride_vs,
                                    tl.maximum(lo - La, 0), tl.maximum(hi - La, 0), La, t_q, P, pad,
                                    ctx, causal, mb, stride_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE)
    base = PART + (bh.to(tl.int64) * num_splits + split) * (HD + 2)
    tl.store(base + d, acc)
    tl.store(base + HD, m_i)
    tl.store(base + HD + 1, l_i)


@triton.jit(do_not_specialize=["nh", "num_splits"])
def _attn_decode_combine(PART, O, nh, num_splits, stride_ob,
                         HD: tl.constexpr, SPLITS: tl.constexpr):
    bh, b, h = _head(nh, 0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HD)
    ok = s < num_splits
    base = PART + bh.to(tl.int64) * num_splits * (HD + 2)
    m = tl.load(base + s * (HD + 2) + HD, mask=ok, other=float("-inf"))
    l_s = tl.load(base + s * (HD + 2) + HD + 1, mask=ok, other=0.0)
    acc = tl.load(base + s[:, None] * (HD + 2) + d[None, :], mask=ok[:, None], other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(ok, tl.exp2(m - m_all), 0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l_s, 0)
    tl.store(O + b * stride_ob + h * HD + d, downcast(out, O.dtype.element_ty))


# ----------------------------------------------------------------------------- launch configuration
#
# One table per kind of GPU, chosen by `_kind(dtype, info)`. Every entry was compiled for the targets of its
# kind with `glm-kernels compile-report` (no spills, shared memory within the limit); keys are head dims.
#   "mma":       fp16/bf16 on sm_80+ with >= 160 KiB of shared memory per block (A100, H100);
#   "mma_99k":   fp16/bf16 on sm_80+ with less (RTX 30xx/40xx, A10, L4: 99 KiB);
#   "fma":       no tensor cores from Triton: fp32 (IEEE `tl.dot` is FMA everywhere) on sm_80+;
#   "fma_64k":   fp16/bf16/fp32 on sm_75 (T4: 64 KiB, FMA dots).
# fwd: (BLOCK_M, BLOCK_N, warps, stages) for every query count (a short prompt is one tile per head either way:
# its time is the key loop's loads, not the idle MMA rows); bool masks halve BLOCK_N
# (a [BLOCK_M, BLOCK_N] tile of mask pointers). bwd: dK/dV (BLOCK_M, BLOCK_N, warps) + dQ (BLOCK_M, BLOCK_N, warps)
# + stages.
FWD = {
    "mma": {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2)},
    "mma_99k": {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2)},
    "fma": {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 8, 1)},
    "fma_64k": {32: (32, 16, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 8, 1)},
}
BWD = {
    "mma": {32: (32, 64, 4, 64, 32, 4, 2), 64: (32, 64, 4, 64, 32, 4, 2), 128: (32, 32, 8, 64, 32, 8, 2)},
    "mma_99k": {32: (32, 64, 4, 64, 32, 4, 2), 64: (32, 64, 8, 64, 32, 4, 2), 128: (32, 32, 8, 64, 32, 8, 2)},
    "fma": {32: (16, 16, 4, 32, 16, 4, 1), 64: (16, 32, 4, 32, 16, 4, 1), 128: (16, 32, 8, 32, 16, 8, 1)},
    "fma_64k": {32: (16, 32, 4, 32, 16, 4, 1), 64: (16, 32, 8, 32, 16, 4, 1), 128: (32, 16, 8, 16, 16, 8, 1)},
}


def _kind(dtype: torch.dtype, info: DeviceInfo) -> str:
    if not info.tensor_cores:
        return "fma_64k"
    if dtype == torch.float32:
        return "fma"
    return "mma" if info.shared_memory >= 160 * 1024 else "mma_99k"


def fwd_config(sq: int, hd: int, dtype: torch.dtype = torch.float16, mask_mode: int = MASK_GLM,
               info: DeviceInfo | None = None) -> dict:
    """Block sizes, warps and stages of the forward kernel on the GPU `info` (default: the interpreter's, A100).
    The same for every query count `sq` (kept in the signature for the callers that pass it)."""
    info = info or TARGETS[80]
    block_m, block_n, warps, stages = FWD[_kind(dtype, info)][hd]
    if mask_mode == MASK_BOOL:
        block_n = max(16, block_n // 2)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def bwd_config(hd: int, dtype: torch.dtype = torch.float16, info: DeviceInfo | None = None) -> dict:
    """dK/dV: BLOCK_N_KV keys per program, queries in BLOCK_M_KV steps; dQ: BLOCK_M_Q queries, BLOCK_N_Q keys."""
    info = info or TARGETS[80]
    m_kv, n_kv, warps_kv, m_q, n_q, warps_q, stages = BWD[_kind(dtype, info)][hd]
    return {"BLOCK_M_KV": m_kv, "BLOCK_N_KV": n_kv, "num_warps_kv": warps_kv, "BLOCK_M_Q": m_q, "BLOCK_N_Q": n_q,
            "num_warps_q": warps_q, "num_stages": stages}


DECODE_MAX_SPLITS = 64
DELTA_BLOCK_M = 16


def decode_block_n(hd: int) -> int:
    """Keys per step of the decode kernel: at most a 1024-element tile (no spills at 4 warps)."""
    return max(16, 1024 // hd)


def decode_config(heads: int, L: int, hd: int) -> tuple[int, int]:
    """(num_splits, tiles_per_split): enough programs to fill a GPU (~256), a few key tiles each."""
    tiles = triton.cdiv(L, decode_block_n(hd))
    splits = max(1, min(DECODE_MAX_SPLITS, triton.cdiv(256, heads), tiles))
    per = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per), per


# ----------------------------------------------------------------------------- host side


_ZEROS: dict = {}


def _zeros(b: int, device: torch.device) -> torch.Tensor:
    """A `[2, b]` int32 zero tensor on `device`, made once: rows 0 and 1 are the pad and context of a mask-free
    call (every layer of every decode step would otherwise allocate and fill one). Never written by the kernels."""
    key = (b, torch.device(device))
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(2, b, dtype=torch.int32, device=device)
    return _ZEROS[key]


def _prepare_mask(mask, b, sq, La, L, device):
    """(MASK_MODE, pad, ctx, P, causal, mask_u8, stride_mb, stride_mq, stride_mk)."""
    if mask is None:  # every key visible: the GLM mask whose prefix is every column, not causal
        zeros = _zeros(b, device)
        return MASK_GLM, zeros[0], zeros[1], L, 0, zeros, 0, 0, 0
    if isinstance(mask, GLMMask):
        if mask.prefix_len > L:
            raise ValueError(f"GLMMask.prefix_len={mask.prefix_len} exceeds the {L} keys")
        if mask.batch != b:
            raise ValueError(f"GLMMask is for batch {mask.batch}, the attention has batch {b}")
        pad = mask.pad.to(device=device, dtype=torch.int32).contiguous()
        ctx = mask.context.to(device=device, dtype=torch.int32).contiguous()
        return MASK_GLM, pad, ctx, mask.prefix_len, int(mask.causal), pad, 0, 0, 0
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or \
            tuple(mask.shape[2:]) != (sq, L):
        raise ValueError(f"attention mask must be bool [{b} or 1, 1, {sq}, {L}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    m = mask.view(torch.uint8)
    if m.stride(-1) != 1 and L > 1:
        m = m.contiguous()
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    stride_mb = m.stride(0) if m.shape[0] == b and b > 1 else 0
    return MASK_BOOL, dummy, dummy, 0, 1, m, stride_mb, m.stride(2), 1


def _aligned(t):
    """`t` with a unit last stride, a 16-byte aligned start and 16-divisible strides (a copy when it has not):
    the one specialisation the kernels are compiled for (every tensor the model passes has it already)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 16 for s in strides(t)):
        t = t.contiguous()
    return t


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype, info: DeviceInfo) -> bool:
    """Cast tiles to fp32 before `tl.dot`: under the interpreter for bf16 (its bf16 dot is broken), and on GPUs
    without tensor cores from Triton (sm_75), where a dot is FMAs in fp32 anyway: the same products (fp16/bf16
    products are exact in fp32) without holding both the 16-bit and the fp32 copies of the operands, which
    spilled the dQ kernel at hd 128."""
    return dot_upcast(dtype) or (dtype != torch.float32 and not info.tensor_cores)


def _supports(q, k, v, layer_id, mask, output_attentions, past_k=None, past_v=None):
    """None if the Triton attention takes this call, else why not (the backend then runs the PyTorch op)."""
    if q.dim() != 4:
        return f"q must be [sq, b, nh, hd], got shape {tuple(q.shape)}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the triton attention supports head dims {HEAD_DIMS}, got {q.shape[-1]}"
    if q.dtype not in TL_TYPE:
        return f"the triton attention supports {', '.join(TL_TYPE.values())}, got {q.dtype}"
    if mask is not None and not isinstance(mask, GLMMask) and mask.dtype != torch.bool:
        return f"the mask must be a GLMMask or bool, got {mask.dtype}"
    return None


def _check(q, k, v, past_k, past_v):
    sq, b, nh, hd = q.shape
    reason = _supports(q, k, v, 0, None, False)
    if reason:
        raise ValueError(reason)
    for name, t in (("k", k), ("v", v), ("past_k", past_k), ("past_v", past_v)):
        if t is None:
            continue
        if t.dim() != 4 or tuple(t.shape[1:]) != (b, nh, hd) or t.dtype != q.dtype:
            raise ValueError(f"{name} must be [len, {b}, {nh}, {hd}] {q.dtype}, got {t.dtype} {tuple(t.shape)}")
    if (past_k is None) != (past_v is None):
        raise ValueError("pass both past_k and past_v, or neither")


def _scales(hd, layer_id):
    """(qk_scale, masked_value) in log2 units: scores `q.k / sqrt(hd)` and the original's fill -10000 * coeff."""
    return LOG2E / math.sqrt(hd), -10000.0 * (layer_id + 1) * LOG2E


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, layer_id, mask):
        sq, b, nh, hd = q.shape
        has_past = past_k is not None
        pk, pv = (past_k, past_v) if has_past else (k, v)
        La = past_k.shape[0] if has_past else 0
        L = La + k.shape[0]
        mode, pad, cl, P, causal, mb, stride_mb, stride_mq, stride_mk = _prepare_mask(mask, b, sq, La, L, q.device)
        out = torch.empty(sq, b, nh * hd, dtype=q.dtype, device=q.device)
        lse = torch.empty(b * nh, sq, dtype=torch.float32, device=q.device)
        info = device_info(q.device)
        cfg = fwd_config(sq, hd, q.dtype, mode, info)
        qk_scale, masked_value = _scales(hd, layer_id)
        launch(_attn_fwd, (triton.cdiv(sq, cfg["BLOCK_M"]), b * nh),
               q, pk, pv, k, v, out, lse, pad, cl, mb,
               sq, La, L, P, nh, causal,
               *strides(q), *strides(pk), *strides(pv), *strides(k), *strides(v),
               *strides(out), stride_mb, stride_mq, stride_mk,
               qk_scale, masked_value,
               HD=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], MASK_MODE=mode,
               UPCAST=_upcast(q.dtype, info), PRECISION=_precision(q.dtype),
               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.save_for_backward(q, k, v, past_k if has_past else None, past_v if has_past else None, out, lse,
                              pad, cl, mb)
        ctx.meta = (has_past, La, L, P, causal, mode, stride_mb, stride_mq, stride_mk, qk_scale, masked_value)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, past_k, past_v, out, lse, pad, cl, mb = ctx.saved_tensors
        has_past, La, L, P, causal, mode, stride_mb, stride_mq, stride_mk, qk_scale, masked_value = ctx.meta
        sq, b, nh, hd = q.shape
        dout = _aligned(dout)
        pk, pv = (past_k, past_v) if has_past else (k, v)
        delta = torch.empty(b * nh, sq, dtype=torch.float32, device=q.device)
        launch(_attn_bwd_delta, (triton.cdiv(sq, DELTA_BLOCK_M), b * nh),
               out, dout, delta, sq, nh, *strides(out), *strides(dout), HD=hd, BLOCK_M=DELTA_BLOCK_M)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dpk = torch.empty(pk.shape, dtype=pk.dtype, device=pk.device) if has_past else dk
        dpv = torch.empty(pv.shape, dtype=pv.dtype, device=pv.device) if has_past else dv
        info = device_info(q.device)
        cfg = bwd_config(hd, q.dtype, info)
        common = dict(HD=hd, MASK_MODE=mode, UPCAST=_upcast(q.dtype, info), PRECISION=_precision(q.dtype),
                      num_stages=cfg["num_stages"])
        sm_scale = 1.0 / math.sqrt(hd)
        tensor_strides = (*strides(q), *strides(pk), *strides(pv), *strides(k), *strides(v), *strides(dout),
                          stride_mb, stride_mq, stride_mk)
        blocks_past = triton.cdiv(La, cfg["BLOCK_N_KV"])
        launch(_attn_bwd_dkdv, (blocks_past + triton.cdiv(k.shape[0], cfg["BLOCK_N_KV"]), b * nh),
               q, pk, pv, k, v, dout, lse, delta, dpk, dpv, dk, dv, pad, cl, mb,
               sq, La, L, P, nh, causal, blocks_past, *tensor_strides,
               *strides(dpk), *strides(dk), qk_scale, sm_scale, masked_value,
               BLOCK_M=cfg["BLOCK_M_KV"], BLOCK_N=cfg["BLOCK_N_KV"], num_warps=cfg["num_warps_kv"], **common)
        launch(_attn_bwd_dq, (triton.cdiv(sq, cfg["BLOCK_M_Q"]), b * nh),
               q, pk, pv, k, v, dout, lse, delta, dq, pad, cl, mb,
               sq, La, L, P, nh, causal, *tensor_strides, *strides(dq), qk_scale, sm_scale, masked_value,
               BLOCK_M=cfg["BLOCK_M_Q"], BLOCK_N=cfg["BLOCK_N_Q"], num_warps=cfg["num_warps_q"], **common)
        return dq, dk, dv, (dpk if has_past else None), (dpv if has_past else None), None, None


def _decode(q, k, v, past_k, past_v, layer_id, mask):
    _, b, nh, hd = q.shape
    has_past = past_k is not None
    pk, pv = (past_k, past_v) if has_past else (k, v)
    La = past_k.shape[0] if has_past else 0
    L = La + k.shape[0]
    mode, pad, cl, P, causal, mb, stride_mb, _, stride_mk = _prepare_mask(mask, b, 1, La, L, q.device)
    splits, per = decode_config(b * nh, L, hd)
    part = torch.empty(b * nh, splits, hd + 2, dtype=torch.float32, device=q.device)
    out = torch.empty(1, b, nh * hd, dtype=q.dtype, device=q.device)
    launch(_attn_decode_partial, (splits, b * nh),
           q, pk, pv, k, v, part, pad, cl, mb, La, L, P, nh, causal, per, splits,
           *strides(q)[1:], *strides(pk), *strides(pv), *strides(k), *strides(v),
           stride_mb, stride_mk, *_scales(hd, layer_id),
           HD=hd, BLOCK_N=decode_block_n(hd), MASK_MODE=mode, num_warps=4, num_stages=2)
    launch(_attn_decode_combine, (b * nh,), part, out, nh, splits, strides(out)[1],
           HD=hd, SPLITS=DECODE_MAX_SPLITS, num_warps=4, num_stages=2)
    return out


@register("attention", "triton", supports=_supports, min_capability=(8, 0))
def _attention_triton(q, k, v, layer_id, mask, output_attentions, past_k=None, past_v=None):
    check_device(q, k, v, past_k, past_v)
    _check(q, k, v, past_k, past_v)
    if output_attentions:
        # The probabilities are wanted: scores by matmul, then the fused softmax kernel.
        from ..ops.attention import _attention_torch

        return _attention_torch(q, k, v, layer_id, mask, True, past_k, past_v, softmax_backend="triton")
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    if past_k is not None:
        past_k, past_v = _aligned(past_k), _aligned(past_v)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, past_k, past_v))
    if q.shape[0] == 1 and not needs_grad:
        return _decode(q, k, v, past_k, past_v, layer_id, mask), None
    return _FlashAttention.apply(q, k, v, past_k, past_v, layer_id, mask), None


# ----------------------------------------------------------------------------- compile specs


def _dtype(ln) -> torch.dtype:
    """The attention's dtype: of q, or of the output for the decode combine (whose first input is fp32)."""
    return ln.arg("O").dtype if "combine" in ln.kernel.__name__ else tensor_dtype(ln)


def _label(ln, consts) -> str:
    name = TL_TYPE[_dtype(ln)]
    parts = [f"{name} hd={consts['HD']}"]
    if "MASK_MODE" in consts:
        parts.append(f"mask={MASK_NAMES[consts['MASK_MODE']]}")
    parts += [f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK") or k == "SPLITS"]
    parts.append(f"w{ln.kwargs.get('num_warps')} s{ln.kwargs.get('num_stages')}")
    return " ".join(parts)


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every launch configuration `_attention_triton` chooses on `target` (default A100), fp16, bf16 and fp32:
    the launchers run on meta tensors (a prefill of 80 queries with gradients, and a decode step) for
    each head dim and mask kind, and their launches are recorded."""
    target = target or TARGETS[80]
    b, nh, past = 2, 2, 48
    with assume_device(target), record_launches() as launches:
        for dtype in DTYPES:
            for hd in HEAD_DIMS:
                for kind in ("glm", "bool"):
                    for sq in (1, 80):
                        L = past + sq
                        mask = GLMMask(8, torch.zeros(b, dtype=torch.int32), torch.full((b,), 4, dtype=torch.int32)) \
                            if kind == "glm" else meta(b, 1, sq, L, dtype=torch.bool)
                        leaves = [meta(n, b, nh, hd, dtype=dtype).requires_grad_(sq > 1) for n in (sq, sq, sq)]
                        past_kv = [meta(past, b, nh, hd, dtype=dtype).requires_grad_(sq > 1) for _ in range(2)]
                        with torch.set_grad_enabled(sq > 1):
                            out, _ = _attention_triton(*leaves, 3, mask, False, *past_kv)
                        if sq > 1:
                            out.backward(meta(*out.shape, dtype=dtype))
    return specs_from_launches(launches, _label, lambda ln: {"dtype": _dtype(ln)})
