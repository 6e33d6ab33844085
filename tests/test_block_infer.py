"""`ops.block_infer` (csrc/block_cpu.cpp): a GLM block of CPU decoding in one C++ call is bitwise the block run
op by op, for float and INT8/INT4 linears, fp32/fp16/bf16, with a P-Tuning prefix and a left-padded batch; it is
taken exactly when the op-by-op path would run the same operators, and its bad inputs are named."""
import pytest
import torch

import glm_kernels.ops as ops
import glm_kernels.ops.block as block_mod
from conftest import EXTENSION_MISSING, make_model
from glm_kernels import cpu_ext
from glm_kernels.cache import GLMKVCache

GMASK, BOS, PAD = 991, 994, 3  # the tiny config (glm_kernels.selfcheck.tiny_config)
ROWS = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]


@pytest.fixture(autouse=True)
def _extension():
    assert cpu_ext.extension() is not None, EXTENSION_MISSING


def model_for(dtype, bits, **overrides):
    model = make_model(**overrides)
    if bits:
        model = model.quantize(bits, quantize_embeddings=True)
    return model.to(dtype)


def decode(model, ids, monkeypatch, fused: bool, **kwargs):
    """Greedy tokens and every step's LM-head output, with the one-call block on or off; and how many block
    calls took it."""
    monkeypatch.setattr(block_mod, "ENABLED", fused)
    taken = []
    real = block_mod.block_infer

    def counting(*args, **kw):
        out = real(*args, **kw)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(ops, "block_infer", counting)
    logits = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: logits.append(out.detach().clone()))
    try:
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)
    finally:
        hook.remove()
    return tokens, logits, taken


@pytest.mark.parametrize("bits", [0, 8, 4], ids=["float", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_one_call_blocks_equal_the_op_by_op_blocks_bitwise(dtype, bits, monkeypatch):
    model = model_for(dtype, bits)
    ids = torch.tensor([ROWS[0]])
    tokens, logits, taken = decode(model, ids, monkeypatch, fused=True)
    ref_tokens, ref_logits, ref_taken = decode(model, ids, monkeypatch, fused=False)
    layers = model.config.num_layers
    # the prompt (5 rows, at most 16) and every decode step take it; switched off, none does
    assert len(logits) == len(ref_logits) >= 2
    assert taken == [True] * len(logits) * layers and ref_taken == [False] * len(logits) * layers
    assert torch.equal(tokens, ref_tokens)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.equal(a, b), f"step {step}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "int4"])
def test_with_a_prefix_and_a_left_padded_batch(bits, monkeypatch):
    model = model_for(torch.bfloat16, bits, pre_seq_len=3, prefix_projection=True)
    with torch.no_grad():
        for p in model.transformer.prefix_encoder.parameters():
            p.normal_(0, 0.5)
    width = max(map(len, ROWS))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ROWS])
    mask = (ids != PAD).long()  # a padded batch: the attention takes the dense GLM mask in every layer
    tokens, logits, taken = decode(model, ids, monkeypatch, fused=True, attention_mask=mask)
    ref_tokens, ref_logits, _ = decode(model, ids, monkeypatch, fused=False, attention_mask=mask)
    assert all(taken) and len(taken) == len(logits) * model.config.num_layers
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)


def test_taken_only_where_the_op_by_op_path_runs_the_same_operators(monkeypatch):
    model = model_for(torch.float32, 8)
    cfg = model.config
    calls = []
    real = block_mod.block_infer
    monkeypatch.setattr(ops, "block_infer", lambda *a, **k: calls.append(real(*a, **k) is not None))
    # a 20-token prompt: more rows than the extension's product, rope_qkv and attention_few each take
    ids = torch.tensor([[*range(5, 23), GMASK, BOS]])
    with torch.no_grad():
        model(ids, past_key_values=GLMKVCache(cfg, 1, 24))
    assert calls == [False] * cfg.num_layers
    calls.clear()
    # a gradient to keep (P-Tuning through a cache): op by op, and the gradient reaches the prefix encoder
    prefixed = model_for(torch.float32, 0, pre_seq_len=2)
    prefixed.transformer.prefix_encoder.requires_grad_(True)
    out = prefixed(torch.tensor([ROWS[0]]), past_key_values=GLMKVCache(prefixed.config, 1, 8))
    assert calls == [False] * cfg.num_layers
    out.logits.sum().backward()
    assert prefixed.transformer.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    calls.clear()
    # without a cache (the original's tuple past) the block runs op by op and never asks
    with torch.no_grad():
        model(torch.tensor([ROWS[0]]), use_cache=True)
    assert calls == []


def test_bad_inputs_are_named():
    ext = cpu_ext.extension()
    h, heads, hd = 8, 2, 4
    hidden = torch.randn(1, 1, h)
    norms = [torch.ones(h), torch.zeros(h)] * 2
    weights = [torch.randn(3 * h, h), torch.randn(h, h), torch.randn(4 * h, h), torch.randn(h, 4 * h)]
    k = torch.zeros(4, 1, heads, hd)
    cos = sin = torch.ones(8, hd // 2)
    pos = torch.zeros(1, 2, 1, dtype=torch.long)

    def call(norms=norms, weights=weights, scales=(None,) * 4, bits=(0,) * 4):
        return ext.block_infer(hidden, None, 1.0, 1e-5, list(norms), list(weights), list(scales), [None] * 4,
                               list(bits), pos, cos, sin, heads, k[:1], k[:1].clone(), k[:2], k[:2], None)

    m, mlp = call()  # the well-formed call runs
    assert m.shape == mlp.shape == (1, 1, h)
    with pytest.raises(RuntimeError, match="norms must be .ln_in weight, ln_in bias, ln_post weight, ln_post bias"):
        call(norms=norms[:3])
    with pytest.raises(RuntimeError, match="the block's four linears"):
        call(weights=weights[:3])
    with pytest.raises(RuntimeError, match="linear 2: bits must be 0 .float., 4 or 8"):
        call(bits=(0, 0, 3, 0))
    with pytest.raises(RuntimeError, match="linear 1: a scale goes with bits 4 or 8 and only then"):
        call(scales=(None, torch.ones(h, dtype=torch.half), None, None))
