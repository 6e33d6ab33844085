"""Weight-only INT8/INT4 quantization in THUDM's layout (`chatglm-6b-int8` / `-int4`).

- `layout`: quantize / pack / unpack / dequantize THUDM's `weight` + `weight_scale`.
- `cpu_pack`: the 4-bit weights repacked for PyTorch's CPU int4 kernel.
- `modules`: `QuantizedLinear`, `QuantizedEmbedding`, `linear()` (either module type).
- `ops.quant_linear` is the op the modules call (torch and Triton backends).

Models: `model.quantize(bits)`, `from_pretrained(path, quantization_bit=4)`;
see docs/quantization.md.
"""
from .layout import dequantize, pack_int4, quantize_weight, unpack_int4
from .modules import BLOCK_LINEARS, QuantizedEmbedding, QuantizedLinear, is_quantized, linear, quantized_modules

__all__ = [
    "BLOCK_LINEARS",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize",
    "is_quantized",
    "linear",
    "pack_int4",
    "quantize_weight",
    "quantized_modules",
    "unpack_int4",
]
