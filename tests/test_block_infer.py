"""`ops.block_infer` / `ops.layers_infer` (csrc/block_cpu.cpp): a GLM block of CPU decoding in one C++ call, and
every block in one call, are bitwise the blocks run op by op, for float and INT8/INT4 linears, fp32/fp16/bf16,
with a P-Tuning prefix and a left-padded batch; they are taken exactly when the op-by-op path would run the same
operators, and their bad inputs are named."""
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


MODES = ("layers", "blocks", "off")  # every block in one call; one call per block; op by op


def decode(model, ids, monkeypatch, mode: str, **kwargs):
    """Greedy tokens and every step's LM-head output in `mode`; and which calls of `ops.layers_infer` (one per
    forward) and of `ops.block_infer` (one per block run one by one) took their one-call form."""
    monkeypatch.setattr(block_mod, "ENABLED", mode != "off")
    monkeypatch.setattr(block_mod, "ALL_LAYERS", mode == "layers")
    taken = {"layers_infer": [], "block_infer": []}

    def counting(name):
        real = getattr(block_mod, name)

        def call(*args, **kw):
            out = real(*args, **kw)
            taken[name].append(out is not None)
            return out
        return call

    for name in taken:
        monkeypatch.setattr(ops, name, counting(name))
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
    runs = {mode: decode(model, ids, monkeypatch, mode) for mode in MODES}
    ref_tokens, ref_logits, _ = runs["off"]
    forwards, layers = len(ref_logits), model.config.num_layers
    # the prompt (5 rows, at most 16) and every decode step take the one-call forms; switched off, none does
    assert forwards >= 2
    assert runs["layers"][2] == {"layers_infer": [True] * forwards, "block_infer": []}
    assert runs["blocks"][2] == {"layers_infer": [False] * forwards, "block_infer": [True] * forwards * layers}
    assert runs["off"][2] == {"layers_infer": [False] * forwards, "block_infer": [False] * forwards * layers}
    for mode in ("layers", "blocks"):
        tokens, logits, _ = runs[mode]
        assert torch.equal(tokens, ref_tokens), mode
        assert len(logits) == forwards
        for step, (a, b) in enumerate(zip(logits, ref_logits)):
            assert torch.equal(a, b), f"{mode}, step {step}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "int4"])
def test_with_a_prefix_and_a_left_padded_batch(bits, monkeypatch):
    model = model_for(torch.bfloat16, bits, pre_seq_len=3, prefix_projection=True)
    with torch.no_grad():
        for p in model.transformer.prefix_encoder.parameters():
            p.normal_(0, 0.5)
    width = max(map(len, ROWS))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in ROWS])
    mask = (ids != PAD).long()  # a padded batch: the attention takes the dense GLM mask in every layer
    ref_tokens, ref_logits, _ = decode(model, ids, monkeypatch, "off", attention_mask=mask)
    for mode, name, calls in (("layers", "layers_infer", 1), ("blocks", "block_infer", model.config.num_layers)):
        tokens, logits, taken = decode(model, ids, monkeypatch, mode, attention_mask=mask)
        assert taken[name] == [True] * len(logits) * calls, mode
        assert torch.equal(tokens, ref_tokens), mode
        for a, b in zip(logits, ref_logits):
            assert torch.equal(a, b), mode


def test_taken_only_where_the_op_by_op_path_runs_the_same_operators(monkeypatch):
    model = model_for(torch.float32, 8)
    cfg = model.config
    calls, whole = [], []
    real, real_layers = block_mod.block_infer, block_mod.layers_infer
    monkeypatch.setattr(ops, "block_infer", lambda *a, **k: calls.append(real(*a, **k) is not None))
    monkeypatch.setattr(ops, "layers_infer", lambda *a, **k: (whole.append(real_layers(*a, **k)), whole[-1])[1])
    # a 20-token prompt: more rows than the extension's product, rope_qkv and attention_few each take
    ids = torch.tensor([[*range(5, 23), GMASK, BOS]])
    with torch.no_grad():
        model(ids, past_key_values=GLMKVCache(cfg, 1, 24))
    assert calls == [False] * cfg.num_layers and whole == [None]
    calls.clear()
    whole.clear()
    # a gradient to keep (P-Tuning through a cache): op by op, and the gradient reaches the prefix encoder
    prefixed = model_for(torch.float32, 0, pre_seq_len=2)
    prefixed.transformer.prefix_encoder.requires_grad_(True)
    out = prefixed(torch.tensor([ROWS[0]]), past_key_values=GLMKVCache(prefixed.config, 1, 8))
    assert calls == [False] * cfg.num_layers and whole == [None]
    out.logits.sum().backward()
    assert prefixed.transformer.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    calls.clear()
    whole.clear()
    # without a cache (the original's tuple past) the block runs op by op and never asks
    with torch.no_grad():
        model(torch.tensor([ROWS[0]]), use_cache=True)
    assert calls == [] and whole == []
    # hidden states of every layer asked for: the blocks one by one, each in one call
    with torch.no_grad():
        model(torch.tensor([ROWS[0]]), past_key_values=GLMKVCache(cfg, 1, 8), output_hidden_states=True)
    assert calls == [True] * cfg.num_layers and whole == []
    calls.clear()
    # layers that differ in what the one call shares (eps): each block in its own call, same numbers
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        together = model(ids, past_key_values=GLMKVCache(cfg, 1, 8)).logits
        assert calls == [] and whole[-1] is not None
        monkeypatch.setattr(model.transformer.layers[1], "eps", model.transformer.layers[1].eps * 1.0000001)
        apart = model(ids, past_key_values=GLMKVCache(cfg, 1, 8)).logits
    assert whole[-1] is None and calls == [True] * cfg.num_layers
    monkeypatch.undo()
    # a block with a forward hook (accelerate's offload hooks replace forward instead): every block is called
    # as a module, so the hook runs, each block still in one call
    calls.clear()
    whole.clear()
    monkeypatch.setattr(ops, "block_infer", lambda *a, **k: calls.append(real(*a, **k) is not None))
    monkeypatch.setattr(ops, "layers_infer", lambda *a, **k: (whole.append(real_layers(*a, **k)), whole[-1])[1])
    seen = []
    handle = model.transformer.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(1))
    try:
        with torch.no_grad():
            model(ids, past_key_values=GLMKVCache(cfg, 1, 8))
    finally:
        handle.remove()
    assert seen == [1] and whole == [] and calls == [True] * cfg.num_layers
    # fp32 model rule of GLM_SPEC (1e-4 of the output's scale): an eps off by 1e-12 moves nothing further
    assert (apart - together).abs().max() <= 1e-4 * together.abs().max()


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


