"""Scaled masked softmax of GLM attention scores (op "softmax"), forward and backward, in Triton.

What the original ChatGLM computes, in up to five passes over memory:

    s = scores.masked_fill(mask, -10000.0)      # in the model dtype
    p = softmax(s.float() * scale, dim=-1)      # fp32
    p = p.to(scores.dtype)

is fused here into one launch for the forward (fill + fp32 upcast + scale +
softmax + downcast) and one launch for the backward
(`ds = p * (dp - sum(p * dp)) * scale` in fp32, zero where masked, downcast).

The backward recomputes the fp32 probabilities p from the saved scores (and
mask) rather than reading the forward's output: the original's autograd
differentiates the fp32 softmax. Computing the gradient from the output
rounded to fp16/bf16 instead (as Megatron's fused softmax does) fails
GLM_SPEC.md's fp16/bf16 gradient rule: emulated in torch on random [2,3,5,sk]
scores (sk 7..1152, scale 1 and 28, with and without mask), 54 of 160 cases
fail, with errors up to 1.6e-2 (fp16) and 1.3e-1 (bf16) of the gradient's
scale. Reading scores costs the same bytes as reading p; the price is
memory: autograd keeps `scores` (R*sk*e bytes) alive until the backward,
where the original keeps its fp32 softmax output (R*sk*4 bytes).

Under the Triton interpreter, fp32 -> bf16 casts truncate (a GPU rounds to
nearest even); the kernels then round explicitly (`_downcast`), so the
interpreter tests check the numbers a GPU produces.

Shapes and dtypes:
    scores: `[b, nh, sq, sk]` (fewer leading dims are allowed), fp32/fp16/bf16,
        any strides.
    mask: bool, broadcastable to scores (`[b, 1, sq, sk]` or `[1, 1, sq, sk]`,
        possibly an expanded view with stride 0), True = masked; or None.
    scale: float, the layer coefficient `layer_id + 1` (up to 28).
    returns p: the shape of scores, contiguous, `scores.dtype`.

The fill value is -10000 rounded to the scores dtype, as `masked_fill` does
in the model dtype: exactly -10000 in fp32 and fp16, -9984 in bf16 (bf16 has 8
significant bits). A row whose entries are all masked gets every logit equal
to `fill * scale`, hence a uniform distribution, never NaN.

Launch configuration (`launch_config`, a deterministic function of sk only):
    * `next_pow2(sk) <= MAX_FUSED_BLOCK` (4096): single tile. A program holds
      BLOCK_R rows of BLOCK = max(16, next_pow2(sk)) columns in registers
      (BLOCK_R = max(1, ROW_TILE // BLOCK), so short rows share a program);
      num_warps = clamp(BLOCK_R * BLOCK / 256, 4, 16), i.e. 8 elements per
      thread.
    * longer rows (sk > 4096; ChatGLM's 2048 + prefix stays below): one row per
      program, looped over in CHUNK = 2048 columns with an online max/sum,
      then a second loop that writes. 8 warps.
Every configuration it can return is listed by `compile_specs()`.

Bytes moved (R = rows = b * nh * sq, e = element size of scores, the mask
1 byte/element, counted per row it is applied to, i.e. the upper bound; a
mask broadcast over heads has nh times fewer distinct bytes):
    forward, single tile: reads R*sk*e (+ R*sk mask), writes R*sk*e.  The minimum.
    forward, chunked:     reads 2*R*sk*e (+ 2*R*sk mask), writes R*sk*e.  The
        row is read twice (once for the max and sum, once to write), because a
        row of more than 4096 columns does not fit in registers of one program
        without spilling; the second read of the row (8-16 KB in fp16 for
        sk 4097..8192) usually hits L2.
    backward, single tile: reads scores R*sk*e + dp R*sk*e (+ R*sk mask),
        writes R*sk*e.  The minimum.
    backward, chunked: reads 2 * (2*R*sk*e (+ R*sk mask)), writes R*sk*e:
        the first loop gets the row's max, sum and sum(p*dp) online, the
        second writes; scores, dp and mask are read twice for the same reason
        as above.
`forward_bytes` and `backward_bytes` state these formulas as code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register
from ..backend import TARGETS, DeviceInfo, assume_device
from .common import (DTYPES, TL_TYPE, CompileSpec, check_device, downcast, launch, meta, record_launches,
                     specs_from_launches, tensor_dtype)

MASK_FILL = -10000.0
# Rows with next_pow2(sk) above this take the chunked (two-pass) path. Tests lower it (monkeypatch) to
# exercise the chunked path on short rows under the interpreter.
MAX_FUSED_BLOCK = 4096
# Width of one chunk of the chunked path.
CHUNK = 2048
# Short rows: a program covers about this many elements (BLOCK_R rows of BLOCK columns).
ROW_TILE = 1024
MIN_BLOCK = 16

# -10000 rounded to each dtype, then read as fp32 (what `masked_fill(mask, -10000.0)` then `.float()` gives).
_FILL = {dt: float(torch.tensor(MASK_FILL, dtype=dt).float()) for dt in (torch.float32, torch.float16,
                                                                        torch.bfloat16)}


# ----------------------------------------------------------------------------------------------------------
# kernels
@triton.jit
def _filled_scores(S, M, s_base, m_base, cols, ok, stride_sk, stride_mk, fill, HAS_MASK: tl.constexpr):
    """(scores in fp32 with masked entries set to `fill`, mask) of one chunk of a row (mask False without one)."""
    x = tl.load(S + s_base + cols.to(tl.int64) * stride_sk, mask=ok, other=0.0).to(tl.float32)
    masked = cols < 0
    if HAS_MASK:
        masked = tl.load(M + m_base + cols.to(tl.int64) * stride_mk, mask=ok, other=0) != 0
        x = tl.where(masked, fill, x)
    return x, masked


@triton.jit
def _row_base(rows, SQ, NH, st_b, st_h, st_q):
    """Element offset (int64) of row `rows` = ((b * NH) + h) * SQ + q of a strided [b, nh, sq, sk] tensor."""
    q = rows % SQ
    t = rows // SQ
    h = t % NH
    b = t // NH
    return b.to(tl.int64) * st_b + h.to(tl.int64) * st_h + q.to(tl.int64) * st_q


# Never specialised: row counts and the layout of scores, gradient and mask (their rows are addressed through
# `_row_base`, so alignment facts would buy nothing), and the row length SK (it changes with every decoding
# step that returns the probabilities).
_NOT_SPECIALISED = ["R", "SQ", "NH", "SK", "S", "M", "DP", "stride_sb", "stride_sh", "stride_sq", "stride_gb",
                    "stride_gh", "stride_gq", "stride_mb", "stride_mh", "stride_mq"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _softmax_fwd_kernel(S, M, P, scale, fill, R, SQ, NH, SK,
                        stride_sb, stride_sh, stride_sq, stride_sk, stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """P[r, :] = softmax(where(M[r, :], fill, S[r, :]).float() * scale) for BLOCK_R rows, whole rows in registers.

    S: strided scores; M: strided bool mask (stride 0 on broadcast dims) or None; P: contiguous [R, SK].
    Reads BLOCK_R*SK elements of S (+ mask bytes), writes BLOCK_R*SK elements of P.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < R
    col_ok = cols < SK
    ok = row_ok[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    s_off = _row_base(rows, SQ, NH, stride_sb, stride_sh, stride_sq)[:, None] + cols64[None, :] * stride_sk
    x = tl.load(S + s_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        m_off = _row_base(rows, SQ, NH, stride_mb, stride_mh, stride_mq)[:, None] + cols64[None, :] * stride_mk
        masked = tl.load(M + m_off, mask=ok, other=0) != 0
        x = tl.where(masked, fill, x)
    # Padding columns are -inf so they add nothing; rows past R read zeros (finite max, never stored).
    y = tl.where(col_ok[None, :], x * scale, float("-inf"))
    row_max = tl.max(y, axis=1)
    e = tl.exp(y - row_max[:, None])
    denom = tl.sum(e, axis=1)
    p = e / denom[:, None]
    p_off = rows.to(tl.int64)[:, None] * SK + cols64[None, :]
    tl.store(P + p_off, downcast(p, P.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _softmax_fwd_chunked_kernel(S, M, P, scale, fill, R, SQ, NH, SK,
                                stride_sb, stride_sh, stride_sq, stride_sk, stride_mb, stride_mh, stride_mq, stride_mk,
                                HAS_MASK: tl.constexpr, CHUNK: tl.constexpr):
    """Same as `_softmax_fwd_kernel` for one long row per program, in CHUNK-wide pieces.

    Loop 1 keeps a running max m and sum s = sum(exp(y - m)) (rescaled when m grows); loop 2 reads the row
    again and writes exp(y - m) / s. Reads 2*SK elements of S (+ 2*SK mask bytes), writes SK elements of P.
    """
    row = tl.program_id(0)
    s_base = _row_base(row, SQ, NH, stride_sb, stride_sh, stride_sq)
    m_base = _row_base(row, SQ, NH, stride_mb, stride_mh, stride_mq)
    p_base = row.to(tl.int64) * SK
    offs = tl.arange(0, CHUNK)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, SK, CHUNK):
        cols = start + offs
        ok = cols < SK
        x, masked = _filled_scores(S, M, s_base, m_base, cols, ok, stride_sk, stride_mk, fill, HAS_MASK)
        y = tl.where(ok, x * scale, float("-inf"))
        # Every chunk has at least one column < SK, so new_max is finite; exp(-inf - finite) = 0 at start.
        new_max = tl.maximum(run_max, tl.max(y, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(y - new_max), axis=0)
        run_max = new_max
    for start in range(0, SK, CHUNK):
        cols = start + offs
        ok = cols < SK
        x, masked = _filled_scores(S, M, s_base, m_base, cols, ok, stride_sk, stride_mk, fill, HAS_MASK)
        p = tl.exp(tl.where(ok, x * scale, float("-inf")) - run_max) / run_sum  # no exp overflow past SK
        tl.store(P + p_base + cols, downcast(p, P.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _softmax_bwd_kernel(S, M, DP, DS, scale, fill, R, SQ, NH, SK,
                        stride_sb, stride_sh, stride_sq, stride_sk, stride_gb, stride_gh, stride_gq, stride_gk,
                        stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """DS[r, :] = where(M[r, :], 0, p * (DP - sum(p * DP)) * scale) for BLOCK_R rows, all in fp32.

    p is recomputed in fp32 from the scores (as the forward computes it, before the downcast), because the
    original's autograd uses the fp32 probabilities; the probabilities rounded to fp16/bf16 would add an error
    of ~1e-3 of the gradient's scale. S, DP: strided; M: strided bool or None; DS: contiguous [R, SK].
    Reads 2*BLOCK_R*SK elements (+ mask bytes), writes BLOCK_R*SK elements.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < SK
    ok = (rows < R)[:, None] & col_ok[None, :]
    cols64 = cols.to(tl.int64)
    s_off = _row_base(rows, SQ, NH, stride_sb, stride_sh, stride_sq)[:, None] + cols64[None, :] * stride_sk
    g_off = _row_base(rows, SQ, NH, stride_gb, stride_gh, stride_gq)[:, None] + cols64[None, :] * stride_gk
    x = tl.load(S + s_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        m_off = _row_base(rows, SQ, NH, stride_mb, stride_mh, stride_mq)[:, None] + cols64[None, :] * stride_mk
        masked = tl.load(M + m_off, mask=ok, other=0) != 0
        x = tl.where(masked, fill, x)
    dp = tl.load(DP + g_off, mask=ok, other=0.0).to(tl.float32)
    y = tl.where(col_ok[None, :], x * scale, float("-inf"))
    row_max = tl.max(y, axis=1)
    e = tl.exp(y - row_max[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    dot = tl.sum(p * dp, axis=1)
    ds = p * (dp - dot[:, None]) * scale
    if HAS_MASK:
        ds = tl.where(masked, 0.0, ds)
    c_off = rows.to(tl.int64)[:, None] * SK + cols64[None, :]
    tl.store(DS + c_off, downcast(ds, DS.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _softmax_bwd_chunked_kernel(S, M, DP, DS, scale, fill, R, SQ, NH, SK,
                                stride_sb, stride_sh, stride_sq, stride_sk, stride_gb, stride_gh, stride_gq, stride_gk,
                        stride_mb, stride_mh, stride_mq, stride_mk,
                                HAS_MASK: tl.constexpr, CHUNK: tl.constexpr):
    """Same as `_softmax_bwd_kernel` for one long row per program, in CHUNK-wide pieces.

    Loop 1 keeps a running max m, sum s = sum(exp(y - m)) and t = sum(exp(y - m) * DP), both rescaled when m
    grows, so sum(p * DP) = t / s; loop 2 reads the row again and writes DS. Reads 2 * 2*SK elements (scores and
    DP twice) + 2*SK mask bytes, writes SK elements.
    """
    row = tl.program_id(0)
    s_base = _row_base(row, SQ, NH, stride_sb, stride_sh, stride_sq)
    g_base = _row_base(row, SQ, NH, stride_gb, stride_gh, stride_gq)
    m_base = _row_base(row, SQ, NH, stride_mb, stride_mh, stride_mq)
    c_base = row.to(tl.int64) * SK
    offs = tl.arange(0, CHUNK)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    run_dot = tl.full((), 0.0, tl.float32)
    for start in range(0, SK, CHUNK):
        cols = start + offs
        ok = cols < SK
        x, masked = _filled_scores(S, M, s_base, m_base, cols, ok, stride_sk, stride_mk, fill, HAS_MASK)
        dp = tl.load(DP + g_base + cols.to(tl.int64) * stride_gk, mask=ok, other=0.0).to(tl.float32)
        y = tl.where(ok, x * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(y, axis=0))  # finite: every chunk has a column < SK
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(y - new_max)
        run_sum = run_sum * alpha + tl.sum(e, axis=0)
        run_dot = run_dot * alpha + tl.sum(e * dp, axis=0)
        run_max = new_max
    dot = run_dot / run_sum
    for start in range(0, SK, CHUNK):
        cols = start + offs
        ok = cols < SK
        x, masked = _filled_scores(S, M, s_base, m_base, cols, ok, stride_sk, stride_mk, fill, HAS_MASK)
        dp = tl.load(DP + g_base + cols.to(tl.int64) * stride_gk, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(tl.where(ok, x * scale, float("-inf")) - run_max) / run_sum  # no exp overflow past SK
        ds = p * (dp - dot) * scale
        if HAS_MASK:
            ds = tl.where(masked, 0.0, ds)
        tl.store(DS + c_base + cols, downcast(ds, DS.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# launch configuration and byte counts
# ----------------------------------------------------------------------------------------------------------
def launch_config(sk: int) -> dict:
    """The launch configuration for rows of length sk (same for forward and backward).

    Returns {"chunked": bool, "BLOCK": columns per tile (the chunk width when chunked), "BLOCK_R": rows per
    program, "num_warps": int}. Reads MAX_FUSED_BLOCK / CHUNK / ROW_TILE at call time.
    """
    block = max(MIN_BLOCK, triton.next_power_of_2(max(int(sk), 1)))
    if block > MAX_FUSED_BLOCK:
        return {"chunked": True, "BLOCK": CHUNK, "BLOCK_R": 1, "num_warps": _warps(CHUNK)}
    rows = max(1, ROW_TILE // block)
    # the 16-wide tile (64 rows) runs 8 warps: with 4, ptxas spilled 8 bytes of the fp32 backward on sm_75
    return {"chunked": False, "BLOCK": block, "BLOCK_R": rows,
            "num_warps": 8 if block == MIN_BLOCK else _warps(rows * block)}


def _warps(tile: int) -> int:
    """8 elements per thread, between 4 and 16 warps."""
    return max(4, min(16, tile // 256))


def forward_bytes(rows: int, sk: int, elem: int, has_mask: bool, chunked: bool) -> tuple[int, int]:
    """(bytes loaded, bytes stored) by one forward launch over `rows` rows of `sk` elements of `elem` bytes."""
    reads = 2 if chunked else 1
    return reads * rows * sk * (elem + (1 if has_mask else 0)), rows * sk * elem


def backward_bytes(rows: int, sk: int, elem: int, has_mask: bool, chunked: bool) -> tuple[int, int]:
    """(bytes loaded, bytes stored) by one backward launch: scores, dp and mask (twice when chunked)."""
    reads = 2 if chunked else 1
    return reads * rows * sk * (2 * elem + (1 if has_mask else 0)), rows * sk * elem


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _as_4d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > 4:
        raise ValueError(f"scaled_masked_softmax takes scores of at most 4 dims [b, nh, sq, sk]; got {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _unit_columns(t: torch.Tensor, sk: int) -> torch.Tensor:
    """`t` with a unit last stride (the kernels are compiled for it: the contiguous scores the model makes)."""
    if t.stride(-1) != 1:  # rows of one key: the same view with stride 1; else a copy with unit columns
        t = t.as_strided(t.shape, (*t.stride()[:-1], 1)) if t.shape[-1] == 1 else \
            t.expand(*t.shape[:-1], sk).contiguous()
    return t


def _mask_args(mask, shape4):
    """(mask tensor or None, its 4 strides broadcast to shape4)."""
    if mask is None:
        return None, (0, 0, 0, 0)
    m = _unit_columns(mask, shape4[-1]).expand(shape4)
    return m, tuple(m.stride())


def _launch_rows(kernels, args, rows, has_mask, sk):
    """One launch of the single-tile kernel or, for rows longer than MAX_FUSED_BLOCK, of the chunked one."""
    cfg = launch_config(sk)
    if cfg["chunked"]:
        launch(kernels[1], (rows,), *args, HAS_MASK=has_mask, CHUNK=cfg["BLOCK"], num_warps=cfg["num_warps"],
               num_stages=1)
    else:
        launch(kernels[0], (triton.cdiv(rows, cfg["BLOCK_R"]),), *args, HAS_MASK=has_mask, BLOCK_R=cfg["BLOCK_R"],
               BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"], num_stages=1)


class _ScaledMaskedSoftmax(torch.autograd.Function):
    """Forward: one launch of `_softmax_fwd_kernel` (or the chunked variant); backward: one launch of
    `_softmax_bwd_kernel` (or the chunked variant). Saves scores and the (expanded) mask: the backward
    recomputes the fp32 probabilities from them (see the module docstring)."""

    @staticmethod
    def forward(ctx, scores, mask, scale):
        shape = scores.shape
        s4 = _as_4d(scores)
        b, nh, sq, sk = s4.shape
        s4 = _unit_columns(s4, sk)
        m4, m_strides = _mask_args(None if mask is None else _as_4d(mask), s4.shape)
        out = torch.empty(shape, dtype=scores.dtype, device=scores.device)
        rows = b * nh * sq
        if rows > 0 and sk > 0:
            args = (s4, m4, out.view(s4.shape), float(scale), _FILL[scores.dtype], rows, sq, nh, sk, *s4.stride(),
                    *m_strides)
            _launch_rows((_softmax_fwd_kernel, _softmax_fwd_chunked_kernel), args, rows, m4 is not None, sk)
        ctx.save_for_backward(s4, m4)
        ctx.scale, ctx.shape = float(scale), shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        s4, m4 = ctx.saved_tensors
        b, nh, sq, sk = s4.shape
        g4 = _unit_columns(_as_4d(grad_out).expand(s4.shape), sk)
        ds = torch.empty(ctx.shape, dtype=s4.dtype, device=s4.device)
        m_strides = (0, 0, 0, 0) if m4 is None else tuple(m4.stride())
        rows = b * nh * sq
        if rows > 0 and sk > 0:
            args = (s4, m4, g4, ds.view(s4.shape), ctx.scale, _FILL[s4.dtype], rows, sq, nh, sk,
                    *s4.stride(), *g4.stride(), *m_strides)
            _launch_rows((_softmax_bwd_kernel, _softmax_bwd_chunked_kernel), args, rows, m4 is not None, sk)
        return ds, None, None


def _supports(scores, mask, scale):
    """None if the Triton softmax takes this call, else why not."""
    if scores.dtype not in _FILL:
        return f"scaled_masked_softmax: scores must be fp32, fp16 or bf16; got {scores.dtype}"
    if scores.dim() > 4:
        return f"scaled_masked_softmax takes scores of at most 4 dims [b, nh, sq, sk]; got {tuple(scores.shape)}"
    if mask is not None and mask.dtype != torch.bool:
        return f"scaled_masked_softmax: mask must be bool (True = masked); got {mask.dtype}"
    return None


@register("softmax", "triton", supports=_supports)
def _softmax_triton(scores, mask, scale):
    """`softmax(masked_fill(scores, mask, -10000).float() * scale)` cast to `scores.dtype`, fused, differentiable.

    Args:
        scores: `[b, nh, sq, sk]` fp32/fp16/bf16, any strides (CUDA, or CPU under TRITON_INTERPRET=1).
        mask: bool broadcastable to scores (`[b, 1, sq, sk]` / `[1, 1, sq, sk]`), True = masked; or None.
        scale: the layer coefficient (`layer_id + 1`).
    Returns:
        `[b, nh, sq, sk]` contiguous, `scores.dtype`. Gradient flows to `scores` (zero at masked positions).

    One forward launch: reads R*sk*e (+ R*sk mask bytes), writes R*sk*e (R = b*nh*sq, e = element size);
    rows longer than MAX_FUSED_BLOCK read scores and mask twice. One backward launch (recomputes p in
    fp32 from scores): reads 2*R*sk*e (+ R*sk), writes R*sk*e; chunked: reads twice that. See the module
    docstring.
    """
    check_device(scores, mask)
    if scores.dtype not in _FILL:
        raise TypeError(f"scaled_masked_softmax: scores must be fp32, fp16 or bf16; got {scores.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"scaled_masked_softmax: mask must be bool (True = masked); got {mask.dtype}")
        if mask.device != scores.device:
            raise ValueError(f"mask is on {mask.device}, scores on {scores.device}")
    return _ScaledMaskedSoftmax.apply(scores, mask, scale)


# ----------------------------------------------------------------------------------------------------------
# ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------------------
def _all_configs() -> list[dict]:
    """Every distinct value `launch_config` can return with the module's constants, with an sk reaching it."""
    seen, out = set(), []
    sk = 1
    while True:
        cfg = launch_config(sk)
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append((cfg, sk))
        if cfg["chunked"]:
            return out
        sk *= 2


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """One spec per (kernel, dtype, launch config, mask or not): every configuration `launch_config` can return
    (the same on every GPU), recorded from the launchers on meta tensors. Each is reached with a row length
    divisible by 16, one that is not, and (for the smallest tile) rows of one key: the three specialisations
    of SK that occur."""
    with assume_device(target or TARGETS[80]), record_launches() as launches:
        for dtype in DTYPES:
            for cfg, sk in _all_configs():
                for n in sorted({sk, sk - 1, sk // 2 + 1, 16, 15, 1}):
                    if n < 1 or launch_config(n) != cfg:
                        continue
                    for has_mask in (True, False):
                        scores = meta(2, 2, 3, n, dtype=dtype).requires_grad_()
                        mask = meta(2, 1, 3, n, dtype=torch.bool) if has_mask else None
                        p = _softmax_triton(scores, mask, 2.0)
                        p.backward(meta(*p.shape, dtype=dtype))

    def extra(ln):
        sk = ln.arg("SK")
        return {"dtype": tensor_dtype(ln), "config": launch_config(sk), "has_mask": ln.kwargs["HAS_MASK"]}

    def label(ln, consts):
        cfg = launch_config(ln.arg("SK"))
        tag = f"{'mask' if consts['HAS_MASK'] else 'nomask'} w{cfg['num_warps']}"
        if cfg["chunked"]:
            return f"{TL_TYPE[tensor_dtype(ln)]} chunked CHUNK={cfg['BLOCK']} {tag}"
        return f"{TL_TYPE[tensor_dtype(ln)]} BLOCK_R={cfg['BLOCK_R']} BLOCK={cfg['BLOCK']} {tag}"

    return specs_from_launches(launches, label, extra)
