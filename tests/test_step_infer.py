"""`ops.step_infer` (csrc/block_cpu.cpp `step_infer`): a CPU decoding step of ChatGLMForConditionalGeneration in one
C++ call (embeddings, every block, final LayerNorm, LM head). Its logits and cache are bitwise the full forward's,
for float and INT8/INT4 models in fp32/fp16/bf16, with a P-Tuning prefix and a left-padded batch; it is taken for
the steps after the prompt and for nothing else; errors and the cache on a bad input are the forward's."""
import pytest
import torch

import glm_kernels.ops as ops
import glm_kernels.ops.block as block_mod
from conftest import EXTENSION_MISSING, make_model
from glm_kernels import cpu_ext
from glm_kernels.cache import GLMKVCache
from glm_kernels.modeling import ChatGLMForConditionalGeneration, PrefixEncoder

GMASK, BOS = 991, 994  # the tiny config (glm_kernels.selfcheck.tiny_config)
PROMPTS = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]


@pytest.fixture(autouse=True)
def _extension():
    assert cpu_ext.extension() is not None, EXTENSION_MISSING


def model_for(dtype=torch.float32, bits=0, embeddings=True, **overrides):
    model = make_model(**overrides)
    if bits:
        model = model.quantize(bits, quantize_embeddings=embeddings)
    return model.to(dtype)


class Steps:
    """Counts the calls of `ops.step_infer` that took the one-call step; `off` switches it off (WHOLE_STEP)."""

    def __init__(self, monkeypatch):
        self.taken = []
        self.monkeypatch = monkeypatch
        real = ops.step_infer

        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            self.taken.append(out is not None)
            return out
        monkeypatch.setattr(ops, "step_infer", call)

    @property
    def off(self):
        return not block_mod.WHOLE_STEP

    @off.setter
    def off(self, value):
        self.monkeypatch.setattr(block_mod, "WHOLE_STEP", not value)


