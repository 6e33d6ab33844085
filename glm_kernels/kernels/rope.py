"""Op "rope": split the fused QKV projection, apply GLM's 2D rotary to q and k, write q, k, v (Triton).

`rope_qkv(mixed, position_ids, cos, sin, num_heads, k_out=None, v_out=None)`
(see `glm_kernels.ops.rotary.rope_qkv`; this launcher has the signature of
`_rope_qkv_torch` and its semantics).

Shapes (h = nh * hd, n = rows of the rotary tables):
- `mixed` `[s, b, 3h]`, fp32/fp16/bf16; per head the row block is
  `[q | k | v]` (hd each), heads in order. Any strides on s, b; the last
  axis must be contiguous (otherwise it is made contiguous first: one copy).
- `position_ids` `[b, 2, s]` int64 (any strides): row 0 positions, row 1
  block positions, each in `[0, n)`. On the CPU (interpreter) the range is
  checked on the host (IndexError, as `F.embedding` raises); on a GPU it is
  not (a check would synchronise the device) but a device assert fires when
  kernels are compiled with `TRITON_DEBUG=1`.
- `cos`, `sin` `[n, hd/2]` in the dtype of `mixed` (`ops.rotary_table`).
- `k_out`, `v_out` (optional) `[s, b, nh, hd]` views with a contiguous last
  axis and the dtype of `mixed`, typically `buf[offset:offset + s]` of a
  preallocated `[S, b, nh, hd]` KV buffer: the kernel writes k and v there,
  which is the prefix/cache concatenation itself (no `torch.cat`, the past is
  never copied). Inference only.
- Returns `q` `[s, b, nh, hd]` (fresh, contiguous) and `k`, `v` (`k_out`,
  `v_out`, or fresh contiguous `[s, b, nh, hd]` tensors).

What one forward launch fuses (the original: view + split of `mixed`, chunk of
q and k into halves, two `F.embedding` gathers of cos and two of sin, four
`rotate_half` cats, the multiply-adds, the cat of the halves, then
`torch.cat((past_k, k))` / `torch.cat((past_v, v))`): every element of
`mixed` is read once, cos/sin rows are gathered by the position ids inside
the kernel, the rotation is computed in fp32 and rounded once to the output
dtype, and q, k, v are each written once, k and v straight into the cache.

Rotation. A head vector splits into quarters `x0 x1 | x2 x3` (hd/4 each);
the first half rotates by the position p, the second by the block position
p'. With `c = cos[p]`, `s = sin[p]` split into halves `c_lo c_hi`, `s_lo s_hi`:
    y0 = x0 * c_lo - x1 * s_lo        y1 = x1 * c_hi + x0 * s_hi
(the same for x2, x3 with the rows of p'). That is `x*cos + rotate_half(x)*sin`
with `rotate_half(x) = cat(-x1, x0)`. Its transpose (the backward) is the same
formula with `(s_lo, s_hi)` replaced by `(-s_hi, -s_lo)`: the inverse rotation
(for tables built as `cat(freqs, freqs)`, simply sin negated), selected by the
constexpr `INVERSE`.

Backward (`torch.autograd.Function`, only when `k_out` is None): from dq, dk,
dv (each may be None: treated as zero, never materialised) one launch of the
same kernel writes `dmixed` `[s, b, 3h]`: inverse-rotated dq and dk, dv copied.

Launch configuration (deterministic, no autotuning; `compile_specs` lists
every one): one program per (token, group of BLOCK_H heads),
`BLOCK_H = 2048 // hd` (heads of one token handled by a program; 128 heads at
hd 16 ... 8 heads at hd 256), `num_warps = 4`; grid `(s*b, G)`,
`G = ceil(nh / BLOCK_H)`.

Bytes per launch (e = element size of `mixed`; position ids are 8 bytes):
- forward:  loads  `s*b*(3*nh*hd*e + G*(16 + 2*hd*e))`
            stores `3*s*b*nh*hd*e`
- backward: loads  `s*b*(P*nh*hd*e + R*G*(16 + 2*hd*e))`, P = number of dq,
            dk, dv given, R = 1 if dq or dk is given else 0
            stores `3*s*b*nh*hd*e`
Each program reads the two position ids of its token and the four table rows
they select (cos and sin of p and p', hd/2 each: `2*hd*e` bytes). The minimum
(each input once) counts those once per token (as if no two tokens shared a
row): with G = 1 (nh * hd <= 2048,
e.g. the tiny test model) a launch moves exactly its minimum. With G > 1 the
position ids and table rows are re-read by each of the G programs of a token
(from L2 on a GPU): ChatGLM-6B (hd 128, nh 32, G = 2) loads 1.02x and moves
(loads + stores) 1.01x its minimum. The worst case, hd 256 with many heads,
loads up to 1.085x (moves 1.04x) its minimum. Splitting heads over programs
is deliberate: it keeps a program's tile at 2048 elements per tensor and
gives a one-token decode step G programs instead of one.

ChatGLM-6B (fp16, nh 32, hd 128, G 2), per layer: prefill b 1, s 1024 loads
26,247,168 B and stores 25,165,824 B; a decode step (b 1, s 1) loads 25,632 B
and stores 24,576 B, k and v landing in the cache (the original's
`torch.cat` re-reads and re-writes the whole past instead).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..backend import register
from ..backend import TARGETS, DeviceInfo, assume_device
from .common import (DTYPES, TL_TYPE, CompileSpec, aligned, check_device, downcast, launch, meta, record_launches,
                     specs_from_launches, strides, tensor_dtype)

HEAD_DIMS = (16, 32, 64, 128, 256)
TILE_ELEMENTS = 2048  # elements of one tensor (q, k or v) a program handles: BLOCK_H * hd
NUM_WARPS = 4


@triton.jit
def _rotate_half_tile(X, Y, x_row, y_row, x_cols, y_cols, load_mask, store_mask,
                      c_lo, c_hi, s_lo, s_hi, QUARTER: tl.constexpr):
    """One half of a [BLOCK_H, hd] tile: quarters a, b -> a*c_lo - b*s_lo, b*c_hi + a*s_hi (fp32, rounded once)."""
    xa = tl.load(X + x_row + x_cols, mask=load_mask, other=0.0).to(tl.float32)
    xb = tl.load(X + x_row + x_cols + QUARTER, mask=load_mask, other=0.0).to(tl.float32)
    ya = xa * c_lo[None, :] - xb * s_lo[None, :]
    yb = xb * c_hi[None, :] + xa * s_hi[None, :]
    tl.store(Y + y_row + y_cols, downcast(ya, Y.dtype.element_ty), mask=store_mask)
    tl.store(Y + y_row + y_cols + QUARTER, downcast(yb, Y.dtype.element_ty), mask=store_mask)


@triton.jit
def _table_rows(COS, SIN, pos, cols, mask, QUARTER: tl.constexpr, INVERSE: tl.constexpr):
    """cos and sin rows of one position as fp32 halves; for INVERSE (s_lo, s_hi) -> (-s_hi, -s_lo)."""
    c_row = COS + pos * (2 * QUARTER)
    s_row = SIN + pos * (2 * QUARTER)
    c_lo = tl.load(c_row + cols, mask=mask, other=0.0).to(tl.float32)
    c_hi = tl.load(c_row + QUARTER + cols, mask=mask, other=0.0).to(tl.float32)
    s_lo = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
    s_hi = tl.load(s_row + QUARTER + cols, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        return c_lo, c_hi, -s_hi, -s_lo
    return c_lo, c_hi, s_lo, s_hi


# Never specialised: the batch, the heads and the table length change from model to model, the position ids'
# strides with the sequence length, and the presence flags between forward and backward (each loads or stores
# a scalar or masks a tile: one compiled kernel serves every call).
_NOT_SPECIALISED = ["batch", "num_heads", "n_pos", "POS", "stride_pb", "stride_pr", "stride_ps",
                    "has_q", "has_k", "has_v"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _rope_qkv_kernel(
    XQ, XK, XV,  # inputs, each [s, b, nh, hd] (forward: views of mixed; backward: dq, dk, dv)
    YQ, YK, YV,  # outputs, each [s, b, nh, hd] (forward: q, k, v; backward: views of dmixed)
    POS, COS, SIN,  # position ids [b, 2, s] int64; tables [n, hd/2] contiguous
    batch, num_heads, n_pos,
    stride_xqs, stride_xqb, stride_xqh, stride_xks, stride_xkb, stride_xkh, stride_xvs, stride_xvb, stride_xvh,
    stride_yqs, stride_yqb, stride_yqh, stride_yks, stride_ykb, stride_ykh, stride_yvs, stride_yvb, stride_yvh,
    stride_pb, stride_pr, stride_ps,
    has_q, has_k, has_v,  # 1 or 0; 0: that input is absent (zero): not loaded, zeros stored
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, INVERSE: tl.constexpr,
):
    """Program (t, g): token t = s_idx * batch + b_idx, heads [g*BLOCK_H, (g+1)*BLOCK_H)."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    tok = tl.program_id(0)
    grp = tl.program_id(1)
    s_idx = (tok // batch).to(tl.int64)
    b_idx = (tok % batch).to(tl.int64)

    heads = grp * BLOCK_H + tl.arange(0, BLOCK_H)  # heads * stride < nh * 3 * hd: int32 is enough
    hmask = heads < num_heads
    cols = tl.arange(0, QUARTER)
    dcols = tl.arange(0, HEAD_DIM)
    # Masks are built from comparisons only: under the interpreter `block_mask & scalar_bool` yields ints.
    rotate = has_q | has_k  # 0 or 1

    # Position and block position of this token, then the four table rows they select.
    p_ptr = POS + b_idx * stride_pb + s_idx * stride_ps
    pos = tl.load(p_ptr, mask=rotate != 0, other=0)
    blk = tl.load(p_ptr + stride_pr, mask=rotate != 0, other=0)
    tl.device_assert((pos >= 0) & (pos < n_pos) & (blk >= 0) & (blk < n_pos),
                     "position id outside the rotary table")
    tmask = cols < rotate * QUARTER
    pc_lo, pc_hi, ps_lo, ps_hi = _table_rows(COS, SIN, pos, cols, tmask, QUARTER, INVERSE)
    bc_lo, bc_hi, bs_lo, bs_hi = _table_rows(COS, SIN, blk, cols, tmask, QUARTER, INVERSE)

    full = hmask[:, None] & (cols[None, :] < QUARTER)
    # q: first half by the position, second half by the block position.
    xq = s_idx * stride_xqs + b_idx * stride_xqb
    yq = s_idx * stride_yqs + b_idx * stride_yqb
    xq_cols = heads[:, None] * stride_xqh + cols[None, :]
    yq_cols = heads[:, None] * stride_yqh + cols[None, :]
    lq = full & (cols[None, :] < has_q * QUARTER)
    _rotate_half_tile(XQ, YQ, xq, yq, xq_cols, yq_cols, lq, full, pc_lo, pc_hi, ps_lo, ps_hi, QUARTER)
    _rotate_half_tile(XQ, YQ, xq + 2 * QUARTER, yq + 2 * QUARTER, xq_cols, yq_cols, lq, full,
                      bc_lo, bc_hi, bs_lo, bs_hi, QUARTER)
    # k: the same rotation.
    xk = s_idx * stride_xks + b_idx * stride_xkb
    yk = s_idx * stride_yks + b_idx * stride_ykb
    xk_cols = heads[:, None] * stride_xkh + cols[None, :]
    yk_cols = heads[:, None] * stride_ykh + cols[None, :]
    lk = full & (cols[None, :] < has_k * QUARTER)
    _rotate_half_tile(XK, YK, xk, yk, xk_cols, yk_cols, lk, full, pc_lo, pc_hi, ps_lo, ps_hi, QUARTER)
    _rotate_half_tile(XK, YK, xk + 2 * QUARTER, yk + 2 * QUARTER, xk_cols, yk_cols, lk, full,
                      bc_lo, bc_hi, bs_lo, bs_hi, QUARTER)
    # v: copied.
    vfull = hmask[:, None] & (dcols[None, :] < HEAD_DIM)
    xv = XV + s_idx * stride_xvs + b_idx * stride_xvb + heads[:, None] * stride_xvh + dcols[None, :]
    yv = YV + s_idx * stride_yvs + b_idx * stride_yvb + heads[:, None] * stride_yvh + dcols[None, :]
    v = tl.load(xv, mask=vfull & (dcols[None, :] < has_v * HEAD_DIM), other=0.0)
    tl.store(yv, v.to(YV.dtype.element_ty), mask=vfull)


def launch_config(head_dim: int, dtype: torch.dtype | None = None) -> dict:
    """The launch configuration for head dim `head_dim` (the same for every dtype): BLOCK_H and num_warps."""
    _check_head_dim(head_dim)
    return {"BLOCK_H": max(1, TILE_ELEMENTS // head_dim), "num_warps": NUM_WARPS}


def _check_head_dim(hd: int) -> None:
    if hd not in HEAD_DIMS:
        raise ValueError(f"the triton rope kernel supports head dims {HEAD_DIMS} (powers of two from 16 to 256); "
                         f"got hd={hd}")


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Unit last stride, 16-byte aligned start (the kernel's one specialisation; the model's tensors have it)."""
    return aligned(t if t.stride(-1) == 1 else t.contiguous())


def _launch(xs, ys, has, position_ids, cos, sin, inverse: bool) -> None:
    """One launch: xs, ys are three [s, b, nh, hd] tensors each (last axis contiguous); `has` flags the inputs."""
    s, b, nh, hd = ys[0].shape
    if s * b == 0 or nh == 0:
        return
    cfg = launch_config(hd)
    grid = (s * b, triton.cdiv(nh, cfg["BLOCK_H"]))
    launch(
        _rope_qkv_kernel, grid,
        xs[0], xs[1], xs[2], ys[0], ys[1], ys[2],
        position_ids, cos, sin,
        b, nh, cos.shape[0],
        *(st for t in (*xs, *ys) for st in strides(t)),
        position_ids.stride(0), position_ids.stride(1), position_ids.stride(2),
        int(has[0]), int(has[1]), int(has[2]),
        HEAD_DIM=hd, BLOCK_H=cfg["BLOCK_H"], INVERSE=inverse, num_warps=cfg["num_warps"], num_stages=1,
    )


def _split_heads(t: torch.Tensor, num_heads: int):
    """`[s, b, 3h]` -> the q, k, v views `[s, b, nh, hd]` of the per-head `[q | k | v]` blocks."""
    heads = t.unflatten(-1, (num_heads, -1))
    return heads.chunk(3, dim=-1)


def _forward(mixed, position_ids, cos, sin, num_heads, k_out, v_out):
    s, b, three_h = mixed.shape
    hd = three_h // (3 * num_heads)
    q = torch.empty((s, b, num_heads, hd), dtype=mixed.dtype, device=mixed.device)
    if k_out is None:
        k_out = torch.empty_like(q)
        v_out = torch.empty_like(q)
    _launch(_split_heads(mixed, num_heads), (q, k_out, v_out), (True, True, True), position_ids, cos, sin,
            inverse=False)
    return q, k_out, v_out


class RopeQKV(torch.autograd.Function):
    """q, k, v = rope_qkv(mixed); backward: dmixed = [inverse-rotated dq | inverse-rotated dk | dv] per head.

    Forward: one launch, bytes as in the module docstring (forward). Backward:
    one launch writing `dmixed` `[s, b, 3h]`; absent gradients (None) are not
    materialised: they cost no reads and zeros are stored in their place.
    """

    @staticmethod
    def forward(ctx, mixed, position_ids, cos, sin, num_heads):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(position_ids, cos, sin)
        ctx.num_heads = num_heads
        ctx.mixed_shape = mixed.shape
        return _forward(mixed, position_ids, cos, sin, num_heads, None, None)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        position_ids, cos, sin = ctx.saved_tensors
        grads = (dq, dk, dv)
        if all(g is None for g in grads):
            return None, None, None, None, None
        dmixed = torch.empty(ctx.mixed_shape, dtype=cos.dtype, device=cos.device)
        ys = _split_heads(dmixed, ctx.num_heads)
        # An absent gradient is passed as a placeholder (its output view): every load from it is masked off.
        xs = tuple(_last_contiguous(g.to(cos.dtype)) if g is not None else y for g, y in zip(grads, ys))
        _launch(xs, ys, tuple(g is not None for g in grads), position_ids, cos, sin, inverse=True)
        return dmixed, None, None, None, None


def _supports(mixed, position_ids, cos, sin, num_heads, k_out=None, v_out=None):
    """None if the Triton rope kernel takes this call, else why not."""
    if mixed.dtype not in TL_TYPE:
        return f"the triton rope kernel supports {', '.join(TL_TYPE.values())}, got {mixed.dtype}"
    if mixed.dim() != 3 or mixed.shape[-1] % (3 * num_heads):
        return f"mixed must be [s, b, 3 * {num_heads} * hd], got shape {tuple(mixed.shape)}"
    hd = mixed.shape[-1] // (3 * num_heads)
    if hd not in HEAD_DIMS:
        return f"the triton rope kernel supports head dims {HEAD_DIMS} (powers of two from 16 to 256), got hd={hd}"
    return None


@register("rope", "triton", supports=_supports)
def _rope_qkv_triton(mixed, position_ids, cos, sin, num_heads, k_out, v_out):
    """Triton `rope_qkv`: one launch reads `mixed` once and writes q, k, v (k, v into `k_out`, `v_out` if given).

    Args / returns as `glm_kernels.ops.rotary.rope_qkv`. Raises ValueError for
    an unsupported head dim, mismatched shapes, a cache write that autograd
    would need to differentiate, or tables that require grad; TypeError for an
    unsupported dtype or a cache of another dtype.
    """
    check_device(mixed, position_ids, cos, sin, k_out, v_out)
    if mixed.dtype not in TL_TYPE:
        raise TypeError(f"the triton rope kernel supports {', '.join(map(str, TL_TYPE))}; got {mixed.dtype}")
    if mixed.dim() != 3:
        raise ValueError(f"mixed must be [s, b, 3h]; got shape {tuple(mixed.shape)}")
    s, b, three_h = mixed.shape
    if three_h % (3 * num_heads):
        raise ValueError(f"the last axis of mixed ({three_h}) is not 3 * num_heads ({num_heads}) * head dim")
    hd = three_h // (3 * num_heads)
    _check_head_dim(hd)
    if cos.dim() != 2 or cos.shape[-1] != hd // 2 or sin.shape != cos.shape:
        raise ValueError(f"rotary tables must be [n, hd/2 = {hd // 2}]; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if tuple(position_ids.shape) != (b, 2, s):
        raise ValueError(f"position_ids must be [b, 2, s] = {[b, 2, s]}; got {list(position_ids.shape)}")
    grad = torch.is_grad_enabled()
    if grad and (cos.requires_grad or sin.requires_grad):
        raise ValueError("the triton rope kernel does not differentiate the rotary tables (they are buffers)")
    position_ids = position_ids if position_ids.dtype == torch.int64 else position_ids.long()
    if position_ids.device.type == "cpu" and position_ids.numel():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise IndexError(f"position ids span [{lo}, {hi}] but the rotary tables have {cos.shape[0]} rows")
    cos, sin = cos.contiguous(), sin.contiguous()
    mixed = _last_contiguous(mixed)
    if k_out is not None:
        if grad and mixed.requires_grad:
            raise ValueError("rope_qkv with k_out/v_out writes a KV cache and is inference-only: call it under "
                             "torch.no_grad() or without requires_grad on mixed")
        for name, t in (("k_out", k_out), ("v_out", v_out)):
            if tuple(t.shape) != (s, b, num_heads, hd):
                raise ValueError(f"{name} must be [s, b, nh, hd] = {[s, b, num_heads, hd]}; got {list(t.shape)}")
            if t.dtype != mixed.dtype:
                raise TypeError(f"{name} is {t.dtype} but mixed is {mixed.dtype}")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last axis; got strides {t.stride()}")
        return _forward(mixed, position_ids, cos, sin, num_heads, k_out, v_out)
    if grad and mixed.requires_grad:
        return RopeQKV.apply(mixed, position_ids, cos, sin, num_heads)
    return _forward(mixed, position_ids, cos, sin, num_heads, None, None)


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every launch configuration `launch_config` can return (the same on every GPU), forward and backward, fp16,
    bf16 and fp32: the launchers run on meta tensors and their launches are recorded."""
    s, b = 8, 2
    with assume_device(target or TARGETS[80]), record_launches() as launches:
        for dtype in DTYPES:
            for hd in HEAD_DIMS:
                nh = 2 * launch_config(hd)["BLOCK_H"]
                mixed = meta(s, b, 3 * nh * hd, dtype=dtype).requires_grad_()
                cos, sin = meta(64, hd // 2, dtype=dtype), meta(64, hd // 2, dtype=dtype)
                q, k, v = _rope_qkv_triton(mixed, meta(b, 2, s, dtype=torch.long), cos, sin, nh, None, None)
                torch.autograd.backward((q, k, v), (torch.ones_like(q), torch.ones_like(k), torch.ones_like(v)))

    def label(ln, consts):
        return (f"{TL_TYPE[tensor_dtype(ln)]} hd={consts['HEAD_DIM']} BLOCK_H={consts['BLOCK_H']} "
                f"warps={ln.kwargs['num_warps']} {'bwd' if consts['INVERSE'] else 'fwd'}")

    return specs_from_launches(launches, label, lambda ln: {"dtype": tensor_dtype(ln)})
