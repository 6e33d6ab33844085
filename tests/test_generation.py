"""generate() on transformers 5 with the preallocated GLM cache: parity, batching, beams, cache behaviour, errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from glm_kernels import reference
from glm_kernels.cache import GLMKVCache
from glm_kernels.generation import InvalidScoreLogitsProcessor, build_prompt, process_response
from helpers import assert_fp32_close
from test_model import left_padded_batch

BOS, MASK, GMASK, PAD, EOS = 994, 990, 991, 3, 995
CASES = [dict(), dict(pre_seq_len=4), dict(pre_seq_len=3, prefix_projection=True)]
IDS = ["no-prefix", "prefix", "prefix-projection"]


def model_for(**overrides):
    # an untied random head generates varied tokens; eos never wins in these short runs
    return make_model(tie_word_embeddings=False, **overrides)


def params_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_greedy_equals_reference_with_and_without_cache(overrides):
    model = model_for(**overrides)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    ref = reference.greedy(params_of(model), model.config, ids, 10)
    cached = model.generate(ids, max_new_tokens=10, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, ref)
    assert torch.equal(uncached, ref)
    # the no-cache full forward on the result predicts every generated token
    logits = model(ref).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:-1].argmax(-1), ref[0, ids.shape[1]:])


def test_greedy_on_the_triton_kernels():
    model = model_for(pre_seq_len=4, kernel_backend="triton")
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       reference.greedy(params_of(model), model.config, ids, 6))


ROWS = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS], [12, 13, 14, 15, 16, 17, GMASK, BOS]]


@pytest.mark.parametrize("overrides", CASES[:2], ids=IDS[:2])
def test_batched_left_padded_rows_equal_rows_alone(overrides):
    model = model_for(**overrides)
    alone = [model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False)[0, len(row):] for row in ROWS]
    ids, mask4d, pos = left_padded_batch(ROWS, 8)
    mask2d = (ids != PAD).long()
    variants = {
        "tokenizer outputs (4D bool mask + 2D positions)": dict(attention_mask=mask4d, position_ids=pos),
        "2D padding mask": dict(attention_mask=mask2d),
        "bare input_ids": dict(),
    }
    for name, kwargs in variants.items():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)
        for i, expected in enumerate(alone):
            assert torch.equal(out[i, 8:], expected), f"{name}: row {i}"


def reference_beam_search(model, ids, beams, steps):
    """Plain beam search on the reference model (full recompute each step, no cache, no eos)."""
    params, cfg = params_of(model), model.config
    hyps = [(0.0, ids[0].tolist())]
    for _ in range(steps):
        candidates = []
        for score, seq in hyps:
            logits, _, _ = reference.lm_forward(params, cfg, torch.tensor([seq]))
            logp = F.log_softmax(logits[0, -1].float(), dim=-1)
            top = torch.topk(logp, 2 * beams)
            candidates += [(score + float(v), seq + [int(t)]) for v, t in zip(top.values, top.indices)]
        hyps = sorted(candidates, key=lambda c: -c[0])[:beams]
    return hyps[0][1]


@pytest.mark.parametrize("overrides", CASES[:2], ids=IDS[:2])
def test_beam_search_matches_an_independent_implementation(overrides):
    model = model_for(**overrides)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    out = model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False, early_stopping=False)
    assert EOS not in out[0].tolist()
    assert out[0].tolist() == reference_beam_search(model, ids, beams=2, steps=5)


def test_sampling_is_reproducible_with_a_seed():
    model = model_for(pre_seq_len=2)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.7, temperature=0.95)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.7, temperature=0.95)
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_cache_round_trip_continues_generation():
    model = model_for(pre_seq_len=3)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    whole = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = GLMKVCache(model.config, batch_size=1, max_length=32)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == first.shape[1] - 1  # the last token is not yet fed
    second = model.generate(first, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert torch.equal(second, whole)
    # the cache as the original's tuple past continues the model's forward
    legacy = cache.to_legacy()
    assert len(legacy) == 2 and legacy[0][0].shape == (3 + whole.shape[1] - 1, 1, 4, 32)
    pos = torch.tensor([[[3], [whole.shape[1] - 4]]])
    step = model(whole[:, -1:], position_ids=pos, past_key_values=legacy).logits
    assert torch.equal(step[0, -1].argmax(), model(whole).logits[0, -1].argmax())


def test_cache_never_moves_and_memory_stays_flat():
    model = model_for(pre_seq_len=2, hidden_size=256, num_attention_heads=4, inner_hidden_size=512)
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    cache = GLMKVCache(model.config, batch_size=1, max_length=120)
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(100):
            if step == 10:
                start = rss()
            pos = torch.tensor([[[3], [2 + step]]])
            out = model(token, position_ids=pos, past_key_values=cache)
            assert out.past_key_values is cache
            assert [(la.keys.data_ptr(), la.values.data_ptr()) for la in cache.layers] == pointers
            token = out.logits[:, -1:].argmax(-1)
        growth = rss() - start
    assert cache.get_seq_length() == 105
    # 90 steps of a growing cache would hold 90 * 2 layers * 2 * 256 * 4 B = 369 KB more, plus the copies
    assert growth < 256 * 1024, growth


def test_lm_head_runs_only_on_the_last_position_in_generation():
    model = model_for()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    model.generate(torch.tensor([[5, 17, 42, GMASK, BOS]]), max_new_tokens=3, do_sample=False)
    assert seen == [1, 1, 1]  # sequence-first hidden states: one position per call
    full = model(torch.tensor([[5, 17, 42, GMASK, BOS]])).logits
    last = model(torch.tensor([[5, 17, 42, GMASK, BOS]]), logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert_fp32_close(last[:, 0], full[:, -1], 1e-4, "logits of the last position")  # model rule


def test_generation_errors():
    model = model_for()
    ids = torch.tensor([[5, 17, 42, GMASK, BOS]])
    with pytest.raises(ValueError, match="max_length=300 exceeds the model's max_sequence_length=256"):
        model.generate(ids, max_length=300)
    long_prompt = torch.cat((torch.full((1, 260), 7), ids), dim=1)
    with pytest.raises(ValueError, match="max_sequence_length=256"):
        model.generate(long_prompt, max_new_tokens=1)
    small = GLMKVCache(model.config, batch_size=1, max_length=6)
    with pytest.raises(ValueError, match="the GLMKVCache holds 6 tokens, generation needs 8"):
        model.generate(ids, max_new_tokens=4, past_key_values=small)
    with pytest.raises(ValueError, match="this boolean mask is neither"):
        model.generate(ids, attention_mask=torch.rand(1, 1, 5, 5) < 0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="the KV cache holds 6 tokens"):
        model(torch.full((1, 7), 5), past_key_values=small)


def test_chat_helpers_follow_the_original():
    assert build_prompt("你好") == "你好"
    assert build_prompt("再见", [("你好", "你好！")]) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："
    assert process_response("  [[训练时间]]我,很好!  ") == "2023年我，很好！"
    scores = torch.tensor([[0.5, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    fixed = InvalidScoreLogitsProcessor()(None, scores)
    assert fixed.argmax().item() == 5 and torch.isfinite(fixed).all()
