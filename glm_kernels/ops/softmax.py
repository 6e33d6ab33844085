"""Scaled masked softmax of GLM attention scores.

The original computes, from scores `s` in the model dtype (already divided by
the layer coefficient `coeff = layer_id + 1`):
`s.masked_fill(mask, -10000)`, `p = softmax(s.float() * coeff)`, `p.to(dtype)`.
The fill is finite, so a row whose entries are all masked gets a uniform
distribution, never NaN.
"""
from __future__ import annotations

import torch

from ..backend import call, register

MASK_FILL = -10000.0


@register("softmax", "torch")
def _softmax_torch(scores, mask, scale):
    if mask is not None and bool(mask.any()):
        scores = scores.masked_fill(mask, MASK_FILL)
    return torch.softmax(scores.float() * scale, dim=-1).to(scores.dtype)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          backend: str | None = None) -> torch.Tensor:
    """`softmax(masked_fill(scores, mask, -10000).float() * scale)` cast to `scores.dtype`.

    Args:
        scores: `[b, nh, sq, sk]` fp32/fp16/bf16.
        mask: bool, broadcastable to scores (`[b, 1, sq, sk]`), True = masked; or None.
        scale: the layer coefficient (`layer_id + 1`).
    """
    return call("softmax", scores.device, backend, scores, mask, scale)
