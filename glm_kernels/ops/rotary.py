"""2D rotary position embedding of ChatGLM-6B.

Each head vector (head dim hd) is split in two halves of hd/2: the first is
rotated by the token position, the second by the block position. Within a
half, the rotation is the half-split form `x*cos + rotate_half(x)*sin` with
`rotate_half(x) = cat(-x[hd/4:], x[:hd/4])`.

Rotary tables follow the original (`RotaryEmbedding` in THUDM's code):
`inv_freq = 1/10000**(arange(0, d, 2)/d)` rounded to fp16, `d = hd/2`.
- fp16 model: positions, products and cos/sin in fp16, as the original does.
- fp32 (and fp64) model: the same computed in that dtype.
- bf16 model (our choice, see README): the table is computed in fp32 and
  rounded to bf16 once. The original computes it in bf16, where positions
  above 256 are no longer exact integers (bf16 keeps 8 significant bits), so
  positions 257 and 256 would share a rotation.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..backend import call, register
from .. import cpu_ext


def inv_freq(rot_dim: int) -> torch.Tensor:
    """fp16-rounded inverse frequencies, `[rot_dim // 2]`, returned as fp16."""
    return (1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))).half()


@functools.lru_cache(maxsize=32)
def rotary_table(n: int, rot_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """`(cos, sin)`, each `[n, rot_dim]` in `dtype` on `device`, for positions `0..n-1`."""
    freq16 = inv_freq(rot_dim)
    if dtype == torch.float16:
        t = torch.arange(n, dtype=torch.float16)
        # A product of two fp16 numbers is exact in fp32; rounding it to fp16 is
        # the fp16 multiply the original performs.
        freqs = (t.float()[:, None] * freq16.float()[None, :]).half()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.float().cos().half(), emb.float().sin().half()
    else:
        work = torch.float32 if dtype == torch.bfloat16 else dtype
        t = torch.arange(n, dtype=work)
        freqs = torch.outer(t, freq16.to(work))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return cos.to(device), sin.to(device)


def _rotate_half_2d(x: torch.Tensor) -> torch.Tensor:
    """`rotate_half` applied to each of the two halves of the last axis."""
    x4 = x.unflatten(-1, (2, 2, x.shape[-1] // 4))
    return torch.stack((-x4[..., 1, :], x4[..., 0, :]), dim=-2).flatten(-3)


@register("rotary", "torch")
def _rotary_torch(q, k, cos, sin, position_ids):
    pos = position_ids[:, 0, :].t()
    block = position_ids[:, 1, :].t()
    c = torch.cat((F.embedding(pos, cos), F.embedding(block, cos)), dim=-1).unsqueeze(2)
    s = torch.cat((F.embedding(pos, sin), F.embedding(block, sin)), dim=-1).unsqueeze(2)
    return q * c + _rotate_half_2d(q) * s, k * c + _rotate_half_2d(k) * s


# Tokens (s * b) up to which CPU inference runs the C++ extension's fused `rope_qkv` (decoding, short chunks).
FEW_TOKENS = 64


@register("rope", "torch")
def _rope_qkv_torch(mixed, position_ids, cos, sin, num_heads, k_out, v_out):
    s, b, _ = mixed.shape
    if (mixed.device.type == "cpu" and s * b <= FEW_TOKENS and cpu_ext.extension() is not None
            and not (torch.is_grad_enabled() and mixed.requires_grad)):
        # one pass: split, 2D rotation computed in fp32 and rounded once, k and v written into the cache views
        return cpu_ext.extension().rope_qkv(mixed, position_ids, cos, sin, num_heads, k_out, v_out)
    q, k, v = mixed.view(s, b, num_heads, -1).split(mixed.shape[-1] // (3 * num_heads), dim=-1)
    q, k = _rotary_torch(q, k, cos, sin, position_ids)
    if k_out is not None:
        k_out.copy_(k)
        v_out.copy_(v)
        return q, k_out, v_out
    return q, k, v


def rope_qkv(mixed, position_ids, cos, sin, num_heads: int, k_out=None, v_out=None, backend: str | None = None):
    """Split the fused QKV projection, rotate q and k, and optionally write k, v into a cache.

    Args:
        mixed: `[s, b, 3*h]` output of `query_key_value`; per head the row
            block is `[q | k | v]` (hd each), heads in order.
        position_ids: `[b, 2, s]` int64 positions and block positions.
        cos, sin: `[n, hd/2]` tables in the dtype of `mixed` (`rotary_table`).
        num_heads: nh; hd = h / nh.
        k_out, v_out: optional `[s, b, nh, hd]` views into a preallocated KV
            buffer (e.g. `buf[offset:offset + s]`): k and v are written there
            (inference only: no autograd through the buffer).
    Returns:
        `(q, k, v)`, each `[s, b, nh, hd]` in the dtype of `mixed`; k, v are
        `k_out`, `v_out` when given.
    """
    if cos.dtype != mixed.dtype or sin.dtype != mixed.dtype:
        raise TypeError(f"rotary tables are {cos.dtype}/{sin.dtype} but the QKV output is {mixed.dtype}")
    if (k_out is None) != (v_out is None):
        raise ValueError("pass both k_out and v_out, or neither")
    return call("rope", mixed.device, backend, mixed, position_ids, cos, sin, num_heads, k_out, v_out)


def apply_rotary_2d(q, k, cos, sin, position_ids, backend: str | None = None):
    """Rotate queries and keys by GLM's 2D positions.

    Args:
        q, k: `[s, b, nh, hd]`, any strides, fp32/fp16/bf16.
        cos, sin: `[n, hd/2]` tables in the dtype of q (`rotary_table`).
        position_ids: `[b, 2, s]` int64; row 0 token positions, row 1 block
            positions, each `< n`.
    Returns:
        `(q_rot, k_rot)`, `[s, b, nh, hd]` in the dtype of q.
    """
    if cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise TypeError(f"rotary tables are {cos.dtype}/{sin.dtype} but q is {q.dtype}")
    return call("rotary", q.device, backend, q, k, cos, sin, position_ids)
