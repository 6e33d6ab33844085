"""Fused ops of the GLM block, one module per op.

Each function here is what the model calls; the implementation behind it
(torch now, Triton kernels on CUDA) is chosen in `glm_kernels.backend`.
"""
from ..backend import plan as kernel_plan
from .attention import glm_attention
from .block import StepArgs, block_infer, layers_infer, step_args, step_infer
from .gelu import bias_gelu
from .layernorm import layer_norm, residual_layer_norm
from .lm_loss import fused_linear_cross_entropy
from .mask import GLMMask
from .quant_linear import quant_linear
from .rotary import apply_rotary_2d, rope_qkv, rotary_table
from .softmax import scaled_masked_softmax

__all__ = [
    "GLMMask",
    "StepArgs",
    "apply_rotary_2d",
    "bias_gelu",
    "block_infer",
    "layers_infer",
    "step_args",
    "step_infer",
    "fused_linear_cross_entropy",
    "glm_attention",
    "kernel_plan",
    "layer_norm",
    "quant_linear",
    "residual_layer_norm",
    "rope_qkv",
    "rotary_table",
    "scaled_masked_softmax",
]
