"""The whole model on the Triton kernels (interpreter) against the reference: logits and prefix gradients."""
import pytest
import torch

from conftest import make_model
from glm_kernels import reference
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close, greedy_generate
from test_model import left_padded_batch

BOS, GMASK = 994, 991
IDS = torch.tensor([[5, 17, 42, 256, GMASK, BOS, 8, 9, 11], [7, 7, 8, 9, 10, GMASK, BOS, 1, 2]])
LABELS = torch.tensor([[-100] * 6 + [9, 11, 12], [-100] * 7 + [2, 3]])


def params_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


CASES = [dict(), dict(pre_seq_len=4), dict(pre_seq_len=3, prefix_projection=True)]


@pytest.mark.parametrize("overrides", CASES, ids=["no-prefix", "prefix", "prefix-projection"])
def test_logits_and_prefix_gradients_fp32(overrides):
    model = make_model(kernel_backend="triton", **overrides)
    out = model(IDS, labels=LABELS)
    params = params_of(model)
    prefix_keys = [k for k in params if "prefix_encoder" in k]
    for k in prefix_keys:
        params[k] = params[k].clone().requires_grad_()
    ref_logits, ref_loss, _ = reference.lm_forward(params, model.config, IDS, labels=LABELS)
    assert_fp32_close(out.logits, ref_logits, 1e-4, "triton model logits")  # model rule
    if prefix_keys:
        out.loss.backward()
        ref_loss.backward()
        named = dict(model.named_parameters())
        for k in prefix_keys:
            assert_fp32_close(named[k].grad, params[k].grad, 1e-4, f"triton grad of {k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    model32 = make_model(pre_seq_len=4)
    ref32 = reference.lm_forward(params_of(model32), model32.config, IDS)[0]
    model = model32.to(dtype)
    reflow = reference.lm_forward(params_of(model), model.config, IDS)[0]
    model.config.kernel_backend = "triton"
    assert_lowp_close(model(IDS).logits, reflow, ref32, f"triton model {dtype}")


def test_greedy_tokens_fp16_identical_to_reference():
    model = make_model(pre_seq_len=4, tie_word_embeddings=False, kernel_backend="triton").half()
    ids = IDS[:1, :6]
    params = params_of(model)
    assert torch.equal(greedy_generate(model, ids, 6), reference.greedy(params, model.config, ids, 6))


def test_left_padded_batch_and_attentions():
    model = make_model(pre_seq_len=2, kernel_backend="triton")
    rows = [[5, 6, 7, GMASK, BOS, 8, 9], [11, GMASK, BOS], [12, 13, 14, 15, GMASK, BOS, 16]]
    ids, mask, pos = left_padded_batch(rows, 9)
    out = model(ids, attention_mask=mask, position_ids=pos, output_attentions=True)
    ref, _, _ = reference.lm_forward(params_of(model), model.config, ids, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(out.logits).all()
    assert_fp32_close(out.logits, ref, 1e-4, "left-padded triton logits")
    _, _, probs = reference.model_forward(params_of(model), model.config, ids, attention_mask=mask,
                                          position_ids=pos)
    for got, want in zip(out.attentions, probs):
        assert_fp32_close(got, want.reshape(got.shape), 1e-4, "triton attention probabilities")


def test_every_op_runs_on_its_kernel():
    model = make_model(pre_seq_len=2, kernel_backend="triton")
    with count_traffic() as counts:
        model(IDS, labels=LABELS).loss.backward()
    launched = set(counts)
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rope_qkv_kernel", "_ln_fwd_kernel",
                   "_ln_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel"):
        assert kernel in launched, f"{kernel} never launched: {sorted(launched)}"
    # nothing [b, heads, sq, sk]-sized: the softmax kernel only runs for output_attentions
    assert not any("softmax" in name for name in launched)
    with torch.no_grad(), count_traffic() as counts:
        out = model(torch.tensor([[5, 17, 42, GMASK, BOS], [7, 8, 9, GMASK, BOS]]), use_cache=True)
        pos = torch.tensor([[[3], [2]], [[3], [2]]])  # the next token: mask position, block position 2
        model(torch.tensor([[3], [4]]), position_ids=pos, past_key_values=out.past_key_values)
    assert "_attn_decode_partial" in counts and "_attn_decode_combine" in counts