def test_layers_bad_inputs_are_named():
    ext = cpu_ext.extension()
    h, heads, hd, layers = 8, 2, 4, 2
    hidden = torch.randn(1, 1, h)
    norms = [torch.ones(h), torch.zeros(h)] * 2 * layers
    weights = [torch.randn(3 * h, h), torch.randn(h, h), torch.randn(4 * h, h), torch.randn(h, 4 * h)] * layers
    keys = [torch.zeros(4, 1, heads, hd) for _ in range(layers)]
    values = [torch.zeros(4, 1, heads, hd) for _ in range(layers)]
    cos = sin = torch.ones(8, hd // 2)
    pos = torch.zeros(1, 2, 1, dtype=torch.long)

    def call(norms=norms, weights=weights, keys=keys, values=values, start=1):
        return ext.layers_infer(hidden, 1.0, 1e-5, list(norms), list(weights), [None] * 4 * layers,
                                [None] * 4 * layers, [0] * 4 * layers, pos, cos, sin, heads, list(keys), list(values),
                                start, None)

    m, mlp = call()  # the well-formed call runs, and writes position 1 of every layer's cache
    assert m.shape == mlp.shape == (1, 1, h)
    assert all(k[1].abs().sum() > 0 and k[2:].abs().sum() == 0 for k in keys + values)
    with pytest.raises(RuntimeError, match="keys and values must hold one cache buffer per layer, got 2 and 1"):
        call(values=values[:1])
    with pytest.raises(RuntimeError, match="four entries per layer \\(8\\), got 7, 8"):
        call(norms=norms[:7])
    with pytest.raises(RuntimeError, match="layer 0: the cache buffers must be .capacity, b, nh, hd. with room for "
                                           "positions .4, 5\\)"):
        call(start=4)


def test_a_hooked_submodule_is_called_as_a_module(monkeypatch):
    # The one-call forms read the weights without calling the submodules: a block whose submodule has a forward
    # hook (or a global hook) runs op by op, so the hook sees every forward; the other blocks keep one call each.
    model = model_for(torch.bfloat16, 4)
    layers = model.config.num_layers
    seen, baseline = [], decode(model, torch.tensor([ROWS[0]]), monkeypatch, "off")
    handle = model.transformer.layers[1].mlp.dense_4h_to_h.register_forward_hook(
        lambda mod, args, out: seen.append(out.shape[0]))
    try:
        tokens, logits, taken = decode(model, torch.tensor([ROWS[0]]), monkeypatch, "layers")
    finally:
        handle.remove()
    forwards = len(logits)
    assert len(seen) == forwards  # the hook ran in the prompt and in every step
    assert taken["layers_infer"] == [False] * forwards
    assert taken["block_infer"] == [True] * (layers - 1) * forwards  # the hooked block never asks
    assert torch.equal(tokens, baseline[0]) and all(torch.equal(a, b) for a, b in zip(logits, baseline[1]))
    # a global forward hook: every block op by op, the hook sees every submodule call
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(type(mod)))
    try:
        tokens, logits, taken = decode(model, torch.tensor([ROWS[0]]), monkeypatch, "layers")
    finally:
        handle.remove()
    assert taken["layers_infer"] == [] and taken["block_infer"] == []  # neither is even asked
    assert sum(c.__name__ == "QuantizedLinear" for c in calls) >= len(logits) * (4 * layers + 1)
    assert torch.equal(tokens, baseline[0])
