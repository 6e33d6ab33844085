"""Weight-only INT8 / INT4 linear (op "quant_linear"): `x @ W^T (+ bias)` with W in THUDM's layout.

`W = q * scale[:, None]` (`glm_kernels/quant/layout.py`): `weight` int8
`[out, in]` (8 bits) or `[out, in/2]` two nibbles per byte (4 bits, element
2j in the high nibble), `scale` fp16 `[out]`. The product is accumulated in
fp32 and returned in x's dtype. Differentiable with respect to x
(`dX = dY @ W`, what P-Tuning needs through a frozen quantized base) and the
bias; weight and scale never get gradients.

Backends (chosen in `glm_kernels/backend.py`): "triton"
(`glm_kernels/kernels/quant_linear.py`) on CUDA tensors; "torch" here,
which on the CPU picks, per call, the fastest path this machine has
(measured in docs/quantization.md):

- with the C++ extension (`torch.ops.glm_kernels`, `glm_kernels.cpu_ext`), up to
  `EXTENSION_MAX_ROWS` rows of x: its `linear` reads THUDM's bytes as they
  are, accumulates in fp32, applies the fp16 row scale and the bias in fp32
  and rounds once to x's dtype (bf16 x on an AVX512-BF16 CPU is multiplied as
  it is, with `vdpbf16ps`: see csrc/quant_cpu.cpp);
- without it, bf16 x of fewer than `KERNEL_MAX_ROWS` rows: PyTorch's
  `torch._weight_int8pack_mm` on THUDM's int8 bytes, or
  `aten._weight_int4pack_mm_for_cpu` on the 4-bit weight `QuantizedLinear`
  repacked once (`quant.cpu_pack.PackedInt4`, passed here as `weight` in
  place of THUDM's bytes); both with unit scales, the fp16 scales applied
  after in fp32 (the kernels would round them to bf16);
- everything else (more rows, fp32/fp16 x without the extension, other
  devices): dequantize blocks of rows (`CHUNK_ELEMENTS` weights,
  cache-sized) and multiply them with the matmul of the compute dtype (fp32;
  bf16 for bf16 x), never holding the whole dequantized matrix.

The backward is the blockwise dequantizing product in fp32 in every case.
"""
from __future__ import annotations

import torch

from ..backend import call, register
from .. import cpu_ext
from ..quant import cpu_pack
from ..quant.cpu_pack import PackedInt4
from ..quant.layout import BITS, unpack_int4

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Weights dequantized per block: 2^20 fp32 values (4 MiB) stays in the L2/L3 caches of the CPU while it is used.
CHUNK_ELEMENTS = 2**20
# From this many rows of x on, a bf16 call dequantizes blocks and runs oneDNN's bf16 matmul instead of the
# int-weight kernels, which are written for few rows (measured in docs/quantization.md).
KERNEL_MAX_ROWS = 32
# Rows of x up to which the C++ extension's gemv runs, by x dtype (measured on 4096 x 4096 weights against
# dequantized blocks + the matmul of the dtype; oneDNN's bf16 matmul takes over sooner than the fp32 one).
EXTENSION_MAX_ROWS = {torch.float32: 16, torch.float16: 16, torch.bfloat16: 16}


def in_features_of(weight, bits: int) -> int:
    if isinstance(weight, PackedInt4):
        return weight.in_features
    return weight.shape[1] * (2 if bits == 4 else 1)


