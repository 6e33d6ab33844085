"""P-Tuning v2: what is trainable, gradients against the reference, the optimizer step, prefix dropout."""
import pytest
import torch

from conftest import make_model
from glm_kernels import reference
from helpers import assert_fp32_close

BOS, GMASK = 994, 991
IDS = torch.tensor([[5, 17, 42, GMASK, BOS, 8, 9, 10], [6, 6, 6, GMASK, BOS, 1, 2, 3]])
LABELS = torch.tensor([[-100, -100, -100, -100, -100, 9, 10, 11], [-100, -100, -100, -100, -100, 2, 3, 4]])


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_encoder_is_trainable(projection):
    model = make_model(pre_seq_len=4, prefix_projection=projection)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    assert not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_gradients_match_reference(projection):
    model = make_model(pre_seq_len=4, prefix_projection=projection)  # eval(): no dropout
    model(IDS, labels=LABELS).loss.backward()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = [k for k in params if "prefix_encoder" in k]
    for k in prefix:
        params[k].requires_grad_()
    _, loss, _ = reference.lm_forward(params, model.config, IDS, labels=LABELS)
    loss.backward()
    named = dict(model.named_parameters())
    for k in prefix:
        ref_grad = params[k].grad
        assert ref_grad.abs().max() > 0
        assert_fp32_close(named[k].grad, ref_grad, 1e-4, f"grad of {k}")  # model rule, against grad scale


def test_gradient_reaches_every_layer_key_and_value():
    model = make_model(pre_seq_len=4)
    model(IDS, labels=LABELS).loss.backward()
    L, h = model.config.num_layers, model.config.hidden_size
    grad = model.transformer.prefix_encoder.embedding.weight.grad.view(4, 2 * L, h)
    for slot in range(2 * L):  # slot 2i = layer i keys, 2i+1 = layer i values
        assert grad[:, slot].abs().max() > 0, f"no gradient for layer {slot // 2} {'kv'[slot % 2]}"


def test_one_optimizer_step_changes_only_the_prefix():
    model = make_model(pre_seq_len=4, prefix_projection=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=LABELS).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("transformer.prefix_encoder.")}


def test_prefix_dropout_only_in_training():
    model = make_model(pre_seq_len=6)
    enc = model.transformer
    clean = enc.get_prompt(2, "cpu", torch.float32)
    assert torch.equal(clean[0][0], enc.get_prompt(2, "cpu", torch.float32)[0][0])
    enc.train()
    noisy = torch.cat(enc.get_prompt(2, "cpu", torch.float32))  # per layer a [2, P, b, nh, hd] tensor
    ref = torch.cat(clean)
    dropped = noisy == 0
    assert 0.05 < dropped.float().mean() < 0.15  # p = 0.1
    assert torch.allclose(noisy[~dropped], ref[~dropped] / 0.9)


def test_fp16_model_with_fp32_prefix_encoder():
    # THUDM's ptuning script: model.half(), then prefix_encoder.float(); the prompt is cast to fp16.
    model = make_model(pre_seq_len=4).half()
    model.transformer.prefix_encoder.float()
    out = model(IDS, labels=LABELS)
    assert out.logits.dtype == torch.float16
    out.loss.backward()
    grad = model.transformer.prefix_encoder.embedding.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().max() > 0


# ------------------------------------------------------------------ fused LM head + cross-entropy in the model


def _loss_and_prefix_grads(model, **kwargs):
    model.zero_grad()
    out = model(IDS, labels=LABELS, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("projection", [False, True])
def test_fused_loss_in_training_equals_the_unfused_loss_and_gradients(projection):
    model = make_model(pre_seq_len=4, prefix_projection=projection).train()
    model.transformer.dropout.p = 0.0  # the two passes must see the same prefix
    fused, fused_grads = _loss_and_prefix_grads(model)
    assert fused.logits is None  # training with labels: the [b, s, vocab] logits are never built
    full, full_grads = _loss_and_prefix_grads(model, skip_logits=False)
    assert full.logits.shape == (2, 8, model.config.vocab_size)
    assert_fp32_close(fused.loss, full.loss, 1e-4, "fused loss")  # model rule
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0
        assert_fp32_close(fused_grads[name], grad, 1e-4, f"grad of {name}")  # model rule, gradient scale


def test_eval_mode_keeps_the_logits_and_skip_logits_can_be_forced():
    model = make_model(pre_seq_len=4)
    out = model(IDS, labels=LABELS)
    assert out.logits is not None
    forced = model(IDS, labels=LABELS, skip_logits=True)
    assert forced.logits is None
    assert_fp32_close(forced.loss, out.loss, 1e-4, "loss")  # model rule
    with pytest.raises(ValueError, match="needs labels"):
        model(IDS, skip_logits=True)


@pytest.mark.parametrize("skip_logits", [True, False])
def test_num_items_in_batch_divides_the_summed_loss(skip_logits):
    # transformers' Trainer passes the labelled-token count of the whole accumulated batch
    model = make_model(pre_seq_len=4)
    mean = model(IDS, labels=LABELS, skip_logits=skip_logits).loss
    tokens = int((LABELS[:, 1:] != -100).sum())
    summed = model(IDS, labels=LABELS, skip_logits=skip_logits, num_items_in_batch=torch.tensor(4 * tokens)).loss
    assert_fp32_close(summed, mean / 4, 1e-4, "loss / num_items_in_batch")  # model rule


def test_all_labels_ignored_gives_nan_like_the_original():
    model = make_model(pre_seq_len=4)
    ignored = torch.full_like(LABELS, -100)
    assert torch.isnan(model(IDS, labels=ignored, skip_logits=True).loss)
    assert torch.isnan(model(IDS, labels=ignored, skip_logits=False).loss)