def prompt_cache(model, rows, left_pad=False):
    """A GLMKVCache after the prompt `rows` (one forward, which never takes the one-call step), its logits."""
    width = max(map(len, rows))
    ids = torch.tensor([[3] * (width - len(r)) + r for r in rows])
    kwargs = {}
    if left_pad:
        kwargs["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = GLMKVCache(model.config, batch_size=len(rows), max_length=width + 8, dtype=model.dtype)
    with torch.no_grad():  # the first forward writes the P-Tuning prefix, if any, into the cache
        out = model(ids, past_key_values=cache, **kwargs)
    return cache, out.logits, width


def positions(batch, step, width):
    """The next token's 2D positions as generate() builds them: [mask position, block position]."""
    return torch.tensor([[[width - 2], [step + 1]]] * batch)


def run_steps(model, rows, steps: Steps, off: bool, n=3, left_pad=False, **kwargs):
    steps.off = off
    cache, _, width = prompt_cache(model, rows, left_pad)
    logits = []
    with torch.no_grad():
        for i in range(n):
            ids = torch.tensor([[20 + i + r] for r in range(len(rows))])
            out = model(ids, position_ids=positions(len(rows), i + 1, width), past_key_values=cache, **kwargs)
            logits.append(out.logits)
    return logits, cache


def assert_same(one_call, full):
    (logits_a, cache_a), (logits_b, cache_b) = one_call, full
    assert len(logits_a) == len(logits_b)
    for i, (a, b) in enumerate(zip(logits_a, logits_b)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()
        assert torch.equal(a, b), f"step {i}: max diff {(a.float() - b.float()).abs().max()}"
    assert cache_a.filled == cache_b.filled
    for la, lb in zip(cache_a.layers, cache_b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("bits", [0, 8, 4], ids=["float", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_one_call_step_equals_the_forward_bitwise(dtype, bits, monkeypatch):
    model, steps = model_for(dtype, bits), Steps(monkeypatch)
    one_call = run_steps(model, PROMPTS[:1], steps, off=False)
    assert steps.taken == [True] * 3  # the prompt's forward never asks; every step after it takes the call
    full = run_steps(model, PROMPTS[:1], steps, off=True)
    assert_same(one_call, full)


@pytest.mark.parametrize("bits,embeddings", [(0, True), (4, False), (8, True)],
                         ids=["float", "int4-float-embeddings", "int8"])
def test_prefix_left_padding_and_an_untied_head(bits, embeddings, monkeypatch):
    # a P-Tuning prefix in the cache, two rows of which one is left-padded (the mask is the cache's), and a head
    # that is not the embedding table
    model = model_for(torch.bfloat16, bits, embeddings, pre_seq_len=3, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.word_embeddings.weight.data_ptr()
    steps = Steps(monkeypatch)
    one_call = run_steps(model, PROMPTS, steps, off=False, left_pad=True)
    assert steps.taken == [True] * 3
    assert_same(one_call, run_steps(model, PROMPTS, steps, off=True, left_pad=True))


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "int4"])
def test_generate_takes_it_after_the_prompt(bits, monkeypatch):
    model, steps = model_for(torch.bfloat16, bits), Steps(monkeypatch)
    ids = torch.tensor([PROMPTS[0]])
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    new = tokens.shape[1] - ids.shape[1]
    assert new >= 2 and steps.taken == [True] * (new - 1)  # the prompt's forward is the full one
    steps.off = True
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), tokens)


def test_outputs_as_the_forward(monkeypatch):
    model, steps = model_for(torch.float32, 4), Steps(monkeypatch)
    for off in (False, True):
        steps.off = off
        cache, _, width = prompt_cache(model, PROMPTS[:1])
        ids, pos = torch.tensor([[20]]), positions(1, 1, width)
        with torch.no_grad():
            out = model(ids, position_ids=pos, past_key_values=cache)
            assert out.past_key_values is cache and out.loss is None and out.hidden_states is None
            plain = model(ids, position_ids=positions(1, 2, width), past_key_values=cache, return_dict=False)
            assert len(plain) == 2 and plain[1] is cache
            no_cache = model(ids, position_ids=positions(1, 3, width), past_key_values=cache, use_cache=False)
            assert no_cache.past_key_values is None and cache.filled == cache.prefix_len + width + 3
            kept = model(ids, position_ids=positions(1, 4, width), past_key_values=cache, logits_to_keep=1)
            assert kept.logits.shape == (1, 1, model.config.vocab_size)
    assert steps.taken == [True] * 4 + [False] * 4


def _hook(module):
    module.register_forward_hook(lambda mod, inp, out: None)
    return {}


NOT_TAKEN = {
    # each: (what the step asks or what the model has) -> the forward runs, with its own behaviour
    "hidden states": lambda model: {"output_hidden_states": True},
    "a mask": lambda model: {"attention_mask": torch.ones(1, len(PROMPTS[0]) + 1, dtype=torch.long)},
    "embeddings": lambda model: {"inputs_embeds": torch.zeros(1, 1, model.config.hidden_size)},
    "a hooked head": lambda model: _hook(model.lm_head),
    "a hooked embedding": lambda model: _hook(model.transformer.word_embeddings),
    "a hooked transformer": lambda model: _hook(model.transformer),
    "a hooked block": lambda model: _hook(model.transformer.layers[1].mlp),
    "a trainable weight": lambda model: model.transformer.final_layernorm.weight.requires_grad_(True) is None or {},
}


@pytest.mark.parametrize("case", list(NOT_TAKEN))
def test_not_taken_where_the_forward_does_more(case, monkeypatch):
    model, steps = model_for(torch.float32, 8), Steps(monkeypatch)
    cache, _, width = prompt_cache(model, PROMPTS[:1])
    reference, _, _ = prompt_cache(model, PROMPTS[:1])
    kwargs = NOT_TAKEN[case](model)
    grad = case == "a trainable weight"
    ids = None if "inputs_embeds" in kwargs else torch.tensor([[20]])
    with torch.set_grad_enabled(grad):
        out = model(ids, position_ids=positions(1, 1, width), past_key_values=cache, **kwargs)
        steps.off = True
        ref = model(ids, position_ids=positions(1, 1, width), past_key_values=reference, **kwargs)
    assert not any(steps.taken)
    assert torch.equal(out.logits, ref.logits)


def test_first_step_and_partial_logits_take_the_forward(monkeypatch):
    model, steps = model_for(torch.float32, 4), Steps(monkeypatch)
    cache = GLMKVCache(model.config, batch_size=1, max_length=16, dtype=model.dtype)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]), past_key_values=cache)  # first step: sets the cache's mask
        out = model(torch.tensor([[20, 21]]), position_ids=torch.tensor([[[3, 3], [1, 2]]]), past_key_values=cache,
                    logits_to_keep=1)
    assert steps.taken == [] and out.logits.shape[1] == 1  # neither forward asks for the one-call step


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "int4"])
def test_bad_inputs_raise_the_forwards_errors_and_leave_the_cache(bits, monkeypatch):
    model, steps = model_for(torch.float32, bits), Steps(monkeypatch)
    vocab = model.config.vocab_size
    cases = [
        (dict(input_ids=torch.tensor([[vocab]])), ValueError, f"input_ids holds id {vocab}, outside the vocabulary"),
        (dict(position_ids=torch.tensor([[[5000], [1]]])), ValueError, "position_ids holds 5000"),
        (dict(position_ids=torch.tensor([[[5], [1], [1]]])), ValueError, r"position_ids must be \[batch, 2, seq\]"),
        (dict(input_ids=torch.tensor([[1.5]])), ValueError, "input_ids must be an integer tensor"),
    ]
    # unchecked ids reach the table: the quantized one names the id, nn.Embedding's lookup raises its own error
    cases.append((dict(input_ids=torch.tensor([[vocab + 1]]), check_inputs=False), IndexError,
                  f"id {vocab + 1} outside" if bits else "index out of range"))
    for off in (False, True):
        steps.off = off
        for change, error, message in cases:
            cache, _, width = prompt_cache(model, PROMPTS[:1])
            before = [layer.keys.clone() for layer in cache.layers], cache.filled
            kwargs = {"input_ids": torch.tensor([[20]]), "position_ids": positions(1, 1, width),
                      "past_key_values": cache, **change}
            with torch.no_grad(), pytest.raises(error, match=message):
                model(**kwargs)
            assert cache.filled == before[1], (off, message)
            assert all(torch.equal(a, layer.keys) for a, layer in zip(before[0], cache.layers)), (off, message)


