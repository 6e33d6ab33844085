"""THUDM's weight-only quantization layout (the `chatglm-6b-int8` / `chatglm-6b-int4` checkpoints).

A quantized `[out, in]` weight W is stored as two tensors:

- `weight_scale`: `[out]` fp16, `max|W[r, :]| / (2^(bits-1) - 1)` per output
  row r (127 for 8 bits, 7 for 4 bits);
- `weight`: int8 storage of `q = round(W / scale[:, None])`, q in
  [-127, 127] (8 bits) or [-7, 7] (4 bits). 8 bits: `[out, in]`, one value
  per byte. 4 bits: `[out, in / 2]`, byte j of a row holds element 2j in its
  HIGH nibble and element 2j+1 in its LOW nibble, each a 4-bit two's
  complement value: `byte = (q[2j] << 4) | (q[2j + 1] & 0xF)`.

Dequantized: `W = q * scale[:, None]`, computed in fp32.

Rounding choices (documented in docs/quantization.md): the scale is rounded
to fp16 first and q is computed in fp32 against that rounded scale (the
original divides in fp16, which can move a value that sits within fp16's
spacing of a .5 boundary by one step); `torch.round` rounds halves to even;
q is clamped to the range (the fp16 rounding of the scale can put
`max|W| / scale` a hair above 127 or 7). A row of zeros gets scale 0 and
q = 0 (the original would divide 0 by 0).
"""
from __future__ import annotations

import torch

BITS = (4, 8)


def check_bits(bits, what: str = "bits") -> int:
    """`bits` as an int, or `ValueError` naming `what` unless it is 4 or 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{what} must be 4 or 8 (weight-only INT4 / INT8), got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for 8 bits, 7 for 4 bits."""
    return 2 ** (check_bits(bits) - 1) - 1


def packed_columns(in_features: int, bits: int) -> int:
    """Columns of the stored `weight`: `in` for 8 bits, `in / 2` for 4 bits."""
    return in_features if check_bits(bits) == 8 else in_features // 2


def stored_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    """Shape of THUDM's `weight` for an `[out, in]` matrix."""
    if bits == 4 and in_features % 2:
        raise ValueError(f"4-bit quantization packs two columns per byte: in_features={in_features} must be even")
    return out_features, packed_columns(in_features, bits)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's per-row quantization of a floating `[out, in]` weight.

    Returns `(weight, weight_scale)`: int8 `[out, in]` (8 bits) or `[out, in/2]`
    packed (4 bits), and fp16 `[out]`. Computed on the weight's device in
    fp32, in blocks of rows so the fp32 copy is never whole.
    """
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight takes a floating [out, in] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    out_features, in_features = weight.shape
    stored_shape(out_features, in_features, bits)  # checks the width for 4 bits
    limit = qmax(bits)
    q_all = torch.empty(stored_shape(out_features, in_features, bits), dtype=torch.int8, device=weight.device)
    scale_all = torch.empty(out_features, dtype=torch.float16, device=weight.device)
    rows = max(1, (16 * 2**20) // max(1, 4 * in_features))  # 16 MiB of fp32 per block
    for start in range(0, out_features, rows):
        rows_in = weight[start:start + rows]
        # max |w| is exact in the weight's own dtype (and cheaper there); the division is done in fp32
        scale = (rows_in.abs().amax(dim=1).float() / limit).to(torch.float16)
        block = rows_in.float()
        scale32 = scale.float()
        safe = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
        q = torch.round(block / safe[:, None]).clamp_(-limit, limit).to(torch.int8)
        q_all[start:start + rows] = q if bits == 8 else pack_int4(q)
        scale_all[start:start + rows] = scale
    return q_all, scale_all


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in]` values in [-8, 7] -> THUDM's packed int8 `[out, in/2]` (element 2j in the high nibble)."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4 takes int8 [out, in] with an even in, got {q.dtype} {tuple(q.shape)}")
    high, low = q[:, 0::2], q[:, 1::2]
    return (high << 4) | (low & 0xF)  # int8 arithmetic wraps: the byte's bits are exactly the two nibbles


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """THUDM's packed int8 `[out, in/2]` -> int8 `[out, in]`, each nibble sign-extended."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 takes THUDM's int8 [out, in/2], got {packed.dtype} {tuple(packed.shape)}")
    high = packed >> 4  # arithmetic shift: the high nibble, sign-extended
    low = (packed << 4) >> 4  # the low nibble moved up, then shifted back down with its sign
    return torch.stack((high, low), dim=2).view(packed.shape[0], packed.shape[1] * 2)


def int_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8 q values `[out, in]` of a THUDM weight."""
    return weight if check_bits(bits) == 8 else unpack_int4(weight)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """`q * scale[:, None]` computed in fp32 (then cast to `dtype`), `[out, in]`."""
    w = int_values(weight, bits).float() * scale.float()[:, None]
    return w if dtype == torch.float32 else w.to(dtype)
