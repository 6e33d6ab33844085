"""The optional C++ CPU kernels, `glm_kernels._C` (csrc/quant_cpu.cpp, built by setup.py when a compiler is there).

`extension()` is the module, or None when it is not built (or was built from
other sources, or `GLM_KERNELS_CPU_EXTENSION=0`): everything then runs on
PyTorch's own kernels (`ops.quant_linear`), which is slower for fp32 / fp16
activations (docs/quantization.md).

The extension reads THUDM's bytes as they are (`gemv`: fp32 accumulation, the
fp16 row scale applied once; `dequantize`: rows of q * scale in fp32), so with
it the 4-bit weights are not repacked on the CPU.
"""
from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

ENV_VAR = "GLM_KERNELS_CPU_EXTENSION"
VERSION = 5  # csrc/quant_cpu.cpp's VERSION: a stale build (other sources) is not used


@functools.lru_cache(maxsize=1)
def extension():
    """The `glm_kernels._C` module, or None (not built, stale, or disabled by GLM_KERNELS_CPU_EXTENSION=0)."""
    if os.environ.get(ENV_VAR, "1") in ("0", "false", "False", "no"):
        return None
    try:
        from .. import _C
    except ImportError:
        return None
    if getattr(_C, "VERSION", None) != VERSION:
        logger.warning("glm_kernels._C is a build of other sources (VERSION %s, expected %s): not used; rebuild "
                       "with `pip install --no-build-isolation -e .`", getattr(_C, "VERSION", None), VERSION)
        return None
    return _C
