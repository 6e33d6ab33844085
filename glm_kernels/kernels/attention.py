"""GLM attention in Triton: flash-style forward and backward, and split-K decoding.

One pass over the keys `[past | new]` for each block of queries, with an
online softmax (fp32 running max, sum and accumulator); the `[sq, sk]` scores
and probabilities are never written. Keys come from two tensors, the past
(P-Tuning prefix, then cached tokens) and the new tokens, so nothing is
concatenated; a key tile that straddles the two is loaded with two disjoint
masked loads.

Shapes (any strides with a unit last stride): q `[sq, b, nh, hd]`, new k/v
`[sk, b, nh, hd]`, past k/v `[La, b, nh, hd]`; output `[sq, b, nh*hd]`,
ready for the `dense` projection. hd in {32, 64, 128}; fp32, fp16, bf16.

Masks (constexpr `MASK_MODE`):
0 none (every key visible, as the original with no mask);
1 `GLMMask`, computed in the kernel from the prefix length and each row's
  left padding and context length (never materialised);
2 an explicit boolean mask `[b or 1, 1, sq, La + sk]` (one byte per entry).
A masked logit is the original's finite fill, `-10000 * (layer_id + 1)` in
natural-log units, so a row with every key masked is uniform, never NaN.
Scores are `q.k / sqrt(hd)` accumulated in fp32 (the layer coefficient of
the original cancels; it only protected fp16 scores from overflow).

Backward recomputes the probabilities from the saved log-sum-exp (FA2 split:
a dK/dV kernel over key blocks, a dQ kernel over query blocks), giving
gradients for q, the new k/v and the past k/v (the P-Tuning prefix).

Decoding (sq = 1, no gradient) uses a split-K variant: each program reduces a
chunk of the keys of one head to (max, sum, partial output) with vector
products, and a second kernel combines the chunks: no 16/64-row query tile
is wasted on one query.

Bytes (e = element size, H = b*nh heads, L = La + sk keys, M = mask bytes):
- forward: reads q `sq*H*hd*e` + keys and values `2*L*H*hd*e` per query block
  (`ceil(sq/BLOCK_M)` times; a reload from L2 on a GPU, once from DRAM) +
  masks (mode 2: `b*sq*L`), writes o `sq*H*hd*e` + lse `sq*H*4`.
  Minimum: q + k + v + o; the extra is the 4-byte lse per query row
  (4/(hd*e) of o: 1.6% at hd=128 fp16), kept for the backward.
- decode: reads q, k, v once (`(1 + 2L)*H*hd*e`), writes partials
  `splits*H*(hd+2)*4` and reads them back, writes o `H*hd*e`.
See docs/kernels.md for the figures at the 6B shapes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import register
from ..ops.mask import GLMMask
from .common import TL_TYPE, CompileSpec, check_device, dot_upcast, downcast

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
MASK_NONE, MASK_GLM, MASK_BOOL = 0, 1, 2


# ----------------------------------------------------------------------------- device helpers


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
        m = tl.load(MB + rows[:, None] * stride_mq + cols[None, :] * stride_mk,
                    mask=row_ok[:, None] & col_ok[None, :], other=1)
        vis = m == 0
    return vis


@triton.jit
def _row_limits(PAD, CTX, b, pid_m, sq, L, P, causal, BLOCK_M: tl.constexpr, MASK_MODE: tl.constexpr,
                KEEP_UNIFORM: tl.constexpr):
    """(pad, context, hi) of a query tile: its row's GLM mask and the key columns it needs, `[0, hi)`.

    With a causal GLM mask, keys past the last one any row of the tile can see
    are skipped. KEEP_UNIFORM (the forward): not when the tile holds padding
    rows without a prefix, which attend uniformly to every key.
    """
    pad = 0
    ctx = 0
    hi = L
    if MASK_MODE == 1:
        pad = tl.load(PAD + b)
        ctx = tl.load(CTX + b)
        T = L - P
        last_tq = T - sq + tl.minimum(pid_m * BLOCK_M + BLOCK_M, sq) - 1
        skip = causal != 0
        if KEEP_UNIFORM:
            skip = skip & ((P != 0) | (T - sq + pid_m * BLOCK_M >= pad))
        hi = tl.where(skip, tl.minimum(L, P + tl.maximum(last_tq + 1, ctx)), L)
    return pad, ctx, hi


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, K, V, s_k, s_v, hi, col0, rows, row_ok, t_q, P, pad, ctx, causal,
                 mb, s_mq, s_mk, qk_scale, masked_value, d,
                 BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of one query tile with keys `0 .. hi-1` of one segment (global column col0 + j)."""
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        k = tl.load(K + j[:, None] * s_k + d[None, :], mask=ok[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        if MASK_MODE != 0:
            vis = _visible(rows, col0 + j, t_q, P, pad, ctx, causal, mb, s_mq, s_mk, row_ok, ok, MASK_MODE)
            qk = tl.where(vis, qk, masked_value)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + j[:, None] * s_v + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(downcast(p, v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_segment(dq, q, do, lse, delta, K, V, s_k, s_v, hi, col0, rows, row_ok, t_q, P, pad, ctx, causal,
                mb, s_mq, s_mk, qk_scale, masked_value, d,
                BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        k = tl.load(K + j[:, None] * s_k + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + j[:, None] * s_v + d[None, :], mask=ok[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        if MASK_MODE != 0:
            vis = _visible(rows, col0 + j, t_q, P, pad, ctx, causal, mb, s_mq, s_mk, row_ok, ok, MASK_MODE)
            qk = tl.where(vis, qk, masked_value)
        p = tl.where(ok[None, :], tl.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if MASK_MODE != 0:
            ds = tl.where(vis, ds, 0.0)  # the constant fill blocks the gradient of masked scores
        dq += _dot(downcast(ds, k.dtype), k, UPCAST, PRECISION)
    return dq


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd(Q, KA, VA, KB, VB, O, LSE, PAD, CTX, MB,
              sq, La, L, P, nh, causal,
              s_qs, s_qb, s_qh,
              s_kas, s_kab, s_kah, s_vas, s_vab, s_vah,
              s_kbs, s_kbb, s_kbh, s_vbs, s_vbb, s_vbh,
              s_os, s_ob, s_mb, s_mq, s_mk,
              qk_scale, masked_value,
              HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = rows < sq
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + d[None, :], mask=row_ok[:, None], other=0.0)
    T = L - P
    t_q = T - sq + rows
    pad, ctx, hi = _row_limits(PAD, CTX, b, pid_m, sq, L, P, causal, BLOCK_M, MASK_MODE, True)
    mb = MB + b * s_mb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, KA + b * s_kab + h * s_kah, VA + b * s_vab + h * s_vah,
                                 s_kas, s_vas, tl.minimum(La, hi), 0, rows, row_ok, t_q, P, pad, ctx, causal,
                                 mb, s_mq, s_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, KB + b * s_kbb + h * s_kbh, VB + b * s_vbb + h * s_vbh,
                                 s_kbs, s_vbs, tl.maximum(hi - La, 0), La, rows, row_ok, t_q, P, pad, ctx, causal,
                                 mb, s_mq, s_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * s_os + b * s_ob + h * HD + d[None, :], downcast(out, O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * sq + rows, m_i + tl.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sq, nh, s_os, s_ob, s_dos, s_dob,
                    HD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[bh, i] = sum_d dO * O (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    ok = rows < sq
    o = tl.load(O + rows[:, None] * s_os + b * s_ob + h * HD + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * s_dos + b * s_dob + h * HD + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * sq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _attn_bwd_dkdv(Q, KA, VA, KB, VB, DO, LSE, DELTA, DKA, DVA, DKB, DVB, PAD, CTX, MB,
                   sq, La, L, P, nh, causal, blocks_a,
                   s_qs, s_qb, s_qh,
                   s_kas, s_kab, s_kah, s_vas, s_vab, s_vah,
                   s_kbs, s_kbb, s_kbh, s_vbs, s_vbb, s_vbh,
                   s_dos, s_dob, s_mb, s_mq, s_mk,
                   s_gas, s_gab, s_gah, s_gbs, s_gbb, s_gbh,
                   qk_scale, sm_scale, masked_value,
                   HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one block of keys (of the past or of the new segment) over every query."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    if pid_n < blocks_a:
        K = KA + b * s_kab + h * s_kah
        V = VA + b * s_vab + h * s_vah
        DK = DKA + b * s_gab + h * s_gah
        DV = DVA + b * s_gab + h * s_gah
        s_k = s_kas
        s_v = s_vas
        s_g = s_gas
        j0 = pid_n * BLOCK_N
        n = La
        col0 = 0
    else:
        K = KB + b * s_kbb + h * s_kbh
        V = VB + b * s_vbb + h * s_vbh
        DK = DKB + b * s_gbb + h * s_gbh
        DV = DVB + b * s_gbb + h * s_gbh
        s_k = s_kbs
        s_v = s_vbs
        s_g = s_gbs
        j0 = (pid_n - blocks_a) * BLOCK_N
        n = L - La
        col0 = La
    j = j0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HD)
    ok = j < n
    cols = col0 + j
    k = tl.load(K + j[:, None] * s_k + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + j[:, None] * s_v + d[None, :], mask=ok[:, None], other=0.0)
    T = L - P
    pad = 0
    ctx = 0
    if MASK_MODE == 1:
        pad = tl.load(PAD + b)
        ctx = tl.load(CTX + b)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * HD
    mb = MB + b * s_mb
    dk = tl.zeros([BLOCK_N, HD], tl.float32)
    dv = tl.zeros([BLOCK_N, HD], tl.float32)
    for start in range(0, sq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < sq
        t_q = T - sq + rows
        q = tl.load(q_base + rows[:, None] * s_qs + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * s_dos + d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * sq + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        if MASK_MODE != 0:
            vis = _visible(rows, cols, t_q, P, pad, ctx, causal, mb, s_mq, s_mk, row_ok, ok, MASK_MODE)
            qk = tl.where(vis, qk, masked_value)
        p = tl.where(ok[None, :], tl.exp2(qk - lse[:, None]), 0.0)
        dv += _dot(tl.trans(downcast(p, do.dtype)), do, UPCAST, PRECISION)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if MASK_MODE != 0:
            ds = tl.where(vis, ds, 0.0)  # the constant fill blocks the gradient of masked scores
        dk += _dot(tl.trans(downcast(ds, q.dtype)), q, UPCAST, PRECISION)
    dk = dk * sm_scale
    g = j[:, None] * s_g + d[None, :]
    tl.store(DK + g, downcast(dk, DKA.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + g, downcast(dv, DVA.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _attn_bwd_dq(Q, KA, VA, KB, VB, DO, LSE, DELTA, DQ, PAD, CTX, MB,
                 sq, La, L, P, nh, causal,
                 s_qs, s_qb, s_qh,
                 s_kas, s_kab, s_kah, s_vas, s_vab, s_vah,
                 s_kbs, s_kbb, s_kbh, s_vbs, s_vbb, s_vbh,
                 s_dos, s_dob, s_mb, s_mq, s_mk, s_dqs, s_dqb, s_dqh,
                 qk_scale, sm_scale, masked_value,
                 HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD)
    row_ok = rows < sq
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_dob + h * HD + rows[:, None] * s_dos + d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * sq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
    T = L - P
    t_q = T - sq + rows
    # dS is zero on masked keys (fully masked rows included), so no row needs the keys past `hi`
    pad, ctx, hi = _row_limits(PAD, CTX, b, pid_m, sq, L, P, causal, BLOCK_M, MASK_MODE, False)
    mb = MB + b * s_mb
    dq = tl.zeros([BLOCK_M, HD], tl.float32)
    dq = _dq_segment(dq, q, do, lse, delta, KA + b * s_kab + h * s_kah, VA + b * s_vab + h * s_vah, s_kas, s_vas,
                     tl.minimum(La, hi), 0, rows, row_ok, t_q, P, pad, ctx, causal, mb, s_mq, s_mk, qk_scale,
                     masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    dq = _dq_segment(dq, q, do, lse, delta, KB + b * s_kbb + h * s_kbh, VB + b * s_vbb + h * s_vbh, s_kbs, s_vbs,
                     tl.maximum(hi - La, 0), La, rows, row_ok, t_q, P, pad, ctx, causal, mb, s_mq, s_mk, qk_scale,
                     masked_value, d, BLOCK_N, MASK_MODE, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqs + d[None, :], downcast(dq, DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------- decoding


@triton.jit
def _decode_segment(acc, m_i, l_i, q, K, V, s_k, s_v, lo, hi, col0, t_q, P, pad, ctx, causal, mb, s_mk,
                    qk_scale, masked_value, d, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr):
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = j < hi
        cols = col0 + j
        k = tl.load(K + j[:, None] * s_k + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        qk = tl.sum(q[None, :] * k, 1) * qk_scale
        if MASK_MODE == 1:
            t_k = cols - P
            vis = (t_q >= pad) & (t_k >= pad) & ((t_k < ctx) | (t_k <= t_q) | (causal == 0))
            vis = vis | (cols < P)
            qk = tl.where(vis, qk, masked_value)
        if MASK_MODE == 2:
            mvals = tl.load(mb + cols * s_mk, mask=ok, other=1)
            qk = tl.where(mvals == 0, qk, masked_value)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        v = tl.load(V + j[:, None] * s_v + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_decode_partial(Q, KA, VA, KB, VB, PART, PAD, CTX, MB,
                         La, L, P, nh, causal, tiles_per_split, num_splits,
                         s_qb, s_qh,
                         s_kas, s_kab, s_kah, s_vas, s_vab, s_vah,
                         s_kbs, s_kbb, s_kbh, s_vbs, s_vbb, s_vbh,
                         s_mb, s_mk,
                         qk_scale, masked_value,
                         HD: tl.constexpr, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr):
    """One query per head: (max, sum, un-normalised output) over one chunk of the keys."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HD)
    q = tl.load(Q + b * s_qb + h * s_qh + d).to(tl.float32)
    t_q = L - P - 1
    pad = 0
    ctx = 0
    if MASK_MODE == 1:
        pad = tl.load(PAD + b)
        ctx = tl.load(CTX + b)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, L)
    mb = MB + b * s_mb
    m_i = tl.zeros([], tl.float32) - float("inf")
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([HD], tl.float32)
    acc, m_i, l_i = _decode_segment(acc, m_i, l_i, q, KA + b * s_kab + h * s_kah, VA + b * s_vab + h * s_vah,
                                    s_kas, s_vas, tl.minimum(lo, La), tl.minimum(hi, La), 0, t_q, P, pad, ctx,
                                    causal, mb, s_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE)
    acc, m_i, l_i = _decode_segment(acc, m_i, l_i, q, KB + b * s_kbb + h * s_kbh, VB + b * s_vbb + h * s_vbh,
                                    s_kbs, s_vbs, tl.maximum(lo - La, 0), tl.maximum(hi - La, 0), La, t_q, P, pad,
                                    ctx, causal, mb, s_mk, qk_scale, masked_value, d, BLOCK_N, MASK_MODE)
    base = PART + (bh.to(tl.int64) * num_splits + split) * (HD + 2)
    tl.store(base + d, acc)
    tl.store(base + HD, m_i)
    tl.store(base + HD + 1, l_i)


@triton.jit
def _attn_decode_combine(PART, O, nh, num_splits, s_ob,
                         HD: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
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
    tl.store(O + b * s_ob + h * HD + d, downcast(out, O.dtype.element_ty))


# ----------------------------------------------------------------------------- launch configuration


def fwd_config(sq: int, hd: int, mask_mode: int = MASK_GLM) -> dict:
    """Block sizes and warps of the forward kernel (a small query tile when there are few queries).

    An explicit boolean mask adds a [BLOCK_M, BLOCK_N] tile of mask pointers: its key tile is 32 wide so
    that no configuration spills.
    """
    block_m = 16 if sq <= 16 else 64
    block_n = 64 if hd <= 64 and mask_mode != MASK_BOOL else 32
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_m == 64 else 4, "num_stages": 2}


def bwd_config(hd: int) -> dict:
    """dK/dV: BLOCK_N_KV keys per program, queries in BLOCK_M_KV steps; dQ: BLOCK_M_Q queries, BLOCK_N_Q keys."""
    n_kv = 64 if hd <= 64 else 32
    return {"BLOCK_M_KV": 32, "BLOCK_N_KV": n_kv, "BLOCK_M_Q": 64, "BLOCK_N_Q": 32,
            "num_warps": 8 if hd == 128 else 4, "num_stages": 2}


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


def _prepare_mask(mask, b, sq, La, L, device):
    """(MASK_MODE, pad, ctx, P, causal, mask_u8, stride_mb, stride_mq, stride_mk)."""
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    if mask is None:
        return MASK_NONE, dummy, dummy, 0, 1, dummy, 0, 0, 0
    if isinstance(mask, GLMMask):
        if mask.prefix_len > L:
            raise ValueError(f"GLMMask.prefix_len={mask.prefix_len} exceeds the {L} keys")
        if mask.batch != b:
            raise ValueError(f"GLMMask is for batch {mask.batch}, the attention has batch {b}")
        pad = mask.pad.to(device=device, dtype=torch.int32).contiguous()
        ctx = mask.context.to(device=device, dtype=torch.int32).contiguous()
        return MASK_GLM, pad, ctx, mask.prefix_len, int(mask.causal), dummy, 0, 0, 0
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or \
            tuple(mask.shape[2:]) != (sq, L):
        raise ValueError(f"attention mask must be bool [{b} or 1, 1, {sq}, {L}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    m = mask.view(torch.uint8)
    stride_mb = m.stride(0) if m.shape[0] == b and b > 1 else 0
    return MASK_BOOL, dummy, dummy, 0, 1, m, stride_mb, m.stride(2), m.stride(3)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v, past_k, past_v):
    sq, b, nh, hd = q.shape
    if hd not in HEAD_DIMS:
        raise ValueError(f"triton attention supports head dims {HEAD_DIMS}, got {hd}")
    for name, t in (("k", k), ("v", v), ("past_k", past_k), ("past_v", past_v)):
        if t is None:
            continue
        if t.dim() != 4 or tuple(t.shape[1:]) != (b, nh, hd) or t.dtype != q.dtype:
            raise ValueError(f"{name} must be [len, {b}, {nh}, {hd}] {q.dtype}, got {t.dtype} {tuple(t.shape)}")
    if (past_k is None) != (past_v is None):
        raise ValueError("pass both past_k and past_v, or neither")


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, layer_id, mask):
        sq, b, nh, hd = q.shape
        has_past = past_k is not None
        ka, va = (past_k, past_v) if has_past else (k, v)
        La = past_k.shape[0] if has_past else 0
        L = La + k.shape[0]
        mode, pad, cl, P, causal, mb, s_mb, s_mq, s_mk = _prepare_mask(mask, b, sq, La, L, q.device)
        out = torch.empty(sq, b, nh * hd, dtype=q.dtype, device=q.device)
        lse = torch.empty(b * nh, sq, dtype=torch.float32, device=q.device)
        cfg = fwd_config(sq, hd, mode)
        coeff = float(layer_id + 1)
        qk_scale = LOG2E / math.sqrt(hd)
        masked_value = -10000.0 * coeff * LOG2E
        grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * nh)
        _attn_fwd[grid](
            q, ka, va, k, v, out, lse, pad, cl, mb,
            sq, La, L, P, nh, causal,
            *_strides3(q), *_strides3(ka), *_strides3(va), *_strides3(k), *_strides3(v),
            out.stride(0), out.stride(1), s_mb, s_mq, s_mk,
            qk_scale, masked_value,
            HD=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], MASK_MODE=mode,
            UPCAST=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        ctx.save_for_backward(q, k, v, past_k if has_past else None, past_v if has_past else None, out, lse,
                              pad, cl, mb)
        ctx.meta = (has_past, La, L, P, causal, mode, s_mb, s_mq, s_mk, qk_scale, masked_value)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, past_k, past_v, out, lse, pad, cl, mb = ctx.saved_tensors
        has_past, La, L, P, causal, mode, s_mb, s_mq, s_mk, qk_scale, masked_value = ctx.meta
        sq, b, nh, hd = q.shape
        dout = _unit_last(dout)
        ka, va = (past_k, past_v) if has_past else (k, v)
        delta = torch.empty(b * nh, sq, dtype=torch.float32, device=q.device)
        _attn_bwd_delta[(triton.cdiv(sq, DELTA_BLOCK_M), b * nh)](
            out, dout, delta, sq, nh, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), HD=hd,
            BLOCK_M=DELTA_BLOCK_M)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dka = torch.empty(ka.shape, dtype=ka.dtype, device=ka.device) if has_past else dk
        dva = torch.empty(va.shape, dtype=va.dtype, device=va.device) if has_past else dv
        cfg = bwd_config(hd)
        common = dict(HD=hd, MASK_MODE=mode, UPCAST=dot_upcast(q.dtype), PRECISION=_precision(q.dtype),
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        sm_scale = 1.0 / math.sqrt(hd)
        strides = (*_strides3(q), *_strides3(ka), *_strides3(va), *_strides3(k), *_strides3(v),
                   dout.stride(0), dout.stride(1), s_mb, s_mq, s_mk)
        blocks_a = triton.cdiv(La, cfg["BLOCK_N_KV"])
        _attn_bwd_dkdv[(blocks_a + triton.cdiv(k.shape[0], cfg["BLOCK_N_KV"]), b * nh)](
            q, ka, va, k, v, dout, lse, delta, dka, dva, dk, dv, pad, cl, mb,
            sq, La, L, P, nh, causal, blocks_a, *strides,
            *_strides3(dka), *_strides3(dk), qk_scale, sm_scale, masked_value,
            **{**common, "BLOCK_M": cfg["BLOCK_M_KV"], "BLOCK_N": cfg["BLOCK_N_KV"]})
        _attn_bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M_Q"]), b * nh)](
            q, ka, va, k, v, dout, lse, delta, dq, pad, cl, mb,
            sq, La, L, P, nh, causal, *strides, *_strides3(dq), qk_scale, sm_scale, masked_value,
            **{**common, "BLOCK_M": cfg["BLOCK_M_Q"], "BLOCK_N": cfg["BLOCK_N_Q"]})
        return dq, dk, dv, (dka if has_past else None), (dva if has_past else None), None, None


def _decode(q, k, v, past_k, past_v, layer_id, mask):
    _, b, nh, hd = q.shape
    has_past = past_k is not None
    ka, va = (past_k, past_v) if has_past else (k, v)
    La = past_k.shape[0] if has_past else 0
    L = La + k.shape[0]
    mode, pad, cl, P, causal, mb, s_mb, _, s_mk = _prepare_mask(mask, b, 1, La, L, q.device)
    splits, per = decode_config(b * nh, L, hd)
    part = torch.empty(b * nh, splits, hd + 2, dtype=torch.float32, device=q.device)
    out = torch.empty(1, b, nh * hd, dtype=q.dtype, device=q.device)
    _attn_decode_partial[(splits, b * nh)](
        q, ka, va, k, v, part, pad, cl, mb, La, L, P, nh, causal, per, splits,
        q.stride(1), q.stride(2), *_strides3(ka), *_strides3(va), *_strides3(k), *_strides3(v),
        s_mb, s_mk, LOG2E / math.sqrt(hd), -10000.0 * (layer_id + 1) * LOG2E,
        HD=hd, BLOCK_N=decode_block_n(hd), MASK_MODE=mode, num_warps=4, num_stages=2)
    _attn_decode_combine[(b * nh,)](part, out, nh, splits, out.stride(1), HD=hd, SPLITS=DECODE_MAX_SPLITS,
                                   num_warps=4)
    return out


@register("attention", "triton")
def _attention_triton(q, k, v, layer_id, mask, output_attentions, past_k=None, past_v=None):
    check_device(q, k, v, past_k, past_v)
    _check(q, k, v, past_k, past_v)
    if output_attentions:
        # The probabilities are wanted: scores by matmul, then the fused softmax kernel.
        from ..ops.attention import _attention_torch

        return _attention_torch(q, k, v, layer_id, mask, True, past_k, past_v, softmax_backend="triton")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if past_k is not None:
        past_k, past_v = _unit_last(past_k), _unit_last(past_v)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, past_k, past_v))
    if q.shape[0] == 1 and not needs_grad:
        return _decode(q, k, v, past_k, past_v, layer_id, mask), None
    return _FlashAttention.apply(q, k, v, past_k, past_v, layer_id, mask), None


# ----------------------------------------------------------------------------- compile specs


def _sig(names, types):
    return dict(zip(names, types))


def compile_specs() -> list[CompileSpec]:
    """Every launch configuration `_attention_triton` can choose, for fp16 and bf16."""
    specs = []
    n_i32 = lambda k: ["i32"] * k  # noqa: E731
    for dtype in (torch.float16, torch.bfloat16):
        t = "*" + TL_TYPE[dtype]
        for hd in HEAD_DIMS:
            for mode in (MASK_NONE, MASK_GLM, MASK_BOOL):
                mode_name = ("none", "glm", "bool")[mode]
                for block_m in (16, 64):
                    cfg = fwd_config(1 if block_m == 16 else 1024, hd, mode)
                    names = ["Q", "KA", "VA", "KB", "VB", "O", "LSE", "PAD", "CTX", "MB",
                             "sq", "La", "L", "P", "nh", "causal",
                             "s_qs", "s_qb", "s_qh", "s_kas", "s_kab", "s_kah", "s_vas", "s_vab", "s_vah",
                             "s_kbs", "s_kbb", "s_kbh", "s_vbs", "s_vbb", "s_vbh", "s_os", "s_ob",
                             "s_mb", "s_mq", "s_mk", "qk_scale", "masked_value"]
                    types = [t] * 6 + ["*fp32", "*i32", "*i32", "*u8"] + n_i32(6) + n_i32(20) + ["fp32", "fp32"]
                    consts = dict(HD=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], MASK_MODE=mode,
                                  UPCAST=False, PRECISION="tf32")
                    specs.append(CompileSpec(_attn_fwd, {**_sig(names, types), **{c: "constexpr" for c in consts}},
                                             consts, cfg["num_warps"], cfg["num_stages"],
                                             f"fwd {TL_TYPE[dtype]} hd={hd} mask={mode_name} "
                                             f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}"))
                cfg = bwd_config(hd)
                common = dict(HD=hd, BLOCK_M=cfg["BLOCK_M_KV"], BLOCK_N=cfg["BLOCK_N_KV"], MASK_MODE=mode,
                              UPCAST=False, PRECISION="tf32")
                base = ["sq", "La", "L", "P", "nh", "causal", "blocks_a",
                        "s_qs", "s_qb", "s_qh", "s_kas", "s_kab", "s_kah", "s_vas", "s_vab", "s_vah",
                        "s_kbs", "s_kbb", "s_kbh", "s_vbs", "s_vbb", "s_vbh", "s_dos", "s_dob", "s_mb", "s_mq",
                        "s_mk"]
                names = ["Q", "KA", "VA", "KB", "VB", "DO", "LSE", "DELTA", "DKA", "DVA", "DKB", "DVB", "PAD",
                         "CTX", "MB"] + base + ["s_gas", "s_gab", "s_gah", "s_gbs", "s_gbb", "s_gbh",
                                                "qk_scale", "sm_scale", "masked_value"]
                types = [t] * 6 + ["*fp32", "*fp32"] + [t] * 4 + ["*i32", "*i32", "*u8"] + n_i32(27) + n_i32(6) + \
                    ["fp32"] * 3
                specs.append(CompileSpec(_attn_bwd_dkdv, {**_sig(names, types), **{c: "constexpr" for c in common}},
                                         common, cfg["num_warps"], cfg["num_stages"],
                                         f"bwd dk/dv {TL_TYPE[dtype]} hd={hd} mask={mode_name} "
                                         f"BLOCK_M={cfg['BLOCK_M_KV']} BLOCK_N={cfg['BLOCK_N_KV']}"))
                common = {**common, "BLOCK_M": cfg["BLOCK_M_Q"], "BLOCK_N": cfg["BLOCK_N_Q"]}
                names = ["Q", "KA", "VA", "KB", "VB", "DO", "LSE", "DELTA", "DQ", "PAD", "CTX", "MB"] + \
                    [n for n in base if n != "blocks_a"] + ["s_dqs", "s_dqb", "s_dqh", "qk_scale", "sm_scale",
                                                            "masked_value"]
                types = [t] * 6 + ["*fp32", "*fp32", t, "*i32", "*i32", "*u8"] + n_i32(26) + n_i32(3) + ["fp32"] * 3
                specs.append(CompileSpec(_attn_bwd_dq, {**_sig(names, types), **{c: "constexpr" for c in common}},
                                         common, cfg["num_warps"], cfg["num_stages"],
                                         f"bwd dq {TL_TYPE[dtype]} hd={hd} mask={mode_name} "
                                         f"BLOCK_M={cfg['BLOCK_M_Q']} BLOCK_N={cfg['BLOCK_N_Q']}"))
                names = ["Q", "KA", "VA", "KB", "VB", "PART", "PAD", "CTX", "MB",
                         "La", "L", "P", "nh", "causal", "tiles_per_split", "num_splits", "s_qb", "s_qh",
                         "s_kas", "s_kab", "s_kah", "s_vas", "s_vab", "s_vah",
                         "s_kbs", "s_kbb", "s_kbh", "s_vbs", "s_vbb", "s_vbh", "s_mb", "s_mk",
                         "qk_scale", "masked_value"]
                types = [t] * 5 + ["*fp32", "*i32", "*i32", "*u8"] + n_i32(7) + n_i32(16) + ["fp32", "fp32"]
                consts = dict(HD=hd, BLOCK_N=decode_block_n(hd), MASK_MODE=mode)
                specs.append(CompileSpec(_attn_decode_partial, {**_sig(names, types),
                                                                **{c: "constexpr" for c in consts}},
                                         consts, 4, 2, f"decode {TL_TYPE[dtype]} hd={hd} mask={mode_name} "
                                                       f"BLOCK_N={decode_block_n(hd)}"))
            consts = dict(HD=hd, BLOCK_M=DELTA_BLOCK_M)
            specs.append(CompileSpec(_attn_bwd_delta, {**_sig(["O", "DO", "DELTA", "sq", "nh", "s_os", "s_ob",
                                                               "s_dos", "s_dob"],
                                                              [t, t, "*fp32"] + n_i32(6)),
                                                       **{c: "constexpr" for c in consts}},
                                     consts, 4, 2, f"bwd delta {TL_TYPE[dtype]} hd={hd}"))
            consts = dict(HD=hd, SPLITS=DECODE_MAX_SPLITS)
            specs.append(CompileSpec(_attn_decode_combine, {**_sig(["PART", "O", "nh", "num_splits", "s_ob"],
                                                                   ["*fp32", t] + n_i32(3)),
                                                            **{c: "constexpr" for c in consts}},
                                     consts, 4, 2, f"decode combine {TL_TYPE[dtype]} hd={hd} SPLITS={DECODE_MAX_SPLITS}"))
    return specs
