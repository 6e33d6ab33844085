"""The CPU int4 form: THUDM's 4-bit weights repacked for `aten._weight_int4pack_mm_for_cpu`.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`)
computes `x @ W^T` with `W[n, k] = (v[n, k] - 8) * scale[k // group, n] + zero[k // group, n]`
from unsigned nibbles `v` in a blocked order that depends on the CPU build
(`aten._convert_weight_to_int4pack_for_cpu` writes it). THUDM's signed
q in [-7, 7] is `v = q + 8` with `zero = 0` and the row's scale in every
group, so the product is exact: no requantization.

The order (torch 2.x, `aten/src/ATen/native/cpu/int4mm_kernel.cpp`), rows in
blocks of `BLOCK_N` (64 with AVX512, 32 otherwise), bytes `[block, k, BLOCK_N/2]`:

- a full block with AVX512 or AVX2: byte j holds row j in its low nibble and
  row j + BLOCK_N/2 in its high nibble ("halves");
- the last, partial block (16, 32 or 48 rows), and every block without
  AVX512/AVX2: byte j holds rows 2j (low) and 2j + 1 (high) ("pairs").

`pack`/`unpack`/`gather_rows` here write and read that order directly from
THUDM's bytes (no `[out, in]` int32 copy, which `_convert_weight_to_int4pack`
needs). Because the order belongs to PyTorch's build, `layout()` checks it
once per process against `_convert_weight_to_int4pack_for_cpu` on a probe
matrix; if they differ, `layout()` is None and the modules keep THUDM's bytes
(the slower dequantizing path runs instead, and a warning says why).

The kernel needs `out % 16 == 0` and `in` divisible by the group (32, 64, 128
or 256). The group here is the largest of 256 and 128 that divides `in`:
`scales_and_zeros` is then 4 bytes per 256 (or 128) weights, 3% (6%) of the
packed weights; smaller groups would break the 10% memory budget for a
per-row scale that is the same in every group anyway.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .layout import unpack_int4

logger = logging.getLogger(__name__)

GROUP_SIZES = (256, 128)


@dataclass(frozen=True)
class Int4Layout:
    block_n: int  # rows per block
    halves: bool  # full blocks pair row j with row j + block_n/2 (else rows 2j, 2j+1)


def _candidate() -> Int4Layout:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return Int4Layout(64, True)
    if capability == "AVX2":
        return Int4Layout(32, True)
    return Int4Layout(32, False)


def group_size(in_features: int) -> int | None:
    """The group used for an `in`-wide weight, or None when the kernel cannot take it within the memory budget."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def packable(out_features: int, in_features: int) -> bool:
    """Whether an `[out, in]` int4 weight can be held in the CPU form (shapes and a verified layout)."""
    return out_features % 16 == 0 and group_size(in_features) is not None and layout() is not None


def _blocks(out_features: int, lay: Int4Layout) -> tuple[int, int]:
    full = out_features // lay.block_n * lay.block_n
    return full, out_features - full


