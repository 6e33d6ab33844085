"""The bytes formulas of the docs (glm_kernels.tools.bytes_table) against what the interpreter counts."""
import torch

from glm_kernels import ops
from glm_kernels.ops.mask import GLMMask
from glm_kernels.tools import bytes_table as bt
from glm_kernels.tools.traffic import count_traffic


def test_rope_formula():
    s, b, nh, hd = 3, 2, 20, 128  # two programs per token (BLOCK_H = 16)
    mixed = torch.randn(s, b, 3 * nh * hd, dtype=torch.float16)
    pos = torch.randint(0, 64, (b, 2, s))
    cos, sin = ops.rotary_table(64, hd // 2, torch.float16)
    with count_traffic() as c:
        ops.rope_qkv(mixed, pos, cos, sin, nh, backend="triton")
    loaded, stored, _ = bt.rope_bytes(s, b, nh, hd, 2)
    assert (c["_rope_qkv_kernel"].loaded, c["_rope_qkv_kernel"].stored) == (loaded, stored)


def test_attention_formulas():
    sq, b, nh, hd, La = 70, 1, 2, 64, 10
    q, k, v = torch.randn(3, sq, b, nh, hd).unbind(0)
    pk, pv = torch.randn(2, La, b, nh, hd).unbind(0)
    with torch.no_grad(), count_traffic() as c:
        ops.glm_attention(q, k, v, 0, None, past_k=pk, past_v=pv, backend="triton")
    loaded, stored, minimum = bt.attention_fwd_bytes(sq, b, nh, hd, La, sq, 4)
    assert (c["_attn_fwd"].loaded, c["_attn_fwd"].stored) == (loaded, stored)
    assert c["_attn_fwd"].loaded_unique + c["_attn_fwd"].stored_unique == minimum  # each byte once

    q1 = q[:1]
    with torch.no_grad(), count_traffic() as c:
        ops.glm_attention(q1, k[:1], v[:1], 0, None, past_k=pk, past_v=pv, backend="triton")
    loaded, stored, _ = bt.attention_decode_bytes(b, nh, hd, La + 1, 4)
    assert c["_attn_decode_partial"].loaded + c["_attn_decode_combine"].loaded == loaded
    assert c["_attn_decode_partial"].stored + c["_attn_decode_combine"].stored == stored


def test_glm_mask_skips_key_blocks_past_the_causal_edge():
    sq, b, nh, hd = 70, 1, 1, 128  # BLOCK_N 32: the first query tile (rows 0-63) needs keys < 64 only
    q, k, v = torch.randn(3, sq, b, nh, hd).unbind(0)
    mask = GLMMask(0, torch.zeros(1, dtype=torch.long), torch.tensor([10]))
    with torch.no_grad(), count_traffic() as c:
        ops.glm_attention(q, k, v, 0, mask, backend="triton")
    loaded, _, _ = bt.attention_fwd_bytes(sq, b, nh, hd, 0, sq, 4)
    assert c["_attn_fwd"].loaded < loaded  # fewer key tiles than the unmasked formula


def test_softmax_layernorm_gelu_formulas():
    scores = torch.randn(1, 2, 5, 33, dtype=torch.float16)
    mask = torch.rand(1, 1, 5, 33) < 0.3
    with count_traffic() as c:
        ops.scaled_masked_softmax(scores, mask, 3.0, backend="triton")
    loaded, stored, _ = bt.softmax_bytes(10, 33, 2)
    assert (c["_softmax_fwd_kernel"].loaded, c["_softmax_fwd_kernel"].stored) == (loaded, stored)

    x, r = torch.randn(2, 300, 64, dtype=torch.float16).unbind(0)
    w, bias = torch.randn(2, 64, dtype=torch.float16).unbind(0)
    with torch.no_grad(), count_traffic() as c:
        ops.residual_layer_norm(x, r, 7.48, w, bias, 1e-5, backend="triton")
    loaded, stored, _ = bt.layernorm_bytes(300, 64, 2)
    assert (c["_ln_fwd_kernel"].loaded, c["_ln_fwd_kernel"].stored) == (loaded, stored)

    x, bias = torch.randn(200, 96, dtype=torch.float16), torch.randn(96, dtype=torch.float16)
    with torch.no_grad(), count_traffic() as c:
        ops.bias_gelu(x, bias, backend="triton")
    loaded, stored, _ = bt.gelu_bytes(200, 96, 2)
    assert (c["_gelu_fwd_kernel"].loaded, c["_gelu_fwd_kernel"].stored) == (loaded, stored)


def test_aten_counter():
    a, b = torch.empty(4, 4, device="meta"), torch.empty(4, device="meta")
    read, written, ops_seen = bt.count_aten_bytes(lambda: (a + b).t().contiguous())
    # add reads a (64 B) and the broadcast row b once (16 B), writes 64 B; the transpose is a view;
    # contiguous() copies 64 B in and out
    assert [name for name, _, _ in ops_seen] == ["add", "clone"]
    assert (read, written) == (64 + 16 + 64, 64 + 64)


def test_fused_kernels_beat_the_unfused_ops_at_6b_shapes():
    fused, ref = bt.fused_costs(1024, 0), bt.reference_costs(1024, 0)
    for op, (loaded, stored, minimum) in fused.items():
        assert minimum <= loaded + stored
        assert sum(ref[op]) > loaded + stored, op
    decode = bt.fused_costs(1, 1023)["rope + KV concatenation"]
    # the decode step writes one token into the cache instead of copying the 1151-token past
    assert sum(bt.reference_costs(1, 1023)["rope + KV concatenation"]) > 100 * (decode[0] + decode[1])
