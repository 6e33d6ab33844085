"""The optional C++ CPU kernels, `glm_kernels._C` (csrc/, built by setup.py when a compiler is there).

Importing `_C` registers the operators `torch.ops.glm_kernels.*` (`TORCH_LIBRARY`):
`gemv`, `linear`, `dequantize`, `dequantize_into`, `stream_read` (csrc/quant_cpu.cpp),
`attention_few` (csrc/attention_cpu.cpp), `rope_qkv` (csrc/rope_cpu.cpp), `residual_layer_norm`
(csrc/layernorm_cpu.cpp), `bias_gelu` (csrc/gelu_cpu.cpp), `block_infer` and `layers_infer`
(csrc/block_cpu.cpp: a GLM block, or every block, of CPU decoding in one call, `ops.block_infer`).
`extension()` is that operator namespace, or None when the extension is not
built (or was built from other sources, or `GLM_KERNELS_CPU_EXTENSION=0`):
everything then runs on PyTorch's own kernels (`ops.quant_linear`,
`ops.glm_attention`, `ops.rope_qkv`, `ops.residual_layer_norm`, `ops.bias_gelu`) and the blocks op by op,
which is slower (docs/quantization.md). The element-wise ops take the extension only in inference
(`inference_extension`): with a gradient to keep they stay on PyTorch's kernels and autograd.

The extension reads THUDM's bytes as they are (`linear`/`gemv`: fp32
accumulation, the fp16 row scale applied once; `dequantize`: rows of q * scale
in fp32), so with it the 4-bit weights are not repacked on the CPU.
`module()` is `_C` itself: `isa()` names the build of its loops this CPU runs
(avx512vnni, avx512bf16, avx512f, avx2 or scalar) and `set_isa(name)` picks another one
(tests run every build here).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "GLM_KERNELS_CPU_EXTENSION"
VERSION = 14  # csrc/quant_cpu.cpp's VERSION: a stale build (other sources) is not used


@functools.lru_cache(maxsize=1)
def module():
    """The `glm_kernels._C` module, or None (not built, stale, or disabled by GLM_KERNELS_CPU_EXTENSION=0)."""
    if os.environ.get(ENV_VAR, "1") in ("0", "false", "False", "no"):
        return None
    try:
        from . import _C
    except ImportError:
        return None
    if getattr(_C, "VERSION", None) != VERSION:
        logger.warning("glm_kernels._C is a build of other sources (VERSION %s, expected %s): not used; rebuild "
                       "with `pip install --no-build-isolation -e .`", getattr(_C, "VERSION", None), VERSION)
        return None
    return _C


def extension():
    """`torch.ops.glm_kernels` (the extension's operators), or None when `module()` is None."""
    return torch.ops.glm_kernels if module() is not None else None


def inference_extension(x: torch.Tensor, *others):
    """`extension()` for an inference op on `x` and `others` (tensors or None): when they are all CPU tensors of
    x's dtype (fp32, fp16 or bf16) and none needs a gradient; otherwise None (the op then runs on PyTorch's own
    kernels, autograd included)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    tensors = [t for t in (x, *others) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return extension()
