"""Triton kernels, one module per fused op. Importing this package registers them as the `triton` backend.

Modules: rope (2D rotary + KV write), attention (flash-style GLM attention and
split-K decoding), softmax (scaled masked softmax), layernorm (alpha-residual
LayerNorm), gelu (bias + tanh GeLU).
"""
from __future__ import annotations

import importlib

MODULES = ("rope", "attention", "softmax", "layernorm", "gelu")


def load_all() -> list:
    """Import every kernel module that exists; returns the modules."""
    loaded = []
    for name in MODULES:
        try:
            loaded.append(importlib.import_module(f"{__name__}.{name}"))
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    return loaded
