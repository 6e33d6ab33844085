"""The model (torch backend) against the reference, and its input checks."""
import pytest
import torch

from conftest import make_model
from glm_kernels import reference
from helpers import assert_fp32_close, assert_lowp_close, greedy_generate

BOS, MASK, GMASK, PAD = 994, 990, 991, 3


def prompt(*tokens):
    return torch.tensor([[*tokens, GMASK, BOS]])


def params_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


PREFIX_CASES = [dict(), dict(pre_seq_len=5), dict(pre_seq_len=3, prefix_projection=True)]


@pytest.mark.parametrize("overrides", PREFIX_CASES, ids=["no-prefix", "prefix", "prefix-projection"])
def test_fp32_logits_match_reference(overrides):
    model = make_model(**overrides)
    ids = torch.tensor([[5, 17, 42, 256, GMASK, BOS, 8, 9, 11], [7, 7, GMASK, BOS, 1, 2, 3, 4, 5]])
    out = model(ids)
    ref, _, _ = reference.lm_forward(params_of(model), model.config, ids)
    assert out.logits.shape == (2, 9, model.config.vocab_size)
    assert_fp32_close(out.logits, ref, 1e-4, "fp32 logits")  # model rule


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overrides", PREFIX_CASES, ids=["no-prefix", "prefix", "prefix-projection"])
def test_low_precision_logits_match_reference(dtype, overrides):
    model32 = make_model(**overrides)
    ids = torch.tensor([[5, 17, 42, 256, 300, GMASK, BOS, 8, 9, 11, 12]])
    ref32, _, _ = reference.lm_forward(params_of(model32), model32.config, ids)
    model = model32.to(dtype)
    reflow, _, _ = reference.lm_forward(params_of(model), model.config, ids)
    out = model(ids).logits
    assert out.dtype == dtype
    assert_lowp_close(out, reflow, ref32, f"{dtype} logits")


def left_padded_batch(rows, length):
    """Pad like the original tokenizer: ids on the left with PAD, mask rows/columns True, positions 0."""
    ids, masks, positions = [], [], []
    for row in rows:
        r = torch.tensor([row])
        pad = length - len(row)
        mask = reference.get_masks(r, BOS)[0, 0]
        pos = reference.get_position_ids(r, BOS, MASK, GMASK)[0]
        ids.append(torch.cat((torch.full((pad,), PAD), r[0])))
        full = torch.ones(length, length, dtype=torch.bool)
        full[pad:, pad:] = mask
        masks.append(full)
        positions.append(torch.cat((torch.zeros(2, pad, dtype=torch.long), pos), dim=1))
    return torch.stack(ids), torch.stack(masks)[:, None], torch.stack(positions)


@pytest.mark.parametrize("overrides", PREFIX_CASES[:2], ids=["no-prefix", "prefix"])
def test_left_padded_batch(overrides):
    model = make_model(**overrides)
    rows = [[5, 6, 7, GMASK, BOS, 8, 9], [11, GMASK, BOS], [12, 13, 14, 15, GMASK, BOS, 16]]
    ids, mask, pos = left_padded_batch(rows, 9)
    out = model(ids, attention_mask=mask, position_ids=pos).logits
    ref, _, _ = reference.lm_forward(params_of(model), model.config, ids, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(out).all(), "padded rows must stay finite"
    assert_fp32_close(out, ref, 1e-4, "left-padded logits")
    # each row's real tokens get the logits of that row run alone
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row])).logits[0]
        assert_fp32_close(out[i, 9 - len(row):], alone, 1e-4, f"row {i} alone vs in batch")


@pytest.mark.parametrize("overrides", PREFIX_CASES, ids=["no-prefix", "prefix", "prefix-projection"])
def test_cached_incremental_forward_equals_full_forward(overrides):
    model = make_model(tie_word_embeddings=False, **overrides)  # an untied random head generates varied tokens
    ids = prompt(5, 17, 42)
    tokens = greedy_generate(model, ids, 6)
    full = model(tokens).logits
    # the cached loop saw the logits of each new token's position: recompute them step by step
    out = model(ids, use_cache=True)
    steps = [out.logits[:, -1]]
    c = ids.shape[1] - 1
    for j in range(ids.shape[1], tokens.shape[1] - 1):
        pos = torch.tensor([[[3], [j + 1 - c]]])
        out = model(tokens[:, j:j + 1], position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[:, -1])
    incremental = torch.stack(steps, dim=1)
    assert_fp32_close(incremental, full[:, ids.shape[1] - 1:-1], 1e-4, "incremental vs full")
    assert torch.equal(tokens, reference.greedy(params_of(model), model.config, ids, 6))