def test_cache_views_follow_grad_and_inference_modes(monkeypatch):
    # the cache keeps its [capacity, b, nh, hd] views; one made without gradients (or in inference mode) must not
    # be written in place with gradients on (or outside inference mode): torch refuses both
    model, steps = model_for(torch.float32, 0), Steps(monkeypatch)
    cache, _, width = prompt_cache(model, PROMPTS[:1])  # the prompt ran under no_grad
    with torch.inference_mode():
        model(torch.tensor([[20]]), position_ids=positions(1, 1, width), past_key_values=cache)
    model.transformer.final_layernorm.weight.requires_grad_(True)
    out = model(torch.tensor([[21]]), position_ids=positions(1, 2, width), past_key_values=cache)
    out.logits.float().sum().backward()
    assert model.transformer.final_layernorm.weight.grad is not None
    assert steps.taken == [True, False] and cache.filled == width + 2


# ---------------------------------------------------------------------------------------------- the kept arguments


def test_arguments_are_gathered_once_per_cache(monkeypatch):
    model, steps = model_for(torch.bfloat16, 4), Steps(monkeypatch)
    plans = []
    build = ChatGLMForConditionalGeneration._plan_step
    monkeypatch.setattr(ChatGLMForConditionalGeneration, "_plan_step",
                        lambda self, cache: plans.append(build(self, cache)) or plans[-1])
    _, cache = run_steps(model, PROMPTS[:1], steps, off=False, n=4)
    assert steps.taken == [True] * 4 and len(plans) == 1 and cache.step_plan is plans[0]
    # the plan holds the model's own parameters and the cache's own buffers, not copies
    args = plans[0].args
    assert args.before[7][0] is model.transformer.layers[0].attention.query_key_value.weight
    assert args.between[3][0].data_ptr() == cache.layers[0].keys.data_ptr()
    run_steps(model, PROMPTS[:1], steps, off=False, n=2)  # another cache: gathered for it
    assert len(plans) == 2