def pack_values(v: torch.Tensor, lay: Int4Layout) -> torch.Tensor:
    """uint8 nibbles `v` `[out, in]` (0..15) -> uint8 `[out, in/2]` in the kernel's order."""
    out_features, in_features = v.shape
    full, tail = _blocks(out_features, lay)
    parts = []
    if full:
        blocks = v[:full].view(full // lay.block_n, lay.block_n, in_features).transpose(1, 2)  # [nb, in, block_n]
        if lay.halves:
            half = lay.block_n // 2
            low, high = blocks[..., :half], blocks[..., half:]
        else:
            low, high = blocks[..., 0::2], blocks[..., 1::2]
        parts.append((low | (high << 4)).reshape(-1))
    if tail:
        rows = v[full:].t()  # [in, tail]
        parts.append((rows[:, 0::2] | (rows[:, 1::2] << 4)).reshape(-1))
    return torch.cat(parts).view(out_features, in_features // 2)


def _unpack_values(packed: torch.Tensor, out_features: int, in_features: int, lay: Int4Layout) -> torch.Tensor:
    """Inverse of `pack_values`: uint8 `[out, in]` nibbles 0..15."""
    flat = packed.reshape(-1)
    full, tail = _blocks(out_features, lay)
    v = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    if full:
        nb = full // lay.block_n
        half = lay.block_n // 2
        b = flat[:full * in_features // 2].view(nb, in_features, half)
        low, high = b & 0xF, b >> 4
        if lay.halves:
            rows = torch.cat((low, high), dim=2)  # [nb, in, block_n]
        else:
            rows = torch.stack((low, high), dim=3).view(nb, in_features, lay.block_n)
        v[:full] = rows.transpose(1, 2).reshape(full, in_features)
    if tail:
        b = flat[full * in_features // 2:].view(in_features, tail // 2)
        v[full:] = torch.stack((b & 0xF, b >> 4), dim=2).view(in_features, tail).t()
    return v


def pack(weight: torch.Tensor, lay: Int4Layout | None = None) -> torch.Tensor:
    """THUDM's packed int8 `[out, in/2]` (4 bits) -> the kernel's uint8 `[out, in/2]`."""
    lay = lay or layout()
    v = (unpack_int4(weight) + 8).view(torch.uint8)  # q in [-8, 7] -> v in [0, 15]
    return pack_values(v, lay)


def unpack(packed: torch.Tensor, lay: Int4Layout | None = None) -> torch.Tensor:
    """The kernel's uint8 `[out, in/2]` -> THUDM's packed int8 `[out, in/2]` (exact inverse of `pack`)."""
    lay = lay or layout()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    q = _unpack_values(packed, out_features, in_features, lay).view(torch.int8) - 8
    high, low = q[:, 0::2], q[:, 1::2]
    return (high << 4) | (low & 0xF)


def int_values(packed: torch.Tensor, start: int = 0, stop: int | None = None,
               lay: Int4Layout | None = None) -> torch.Tensor:
    """int8 q `[stop - start, in]` of rows `[start, stop)` of the kernel-ordered weight.

    The rows must be whole blocks (`start`, `stop` multiples of the block inside
    the full blocks) or exactly the partial last block; `row_chunks` yields such ranges.
    """
    lay = lay or layout()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    stop = out_features if stop is None else stop
    full, _ = _blocks(out_features, lay)
    whole_blocks = start % lay.block_n == 0 and stop % lay.block_n == 0 and stop <= full
    if not (whole_blocks or (start == full and stop == out_features)) or start >= stop:
        raise ValueError(f"rows [{start}, {stop}) are not whole {lay.block_n}-row blocks of the int4 layout")
    per_row = in_features // 2
    sub = packed.reshape(-1)[start * per_row:stop * per_row]
    # a range of whole blocks is itself a packed weight; the partial block alone is one in pair order
    return _unpack_values(sub, stop - start, in_features, lay).view(torch.int8) - 8


def row_chunks(out_features: int, rows: int, lay: Int4Layout | None = None):
    """`(start, stop)` ranges covering `[0, out)` of about `rows` rows each, as `int_values` takes them."""
    lay = lay or layout()
    full, tail = _blocks(out_features, lay)
    step = max(lay.block_n, rows // lay.block_n * lay.block_n)
    for start in range(0, full, step):
        yield start, min(start + step, full)
    if tail:
        yield full, out_features


def gather_rows(packed: torch.Tensor, index: torch.Tensor, lay: Int4Layout | None = None) -> torch.Tensor:
    """int8 q `[len(index), in]` of the rows `index` of the kernel-ordered weight (embedding lookups)."""
    lay = lay or layout()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    full, tail = _blocks(out_features, lay)
    index = index.to(torch.long)
    half = lay.block_n // 2
    per_block = in_features * half  # bytes per block
    in_full = index < full
    block, r = index // lay.block_n, index % lay.block_n
    if lay.halves:
        column, high = r % half, r >= half
    else:
        column, high = r // 2, (r % 2) == 1
    # the tail: rows (2j, 2j+1) share byte j of each k
    t = (index - full).clamp(min=0)
    tail_column, tail_high = t // 2, (t % 2) == 1
    width = torch.where(in_full, torch.full_like(index, half), torch.full_like(index, max(tail, 1) // 2))
    base = torch.where(in_full, block * per_block + column, full * in_features // 2 + tail_column)
    high = torch.where(in_full, high, tail_high)
    k = torch.arange(in_features, device=packed.device)
    offsets = base[:, None] + k[None, :] * width[:, None]  # [rows, in]: byte of (row, k)
    b = packed.reshape(-1)[offsets]
    v = torch.where(high[:, None], b >> 4, b & 0xF)
    return v.view(torch.int8) - 8


def unit_scales_and_zeros(out_features: int, in_features: int, dtype=torch.bfloat16, device=None) -> torch.Tensor:
    """`[in/group, out, 2]` of scale 1 and zero 0: the kernel then returns `x @ q^T` (rounded once to bf16).

    The row scales are applied to that product in fp32 afterwards (`ops.quant_linear`), not in the kernel:
    the kernel reads scales in the activation dtype, and a bf16-rounded scale is off by up to 2^-8 (relative) for
    every element of its row, an error that does not average out (docs/quantization.md).
    """
    groups = in_features // group_size(in_features)
    sz = torch.zeros(groups, out_features, 2, dtype=dtype, device=device)
    sz[:, :, 0] = 1
    return sz


@functools.lru_cache(maxsize=1)
def layout() -> Int4Layout | None:
    """The kernel's nibble order on this machine, checked once against PyTorch's own packing; None if unknown."""
    lay = _candidate()
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        logger.warning("torch %s has no aten._convert_weight_to_int4pack_for_cpu: int4 weights stay in THUDM's "
                       "layout on the CPU (dequantizing path)", torch.__version__)
        return None
    gen = torch.Generator().manual_seed(0)
    rows = 2 * lay.block_n + 48  # full blocks and a partial one
    v = torch.randint(0, 16, (rows, 256), generator=gen, dtype=torch.int32)
    try:
        expected = op(v, 1)
    except RuntimeError as err:
        logger.warning("aten._convert_weight_to_int4pack_for_cpu failed on a probe (%s): int4 weights stay in THUDM's "
                       "layout on the CPU (dequantizing path)", err)
        return None
    mine = pack_values(v.to(torch.uint8), lay)
    if expected.shape != mine.shape or not torch.equal(expected.view(torch.uint8), mine):
        logger.warning("torch %s packs int4 weights for the CPU in an order this version of glm_kernels does not "
                       "know: int4 weights stay in THUDM's layout on the CPU (dequantizing path)", torch.__version__)
        return None
    return lay


@dataclass(frozen=True)
class PackedInt4:
    """An int4 weight in the CPU kernel's form, as `ops.quant_linear` takes it in place of THUDM's `weight`.

    `data`: uint8 `[out, in/2]` in the kernel's order; `scales_and_zeros`: bf16
    `[in/group, out, 2]` of ones and zeros (`unit_scales_and_zeros`; the row scales
    travel separately); `group`: the group size. Only the torch backend reads it.
    """

    data: torch.Tensor
    scales_and_zeros: torch.Tensor
    group: int

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        return self.data.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.data.device

    def describe(self) -> str:
        return f"CPU-packed int4 [{self.out_features}, {self.in_features // 2}] (group {self.group})"