def check_inputs(x, weight, scale, bits, bias) -> None:
    """Raise ValueError naming the argument for any input the op does not take."""
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"quant_linear: bits must be 4 or 8, got {bits!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise ValueError(f"quant_linear: x must be a fp32/fp16/bf16 tensor [..., in], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if isinstance(weight, PackedInt4):
        if bits != 4:
            raise ValueError(f"quant_linear: weight is {weight.describe()} but bits={bits}")
        out_features = weight.out_features
    else:
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"quant_linear: weight must be THUDM's int8 [out, in] (8 bits) or [out, in/2] (4 bits), "
                             f"got {getattr(weight, 'dtype', type(weight).__name__)} "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        out_features = weight.shape[0]
    in_features = in_features_of(weight, bits)
    if x.shape[-1] != in_features:
        raise ValueError(f"quant_linear: x is [..., {x.shape[-1]}] but the {bits}-bit weight "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight.describe()} "
                         f"holds in_features={in_features}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (out_features,):
        raise ValueError(f"quant_linear: scale must be a floating [out] = [{out_features}] tensor, got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)
                             or not bias.is_floating_point()):
        raise ValueError(f"quant_linear: bias must be None or a floating [out] = [{out_features}] tensor, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"quant_linear: {name} is on {t.device}, x on {x.device}: they must share a device")


# ----------------------------------------------------------------------------- dequantized blocks


def _row_ranges(weight, bits: int, out_features: int, in_features: int):
    rows = max(1, CHUNK_ELEMENTS // in_features)
    if isinstance(weight, PackedInt4):
        yield from cpu_pack.row_chunks(out_features, rows)
    else:
        for start in range(0, out_features, rows):
            yield start, min(start + rows, out_features)


def _extension_reads(weight) -> bool:
    return not isinstance(weight, PackedInt4) and weight.device.type == "cpu" and cpu_ext.extension() is not None


def _dequantize_into(buf, weight, scale, bits: int, start: int, stop: int) -> torch.Tensor:
    """Rows `[start, stop)` of W = q * scale, computed in fp32, written into `buf[:stop - start]` (fp32; bf16 only
    through the extension). One buffer serves every block: no allocation, no fresh pages, and it stays in cache."""
    out = buf[:stop - start]
    row_scale = scale[start:stop].float()[:, None]
    if _extension_reads(weight):
        cpu_ext.extension().dequantize_into(weight, scale, bits, start, stop, out)
    elif isinstance(weight, PackedInt4):
        torch.mul(cpu_pack.int_values(weight.data, start, stop), row_scale, out=out)
    elif bits == 4:
        torch.mul(unpack_int4(weight[start:stop]), row_scale, out=out)
    else:
        torch.mul(weight[start:stop], row_scale, out=out)
    return out


def _block_buffer(weight, bits, out_features, in_features, device):
    rows = min(out_features, max(1, CHUNK_ELEMENTS // in_features))
    if isinstance(weight, PackedInt4):
        rows = max(rows, cpu_pack.layout().block_n)  # whole blocks of the packed order
    return torch.empty(rows, in_features, dtype=torch.float32, device=device)


def dequantized_product(x2, weight, scale, bits: int, bias, compute_dtype) -> torch.Tensor:
    """`x2 [M, in] @ W^T (+ bias)` in `compute_dtype`, W dequantized one block of rows at a time."""
    out_features = scale.shape[0]
    in_features = x2.shape[1]
    xc = x2.to(compute_dtype)
    out = torch.empty(x2.shape[0], out_features, dtype=compute_dtype, device=x2.device)
    buf = _block_buffer(weight, bits, out_features, in_features, x2.device)
    # bf16 blocks: the extension writes them directly (computed in fp32, rounded once); otherwise fp32, then cast
    direct = compute_dtype == torch.bfloat16 and _extension_reads(weight)
    if direct:
        buf = buf.to(torch.bfloat16)
    low = None if compute_dtype == torch.float32 or direct else torch.empty(buf.shape, dtype=compute_dtype,
                                                                            device=x2.device)
    for start, stop in _row_ranges(weight, bits, out_features, in_features):
        w = _dequantize_into(buf, weight, scale, bits, start, stop)
        if low is not None:
            w = low[:stop - start].copy_(w)
        if bias is not None:
            out[:, start:stop] = torch.addmm(bias[start:stop].to(compute_dtype), xc, w.t())
        else:
            out[:, start:stop] = xc @ w.t()
    return out


def dequantized_input_grad(grad2, weight, scale, bits: int, in_features: int) -> torch.Tensor:
    """`grad2 [M, out] @ W` in fp32, summed over blocks of W's rows."""
    out_features = scale.shape[0]
    g = grad2.float()
    acc = torch.zeros(grad2.shape[0], in_features, dtype=torch.float32, device=grad2.device)
    buf = _block_buffer(weight, bits, out_features, in_features, grad2.device)
    for start, stop in _row_ranges(weight, bits, out_features, in_features):
        acc.addmm_(g[:, start:stop], _dequantize_into(buf, weight, scale, bits, start, stop))
    return acc


# ----------------------------------------------------------------------------- the forward product


def _product(x, weight, scale, bits: int, bias) -> torch.Tensor:
    in_features = in_features_of(weight, bits)
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    out_features = scale.shape[0]
    if rows == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    on_cpu = x2.device.type == "cpu"
    ext = cpu_ext.extension() if on_cpu and not isinstance(weight, PackedInt4) else None
    kernel = on_cpu and x2.dtype == torch.bfloat16 and rows < KERNEL_MAX_ROWS
    if ext is not None and rows <= EXTENSION_MAX_ROWS[x2.dtype]:
        # x's dtype; the scale and the bias applied in fp32, rounded once
        return ext.linear(x2, weight, scale, bits, bias).reshape(*x.shape[:-1], out_features)
    elif kernel and (isinstance(weight, PackedInt4) or bits == 8):
        # The kernels read their scales in bf16; a bf16 row scale would be off by up to 2^-8 (relative) for the
        # whole row. They run with unit scales (x @ q^T, rounded once); the fp16 scales and the bias follow in fp32.
        if isinstance(weight, PackedInt4):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), weight.data, weight.group,
                                                           weight.scales_and_zeros)
        else:
            ones = torch.ones(out_features, dtype=torch.bfloat16, device=x2.device)
            y = torch._weight_int8pack_mm(x2.contiguous(), weight, ones)
        y = y.float().mul_(scale.float())
        y = y if bias is None else y.add_(bias.float())
    else:
        compute = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
        y = dequantized_product(x2, weight, scale, bits, bias, compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


class QuantLinearFunction(torch.autograd.Function):
    """`x @ W^T + bias` with gradients for x (dY @ W, W dequantized in blocks, fp32) and the bias."""

    @staticmethod
    def forward(ctx, x, weight, scale, bits, bias):
        ctx.weight, ctx.bits = weight, bits
        ctx.save_for_backward(scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _product(x, weight, scale, bits, bias)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        in_features = ctx.x_shape[-1]
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = dequantized_input_grad(grad2, ctx.weight, scale, ctx.bits, in_features)
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = grad2.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, None, grad_bias


@register("quant_linear", "torch")
def _quant_linear_torch(x, weight, scale, bits, bias=None):
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return QuantLinearFunction.apply(x, weight, scale, bits, bias)
    return _product(x, weight, scale, bits, bias)


def quant_linear(x: torch.Tensor, weight, scale: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                 backend=None) -> torch.Tensor:
    """`x @ W^T (+ bias)`, W = q * scale[:, None] in THUDM's INT8/INT4 layout, accumulated in fp32.

    Args:
        x: `[..., in]` fp32/fp16/bf16.
        weight: int8 `[out, in]` (bits 8) or `[out, in/2]` (bits 4, element 2j
            in the high nibble of byte j); or a `quant.cpu_pack.PackedInt4`
            (the CPU int4 form `QuantizedLinear` holds; torch backend only).
        scale: `[out]` fp16 per-row scale.
        bits: 8 or 4.
        bias: `[out]` or None.
    Returns:
        `[..., out]` in x's dtype. Gradients flow to x and bias, never to weight or scale.
    """
    check_inputs(x, weight, scale, bits, bias)
    return call("quant_linear", x.device, backend, x, weight, scale, bits, bias)