def _scaled(t, by=1.5):
    return torch.nn.Parameter(t.detach().clone() * by if t.is_floating_point() else t.detach().clone(),
                              requires_grad=False)


def _hook_after(model):
    model.transformer.layers[1].mlp.register_forward_hook(lambda mod, inp, out: None)


CHANGES = {
    # each changes what a step computes (or whether it may run in one call) after the first step kept its plan
    "a parameter set": lambda model: setattr(model.transformer.layers[1].mlp.dense_4h_to_h, "bias",
                                             _scaled(model.transformer.layers[1].mlp.dense_4h_to_h.bias)),
    "a parameter written behind torch's back": lambda model: model.transformer.layers[0].attention.dense
    ._parameters.__setitem__("bias", _scaled(model.transformer.layers[0].attention.dense.bias, 3.0)),
    "a submodule replaced": lambda model: setattr(model.transformer.layers[1], "post_attention_layernorm",
                                                  _norm_like(model.transformer.layers[1].post_attention_layernorm)),
    "an eps set": lambda model: [setattr(layer, "eps", 0.5) for layer in model.transformer.layers],
    "a forward hook": _hook_after,
    "a replaced forward": lambda model: setattr(model.transformer.layers[0].mlp, "forward",
                                                model.transformer.layers[0].mlp.forward),
    "the cache's rows reordered": None,  # applied to the cache (reorder_cache, as beam search does)
}
TAKEN_AFTER = {"a forward hook": False, "a replaced forward": False}