def test_presents_hold_prefix_then_tokens():
    model = make_model(pre_seq_len=4)
    out = model(prompt(5, 6), use_cache=True)
    assert len(out.past_key_values) == 2
    k, v = out.past_key_values[1]
    assert k.shape == v.shape == (4 + 4, 1, 4, 32)
    prefix = model.transformer.get_prompt(1, "cpu", torch.float32)[1]
    assert torch.equal(k[:4], prefix[0]) and torch.equal(v[:4], prefix[1])


def test_hidden_states_and_attentions():
    model = make_model(pre_seq_len=2)
    ids = prompt(5, 6, 7)
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert out.hidden_states[0].shape == (5, 1, 128)  # sequence-first, as the original
    _, _, probs = reference.model_forward(params_of(model), model.config, ids)
    assert len(out.attentions) == 2
    for got, ref in zip(out.attentions, probs):
        assert got.shape == (1 * 4, 5, 2 + 5)  # [b * heads, sq, prefix + sk], the original's layout
        assert_fp32_close(got, ref.reshape(4, 5, 7), 1e-4, "attention probabilities")
    hidden, _, _ = reference.model_forward(params_of(model), model.config, ids)
    assert_fp32_close(out.hidden_states[-1], hidden, 1e-4, "final hidden state")
    base = model.transformer(ids, return_dict=False, use_cache=False)
    assert len(base) == 1 and torch.equal(base[0], model.transformer(ids).last_hidden_state)


def test_labels_give_shifted_fp32_cross_entropy():
    model = make_model()
    ids = prompt(5, 6, 7, 8)
    labels = torch.tensor([[-100, -100, -100, -100, 40, 41]])
    out = model(ids, labels=labels)
    ref_logits, ref_loss, _ = reference.lm_forward(params_of(model), model.config, ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(ref_logits[0, 3:5].double(), torch.tensor([40, 41]))
    assert abs(out.loss.item() - manual.item()) <= 1e-4 * abs(manual.item())
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    loss, logits = model(ids, labels=labels, return_dict=False)[:2]
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(pre_seq_len=3).train()
    model.transformer.dropout.p = 0.0
    ids, labels = prompt(5, 6, 7), torch.tensor([[-100, -100, -100, -100, 9]])

    def grads():
        model.zero_grad()
        model(ids, labels=labels).loss.backward()
        return model.transformer.prefix_encoder.embedding.weight.grad.clone()

    plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.transformer.gradient_checkpointing
    checkpointed = grads()
    assert plain.abs().max() > 0
    assert_fp32_close(checkpointed, plain, 1e-5, "checkpointed gradients")


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_attention_heads=3"):
        make_model(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="position_encoding_2d=False is not supported"):
        make_model(position_encoding_2d=False)
    with pytest.raises(ValueError, match="quantization_bit=3 is not supported"):
        make_model(quantization_bit=3)  # 4 and 8 are THUDM's weight-only INT4 / INT8 (tests/test_quant_model.py)
    with pytest.raises(ValueError, match="kernel_backend='cuda'"):
        make_model(kernel_backend="cuda")


def test_input_errors():
    model = make_model()
    with pytest.raises(ValueError, match="row 0 has no bos token"):
        model(torch.tensor([[5, 6, GMASK]]))
    with pytest.raises(ValueError, match=r"row 0 has neither \[gMASK\]"):
        model(torch.tensor([[5, 6, BOS]]))
    too_long = torch.cat((torch.full((1, 300), 5), prompt()), dim=1)
    with pytest.raises(ValueError, match="exceeds max_sequence_length=256"):
        model(too_long)
    with pytest.raises(ValueError, match="id 5000, outside the vocabulary"):
        model(torch.tensor([[5000, GMASK, BOS]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a bool tensor \[batch, 1, seq, past \+ seq\]"):
        model(prompt(5), attention_mask=torch.ones(1, 1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"a padding attention_mask must be \[batch, past \+ seq\] = \[1, 3\]"):
        model(prompt(5), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="attention_mask row 0 is not left padding"):
        model(prompt(5), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(prompt(5), position_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids holds 256, outside"):
        model(prompt(5), position_ids=torch.full((1, 2, 3), 256))
    out = model(prompt(5), use_cache=True)
    with pytest.raises(ValueError, match="position_ids are required with past_key_values"):
        model(torch.tensor([[7]]), past_key_values=out.past_key_values)
    with pytest.raises(TypeError, match="past_key_values must be a GLMKVCache or a tuple of 2"):
        model(torch.tensor([[7]]), past_key_values=out.past_key_values[:1], position_ids=torch.zeros(1, 2, 1,
                                                                                                   dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[batch, seq\] = \[1, 3\]"):
        model(prompt(5), labels=torch.zeros(1, 4, dtype=torch.long))


def test_greedy_tokens_identical_in_fp16():
    model = make_model(pre_seq_len=4, tie_word_embeddings=False).half()
    ids = prompt(5, 17, 42, 256)
    assert torch.equal(greedy_generate(model, ids, 8), reference.greedy(params_of(model), model.config, ids, 8))
