"""The reference against facts that do not come from it: hand-written masks and positions, alpha, rotary tables."""
import math

import numpy as np
import pytest
import torch

from glm_kernels import inputs, reference
from glm_kernels.ops.rotary import rotary_table

BOS, MASK, GMASK = 994, 990, 991


def test_mask_written_out_by_hand():
    # context = [5, 6, gMASK] (c = 3), then <sop> and two generated tokens
    ids = torch.tensor([[5, 6, GMASK, BOS, 7, 8]])
    visible = [  # 1 = may attend
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    expected = ~torch.tensor(visible, dtype=torch.bool)[None, None]
    assert torch.equal(reference.get_masks(ids, BOS), expected)
    assert torch.equal(inputs.get_masks(ids, BOS), expected)


def test_position_ids_written_out_by_hand():
    ids = torch.tensor([[5, 6, GMASK, BOS, 7, 8],
                        [5, MASK, 6, BOS, 7, 8]])  # second row: [MASK] only
    expected = torch.tensor([[[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]],
                             [[0, 1, 2, 1, 1, 1], [0, 0, 0, 1, 2, 3]]])
    assert torch.equal(reference.get_position_ids(ids, BOS, MASK, GMASK), expected)
    assert torch.equal(inputs.get_position_ids(ids, BOS, MASK, GMASK), expected)


def test_gmask_wins_over_mask():
    ids = torch.tensor([[MASK, 5, GMASK, BOS, 7]])
    assert reference.get_position_ids(ids, BOS, MASK, GMASK)[0, 0].tolist() == [0, 1, 2, 2, 2]


def test_vectorised_inputs_equal_the_loops():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        b, s = 3, int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(0, 900, (b, s), generator=g)
        for row in range(b):
            m, c = sorted(torch.randperm(s, generator=g)[:2].tolist())
            ids[row, m] = GMASK if row % 2 else MASK
            ids[row, c] = BOS
        assert torch.equal(inputs.get_masks(ids, BOS), reference.get_masks(ids, BOS))
        assert torch.equal(inputs.get_position_ids(ids, BOS, MASK, GMASK),
                           reference.get_position_ids(ids, BOS, MASK, GMASK))


def test_missing_bos_or_mask_token_is_named():
    with pytest.raises(ValueError, match=r"row 1 has no bos token \(id 994"):
        inputs.get_masks(torch.tensor([[GMASK, BOS], [GMASK, 5]]), BOS)
    with pytest.raises(ValueError, match=r"row 0 has neither \[gMASK\]"):
        inputs.get_position_ids(torch.tensor([[5, BOS]]), BOS, MASK, GMASK)


def test_alpha_is_sqrt_56_even_for_two_layers():
    # With zero attention/MLP outputs and identity LayerNorms a block returns alpha * LN(x).
    blk = reference.GLMBlock(32, 2, 64, layer_id=0)
    for name, p in blk.named_parameters():
        if name.startswith(("attention.", "mlp.")):
            torch.nn.init.zeros_(p)
    x = torch.randn(3, 1, 32)
    pos = torch.zeros(1, 2, 3, dtype=torch.long)
    out, _, _ = blk(x, pos)
    ln = torch.nn.functional.layer_norm(x, (32,))
    ratio = out / ln
    assert torch.allclose(ratio, torch.full_like(ratio, math.sqrt(56)), rtol=1e-4)
    assert reference.ALPHA == pytest.approx(7.483314773547883, rel=1e-15)


def _numpy_inv_freq(dim):
    return (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float16)


def test_rotary_tables_fp32_from_fp16_rounded_frequencies():
    cos, sin = reference.rotary_tables(300, 64, torch.float32)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (300, 64)
    f = _numpy_inv_freq(64).astype(np.float32)
    freqs = np.arange(300, dtype=np.float32)[:, None] * f[None, :]
    emb = np.concatenate([freqs, freqs], axis=1).astype(np.float64)
    # 1e-5: fp32 cos/sin of fp32 angles vs float64 of the same angles
    assert np.abs(cos.numpy() - np.cos(emb)).max() < 1e-5
    assert np.abs(sin.numpy() - np.sin(emb)).max() < 1e-5
    # the frequencies really are fp16-rounded: unrounded ones give a different table
    exact = np.arange(300)[:, None] * (1.0 / 10000 ** (np.arange(0, 64, 2) / 64))[None, :]
    assert np.abs(cos.numpy()[:, :32] - np.cos(exact)).max() > 1e-3


def test_rotary_tables_fp16_computed_in_fp16():
    cos, _ = reference.rotary_tables(2048, 64, torch.float16)
    assert cos.dtype == torch.float16
    t = np.arange(2048, dtype=np.float16)
    freqs = (t[:, None] * _numpy_inv_freq(64)[None, :]).astype(np.float16)  # fp16 products
    expected = np.cos(freqs.astype(np.float32)).astype(np.float16)
    assert np.array_equal(cos.numpy()[:, :32], expected)
    # the op's table is the same fp16 table
    assert torch.equal(rotary_table(2048, 64, torch.float16)[0], cos)


def test_rotary_tables_bf16_keep_positions_exact():
    # Documented choice: bf16 tables are the fp32 table rounded once, so position 257 != 256
    # (bf16 arithmetic, as the original does it, would merge them).
    assert torch.arange(300, dtype=torch.bfloat16)[257] == 256
    cos, sin = reference.rotary_tables(300, 64, torch.bfloat16)
    c32, s32 = reference.rotary_tables(300, 64, torch.float32)
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos, c32.to(torch.bfloat16)) and torch.equal(sin, s32.to(torch.bfloat16))
    assert not torch.equal(cos[257], cos[256])
    assert torch.equal(rotary_table(300, 64, torch.bfloat16)[0], cos)


def test_rotary_depends_only_on_relative_position():
    q, k = torch.randn(2, 1, 1, 8, 128, dtype=torch.float64).unbind(0)
    q, k = q.expand(6, 1, 8, 128), k.expand(6, 1, 8, 128)

    def score(pq, pk, bq, bk):
        pos = torch.tensor([[[pq, pk, 0, 0, 0, 0], [bq, bk, 0, 0, 0, 0]]])
        qr, kr = reference.rotary_2d(q, k, pos)
        return (qr[0] * kr[1]).sum(-1)

    base = score(3, 1, 2, 0)
    assert torch.allclose(score(13, 11, 7, 5), base, atol=1e-9)
    assert not torch.allclose(score(13, 10, 7, 5), base, atol=1e-3)


def test_gelu_is_the_tanh_form():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    expected = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x.tolist()]
    assert torch.allclose(reference.gelu(x), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_all_masked_row_is_uniform_not_nan():
    q, k, v = torch.randn(3, 4, 2, 2, 16, dtype=torch.float16).unbind(0)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[1, :, 2, :] = True
    _, probs = reference.attention_core(q, k, v, mask, layer_id=5)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs[1, :, 2], torch.full_like(probs[1, :, 2], 0.25))
