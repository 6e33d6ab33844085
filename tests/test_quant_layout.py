"""THUDM's INT8/INT4 layout (quantize, pack, unpack, dequantize) against an oracle written from the layout's
definition, and the CPU int4 form against PyTorch's own packing."""
import numpy as np
import pytest
import torch

from glm_kernels.quant import cpu_pack
from glm_kernels.quant.layout import dequantize, pack_int4, quantize_weight, unpack_int4


# ----------------------------------------------------------------------------- the oracle (the layout, in numpy)


def oracle_quantize(w: np.ndarray, bits: int):
    """scale = fp16(max|w| / (2^(bits-1) - 1)) per row; q = round(w / scale) in fp32, halves to even."""
    limit = 2 ** (bits - 1) - 1
    w32 = w.astype(np.float32)
    scale = (np.abs(w32).max(axis=1) / np.float32(limit)).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), np.float32(1))
    q = np.clip(np.rint(w32 / safe[:, None]), -limit, limit).astype(np.int8)
    return q, scale


def oracle_pack4(q: np.ndarray) -> np.ndarray:
    """byte j = (q[2j] << 4) | (q[2j+1] & 0xF), as an unsigned byte reinterpreted as int8."""
    hi = (q[:, 0::2].astype(np.int16) & 0xF) * 16
    lo = q[:, 1::2].astype(np.int16) & 0xF
    return (hi + lo).astype(np.uint8).view(np.int8)


def oracle_decode4(packed: np.ndarray) -> np.ndarray:
    """Each byte's two nibbles as 4-bit two's complement numbers, high nibble first."""
    b = packed.view(np.uint8).astype(np.int16)
    hi, lo = b >> 4, b & 0xF
    hi = np.where(hi >= 8, hi - 16, hi)
    lo = np.where(lo >= 8, lo - 16, lo)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    out[:, 0::2], out[:, 1::2] = hi, lo
    return out


# ----------------------------------------------------------------------------- THUDM's layout


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_matches_the_layout_definition(bits):
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    w[5] = 0  # a row of zeros: scale 0, q 0
    q, scale = quantize_weight(w, bits)
    oq, oscale = oracle_quantize(w.numpy(), bits)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (48,)
    assert np.array_equal(scale.numpy(), oscale)
    assert q.dtype == torch.int8
    expected = oq if bits == 8 else oracle_pack4(oq)
    assert tuple(q.shape) == expected.shape == ((48, 96) if bits == 8 else (48, 48))
    assert np.array_equal(q.numpy(), expected)
    assert int(scale[5]) == 0 and not q[5].any()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_values_stay_in_range_and_dequantize_close(bits):
    w = torch.randn(64, 128)
    q, scale = quantize_weight(w, bits)
    values = q if bits == 8 else unpack_int4(q)
    limit = 2 ** (bits - 1) - 1
    assert int(values.min()) >= -limit and int(values.max()) <= limit
    assert int(values.abs().max()) == limit  # every row reaches its scale's end
    # each weight is within half a step (plus the fp16 rounding of the scale) of its dequantized value
    err = (dequantize(q, scale, bits) - w).abs()
    assert bool((err <= scale.float()[:, None] * 0.5 * (1 + 2e-3)).all())


def test_int4_pack_and_unpack_follow_the_nibble_order():
    q = torch.randint(-8, 8, (7, 20), dtype=torch.int8)
    packed = pack_int4(q)
    assert np.array_equal(packed.numpy(), oracle_pack4(q.numpy()))
    assert np.array_equal(unpack_int4(packed).numpy(), oracle_decode4(packed.numpy()))
    assert torch.equal(unpack_int4(packed), q)
    # the example of the definition: elements (3, -2) -> 0x3E; (-8, 7) -> 0x87
    pair = torch.tensor([[3, -2, -8, 7]], dtype=torch.int8)
    assert pack_int4(pair).view(torch.uint8).tolist() == [[0x3E, 0x87]]


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_q_times_scale_in_fp32(bits):
    w = torch.randn(16, 32)
    q, scale = quantize_weight(w, bits)
    values = q.numpy() if bits == 8 else oracle_decode4(q.numpy())
    expected = values.astype(np.float32) * scale.numpy().astype(np.float32)[:, None]
    out = dequantize(q, scale, bits)
    assert out.dtype == torch.float32
    assert np.array_equal(out.numpy(), expected)  # q (<= 7 bits) x an fp16 scale is exact in fp32


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_weight(torch.randn(4, 4), 3)
    with pytest.raises(ValueError, match="in_features=5 must be even"):
        quantize_weight(torch.randn(4, 5), 4)
    with pytest.raises(ValueError, match=r"floating \[out, in\]"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int8), 8)


# ----------------------------------------------------------------------------- the CPU int4 form


def test_cpu_layout_is_known_on_this_machine():
    assert cpu_pack.layout() is not None  # verified against PyTorch's packing (else int4 would dequantize)


@pytest.mark.parametrize("rows", [16, 48, 64, 240, 1008])
def test_cpu_pack_equals_pytorchs_packing_and_unpacks_exactly(rows):
    q, _ = quantize_weight(torch.randn(rows, 256), 4)
    nibbles = torch.from_numpy(oracle_decode4(q.numpy()).astype(np.int32) + 8)  # v = q + 8 in [1, 15]
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    packed = cpu_pack.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == q.shape  # same bytes as THUDM's
    assert torch.equal(packed, expected.view(torch.uint8))
    assert torch.equal(cpu_pack.unpack(packed), q)
    values = torch.from_numpy(oracle_decode4(q.numpy()))
    chunks = list(cpu_pack.row_chunks(rows, 100))
    assert chunks[0][0] == 0 and chunks[-1][1] == rows
    assert torch.equal(torch.cat([cpu_pack.int_values(packed, a, b) for a, b in chunks]), values)
    index = torch.tensor([0, rows - 1, rows // 2, 1, rows - 2])
    assert torch.equal(cpu_pack.gather_rows(packed, index), values[index])


def test_cpu_int4_kernel_reads_the_packed_form_as_q():
    q, _ = quantize_weight(torch.randn(64, 512), 4)
    x = torch.zeros(3, 512, dtype=torch.bfloat16)
    x[:, ::16] = torch.randint(-1, 2, (3, 32)).to(torch.bfloat16)  # 32 entries in {-1, 0, 1}: |x @ q^T| <= 224
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, cpu_pack.pack(q), cpu_pack.group_size(512),
                                                   cpu_pack.unit_scales_and_zeros(64, 512))
    expected = x.double() @ torch.from_numpy(oracle_decode4(q.numpy()).astype(np.float64)).t()
    assert float(expected.abs().max()) < 256  # within bf16's exact integers: the one rounding is exact
    assert torch.equal(y.double(), expected)


def test_cpu_form_shapes():
    assert cpu_pack.group_size(4096) == 256 and cpu_pack.group_size(384) == 128 and cpu_pack.group_size(96) is None
    assert cpu_pack.packable(1008, 256) and not cpu_pack.packable(1000, 256) and not cpu_pack.packable(64, 96)
    with pytest.raises(ValueError, match="whole 64-row blocks"):
        cpu_pack.int_values(cpu_pack.pack(quantize_weight(torch.randn(128, 256), 4)[0]), 10, 64)