def _norm_like(norm):
    new = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight * 0.5)
        new.bias.copy_(norm.bias + 0.25)
    return new


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "int4"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_the_first_step_is_seen(change, bits, monkeypatch):
    # three identical models and caches, one step each in one call (which keeps its plan); the change to the
    # first two; the next step of the first in one call, of the second through the full forward (bitwise the
    # same), of the third without the change (different: a stale plan would have been seen)
    models = [model_for(torch.float32, bits) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    steps = Steps(monkeypatch)
    caches, width = [], None
    for model in models:
        cache, _, width = prompt_cache(model, PROMPTS)
        with torch.no_grad():
            model(torch.tensor([[20], [21]]), position_ids=positions(2, 1, width), past_key_values=cache)
        assert cache.step_plan is not None
        caches.append(cache)
    kept = caches[0].step_plan
    for model, cache in zip(models[:2], caches[:2]):
        if CHANGES[change] is None:
            cache.reorder_cache(torch.tensor([1, 0]))
        else:
            CHANGES[change](model)
    out = []
    for off, model, cache in zip((False, True, False), models, caches):
        steps.off = off
        steps.taken.clear()
        with torch.no_grad():
            out.append(model(torch.tensor([[22], [23]]), position_ids=positions(2, 2, width),
                             past_key_values=cache).logits)
        if model is models[0]:
            assert any(steps.taken) == TAKEN_AFTER.get(change, True)
    assert caches[0].step_plan is not kept  # gathered anew (or not at all)
    assert torch.equal(out[0], out[1])
    if TAKEN_AFTER.get(change, True):  # a change of what is computed (a no-op hook changes nothing)
        assert not torch.equal(out[0], out[2])  # it matters: a stale plan would have been seen


def test_a_removed_hook_gives_the_one_call_step_back(monkeypatch):
    model, steps = model_for(torch.float32, 4), Steps(monkeypatch)
    cache, _, width = prompt_cache(model, PROMPTS[:1])
    with torch.no_grad():
        model(torch.tensor([[20]]), position_ids=positions(1, 1, width), past_key_values=cache)
        handle = model.transformer.layers[0].input_layernorm.register_forward_pre_hook(lambda mod, inp: None)
        model(torch.tensor([[21]]), position_ids=positions(1, 2, width), past_key_values=cache)
        handle.remove()
        model(torch.tensor([[22]]), position_ids=positions(1, 3, width), past_key_values=cache)
    assert steps.taken == [True, True] and cache.filled == cache.prefix_len + width + 3  # the hooked step: forward


def test_the_step_declines_moved_or_trainable_tensors_before_writing(monkeypatch):
    model = model_for(torch.float32, 4)
    cache, _, width = prompt_cache(model, PROMPTS[:1])
    with torch.no_grad():
        model(torch.tensor([[20]]), position_ids=positions(1, 1, width), past_key_values=cache)
    args = cache.step_plan.args
    before = [layer.keys.clone() for layer in cache.layers], cache.filled
    ids, pos = torch.tensor([[21]]), positions(1, 2, width)
    norms = list(args.before[6])
    norms[3] = norms[3].double()  # a norm cast to another dtype
    cast = args._replace(before=args.before[:6] + (norms,) + args.before[7:])
    trainable = [t.detach().clone().requires_grad_(True) for t in args.before[6]]
    with_grad = args._replace(before=args.before[:6] + (trainable,) + args.before[7:])
    with torch.no_grad():
        assert ops.step_infer(cast, ids, pos, cache.filled, None) is None
    with torch.enable_grad():
        assert ops.step_infer(with_grad, ids, pos, cache.filled, None) is None
    assert cache.filled == before[1]
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before[0], cache.layers))
    with torch.no_grad():  # the same arguments without gradients: taken
        assert ops.step_infer(with_grad, ids, pos, cache.filled, None) is not None


def test_a_cast_model_raises_the_forwards_error(monkeypatch):
    model, steps = model_for(torch.float32, 4), Steps(monkeypatch)
    cache, _, width = prompt_cache(model, PROMPTS[:1])
    with torch.no_grad():
        model(torch.tensor([[20]]), position_ids=positions(1, 1, width), past_key_values=cache)
        model.to(torch.bfloat16)  # the plan's tensors now hold bf16 data; the cache is still fp32
        with pytest.raises(ValueError, match="the KV cache was built for batch 1, torch.float32"):
            model(torch.tensor([[21]]), position_ids=positions(1, 2, width), past_key_values=cache)
    assert cache.filled == cache.prefix_len + width + 1


@pytest.mark.parametrize("with_past", [False, True])
def test_step_output_is_the_constructors(with_past):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from glm_kernels.modeling import step_output

    logits, past = torch.randn(1, 1, 8), (GLMKVCache(make_model().config, 1, 4) if with_past else None)
    fast, ref = step_output(logits, past), CausalLMOutputWithPast(logits=logits, past_key_values=past)
    assert type(fast) is type(ref)
    assert fast.__dict__.keys() == ref.__dict__.keys()
    assert all(fast.__dict__[k] is ref.__dict__[k] for k in ref.__dict__)
    assert list(fast.keys()) == list(ref.keys()) and all(fast[k] is ref[k] for k in ref.keys())
    assert len(fast.to_tuple()) == len(ref.to_tuple()) and fast[0] is logits and fast.logits is logits
    fast.loss = torch.zeros(())  # still a ModelOutput: setting a field makes it an item, as for the constructor's
    assert list(fast.keys())[-1] == "loss" and fast["loss"] is fast.loss
