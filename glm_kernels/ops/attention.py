"""GLM self-attention core: scores, GLM mask, softmax, weighted sum of values.

For layer `i` the original computes, in the model dtype,
`q / (sqrt(hd) * (i + 1)) @ k^T`, fills masked scores with -10000, takes the
softmax of `scores.float() * (i + 1)` in fp32, casts back and multiplies by v.
"""
from __future__ import annotations

import math

import torch

from ..backend import dispatch, register
from .softmax import scaled_masked_softmax


@register("attention", "torch")
def _attention_torch(q, k, v, layer_id, mask, output_attentions):
    sq, b, nh, hd = q.shape
    coeff = float(layer_id + 1)
    q = q / (math.sqrt(hd) * coeff)
    scores = torch.matmul(q.permute(1, 2, 0, 3), k.permute(1, 2, 3, 0))
    probs = scaled_masked_softmax(scores, mask, coeff, backend="torch")
    ctx = torch.matmul(probs, v.permute(1, 2, 0, 3))
    ctx = ctx.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)
    return ctx, (probs if output_attentions else None)


def glm_attention(q, k, v, layer_id: int, mask: torch.Tensor | None, output_attentions: bool = False,
                  backend: str | None = None):
    """Attention of GLM layer `layer_id` over `[past | new]` keys.

    Args:
        q: `[sq, b, nh, hd]`; k, v: `[sk, b, nh, hd]` (past keys first); any
            strides; fp32/fp16/bf16, all the same dtype.
        layer_id: 0-based layer index (sets the coefficient `layer_id + 1`).
        mask: bool `[b or 1, 1, sq, sk]`, True = may not attend; or None.
        output_attentions: also return the probabilities.
    Returns:
        `(context [sq, b, nh*hd], probs [b, nh, sq, sk] or None)`.
    """
    return dispatch("attention", q.device, backend)(q, k, v, layer_id, mask, output_attentions)
