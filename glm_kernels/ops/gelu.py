"""Bias + tanh-GeLU of the GLM MLP.

`gelu(x) = 0.5*x*(1 + tanh(0.7978845608028654*x*(1 + 0.044715*x*x)))`, the
form the original uses; PyTorch's `gelu(approximate="tanh")` is the same
function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu_ext
from ..backend import call, register


@register("gelu", "torch")
def _gelu_torch(x, bias):
    ext = cpu_ext.inference_extension(x, bias)  # CPU inference: one pass (csrc/gelu_cpu.cpp), as the one-call blocks
    if ext is not None and x.dim() >= 1 and x.shape[-1] > 0 and (bias is None or bias.shape == x.shape[-1:]):
        return ext.bias_gelu(x, bias)
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """`gelu(x + bias)`; x `[..., n]`, bias `[n]` or None; dtype of x."""
    return call("gelu", x.device, backend, x, bias)
