"""LayerNorm and the alpha-scaled residual LayerNorm of the GLM block.

The block joins its residuals as `h = a * alpha + attn(a)` and
`out = m * alpha + mlp(m)` where `a`, `m` are LayerNorm outputs; the first
join feeds `post_attention_layernorm`: `m = LayerNorm(a * alpha + attn)`.
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import cpu_ext
from ..backend import call, register


@register("layernorm", "torch")
def _layernorm_torch(x, residual, alpha, weight, bias, eps, return_sum=False):
    # CPU inference: the extension's one-pass form (same roundings of the join, statistics in fp32), which the
    # one-call blocks (csrc/block_cpu.cpp) use too
    ext = None if return_sum or weight is None or bias is None else cpu_ext.inference_extension(x, residual, weight,
                                                                                                   bias)
    if ext is not None and (residual is None or residual.shape == x.shape) and weight.shape == bias.shape == \
            x.shape[-1:]:
        return ext.residual_layer_norm(x, residual, alpha, weight, bias, eps)
    if residual is not None:
        x = x * alpha + residual
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return (y, x) if return_sum else y


def residual_layer_norm(x, residual, alpha: float, weight, bias, eps: float, return_sum: bool = False,
                        backend: str | None = None):
    """`LayerNorm(x * alpha + residual)` over the last axis.

    Args:
        x, residual: `[..., h]`, same shape and dtype (fp32/fp16/bf16).
        alpha: residual scale (sqrt(56) in ChatGLM-6B).
        weight, bias: `[h]`; eps: LayerNorm epsilon.
        return_sum: also return `x * alpha + residual`.
    Returns:
        `y [..., h]` in the dtype of x, or `(y, x * alpha + residual)`.
    """
    return call("layernorm", x.device, backend, x, residual, alpha, weight, bias, eps, return_sum)


def layer_norm(x, weight, bias, eps: float, backend: str | None = None):
    """Plain `LayerNorm(x)` over the last axis, through the same op."""
    return call("layernorm", x.device, backend, x, None, 1.0, weight, bias, eps, False)
