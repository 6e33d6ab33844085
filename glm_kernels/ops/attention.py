"""GLM self-attention core: scores, GLM mask, softmax, weighted sum of values.

For layer `i` the original computes, in the model dtype,
`q / (sqrt(hd) * (i + 1)) @ k^T`, fills masked scores with -10000, takes the
softmax of `scores.float() * (i + 1)` in fp32, casts back and multiplies by v.
The torch implementation does exactly that when gradients or probabilities
are needed; for inference it calls PyTorch's fused attention (flash attention
on the CPU: no `[sq, sk]` scores, strided cache views read in place), or for
up to `FEW_ROWS` query rows on the CPU the C++ extension's `attention_few`
(the same fp32 arithmetic without PyTorch's per-call set-up).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backend import call, register
from .. import cpu_ext
from .mask import GLMMask
from .softmax import scaled_masked_softmax


# Query rows up to which CPU inference uses the C++ extension's `attention_few` (decoding, short chunks): PyTorch's
# fused CPU attention has a fixed cost of ~0.4 ms per bf16 call at decode sizes (csrc/attention_cpu.cpp).
FEW_ROWS = 16


def _fused_inference(q, k, v, mask):
    """Inference without the probabilities: PyTorch's fused attention.

    Equal to the original's arithmetic up to rounding (scores in fp32 instead of
    the model dtype): masked keys get zero weight either way. A fully masked row
    (left padding without a prefix) gets the original's uniform distribution over
    every key: its mask is lifted and its query zeroed, so all its scores are 0.
    Decided on the device (no host sync: this runs in every layer of every step).
    """
    if q.device.type == "cpu" and q.shape[0] <= FEW_ROWS and cpu_ext.extension() is not None:
        return cpu_ext.extension().attention_few(q, k, v, mask)
    q, k, v = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    visible = None
    if mask is not None:
        full = mask.all(dim=-1, keepdim=True)  # [b or 1, 1, sq, 1]
        visible = ~mask | full
        q = q.masked_fill(full, 0.0)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    b, nh, sq, hd = ctx.shape
    return ctx.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)


@register("attention", "torch")
def _attention_torch(q, k, v, layer_id, mask, output_attentions, past_k=None, past_v=None, softmax_backend="torch"):
    if past_k is not None:
        k, v = torch.cat((past_k, k), dim=0), torch.cat((past_v, v), dim=0)
    if isinstance(mask, GLMMask):
        mask = mask.dense(q.shape[0], k.shape[0])
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not output_attentions and not grads:
        return _fused_inference(q, k, v, mask), None
    sq, b, nh, hd = q.shape
    coeff = float(layer_id + 1)
    q = q / (math.sqrt(hd) * coeff)
    scores = torch.matmul(q.permute(1, 2, 0, 3), k.permute(1, 2, 3, 0))
    probs = scaled_masked_softmax(scores, mask, coeff, backend=softmax_backend)
    ctx = torch.matmul(probs, v.permute(1, 2, 0, 3))
    ctx = ctx.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)
    return ctx, (probs if output_attentions else None)


def glm_attention(q, k, v, layer_id: int, mask, output_attentions: bool = False, past_k=None, past_v=None,
                  backend: str | None = None):
    """Attention of GLM layer `layer_id` over `[past | new]` keys.

    Args:
        q: `[sq, b, nh, hd]`; k, v: `[sk_new, b, nh, hd]`, the new tokens' keys
            and values; any strides; fp32/fp16/bf16, all the same dtype.
        layer_id: 0-based layer index (sets the coefficient `layer_id + 1`).
        mask: None (every key visible); a `GLMMask` (compact, never
            materialised by the Triton kernel); or bool
            `[b or 1, 1, sq, past + sk_new]`, True = may not attend.
        output_attentions: also return the probabilities.
        past_k, past_v: `[past, b, nh, hd]` keys/values before the new ones
            (P-Tuning prefix, then cached tokens), or None.
    Returns:
        `(context [sq, b, nh*hd], probs [b, nh, sq, past + sk_new] or None)`.
    """
    return call("attention", q.device, backend, q, k, v, layer_id, mask, output_attentions, past_k, past_v)
