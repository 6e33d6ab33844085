"""Triton kernels, one module per fused op. Importing this package registers them as the `triton` backend.

Modules: rope (2D rotary + KV write), attention (flash-style GLM attention and
split-K decoding), softmax (scaled masked softmax), layernorm (alpha-residual
LayerNorm), gelu (bias + tanh GeLU), cross_entropy (the in-place cross-entropy
of one LM-head logits chunk, for the fused LM head + loss), quant_linear
(weight-only INT8/INT4 linear: decode GEMV with split K, GEMM, input gradient).
"""
from __future__ import annotations

import importlib

MODULES = ("rope", "attention", "softmax", "layernorm", "gelu", "cross_entropy", "quant_linear")


def load_all() -> list:
    """Import every kernel module (registering the `triton` backend of each op); returns the modules."""
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]
