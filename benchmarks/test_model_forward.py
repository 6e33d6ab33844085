"""Whole-model forward and P-Tuning forward+backward, glm_kernels (CPU path) vs the reference."""
import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, reference

# 6B head shape (head dim 128, 2D rotary) scaled to what a 2-core CPU runs in a benchmark.
CONFIG = dict(vocab_size=8192, hidden_size=1024, num_layers=4, num_attention_heads=8, inner_hidden_size=4096,
              max_sequence_length=2048, bos_token_id=8004, eos_token_id=8005, mask_token_id=8000,
              gmask_token_id=8001)
SEQ = 256


def _model(dtype, pre_seq_len=None):
    torch.manual_seed(0)
    cfg = ChatGLMConfig(**CONFIG, pre_seq_len=pre_seq_len)
    return ChatGLMForConditionalGeneration(cfg).to(dtype).eval()


def _ids(cfg):
    ids = torch.randint(0, 7990, (1, SEQ))
    ids[0, SEQ // 2] = cfg.gmask_token_id
    ids[0, SEQ // 2 + 1] = cfg.bos_token_id
    return ids


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_forward(benchmark, impl, dtype):
    model = _model(dtype)
    ids = _ids(model.config)
    params = dict(model.state_dict())
    benchmark.group = f"forward {SEQ} tokens {str(dtype)[6:]}"
    benchmark.extra_info["impl"] = impl
    with torch.no_grad():
        if impl == "glm_kernels":
            benchmark(lambda: model(ids, use_cache=False))
        else:
            benchmark(lambda: reference.lm_forward(params, model.config, ids))


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_ptuning_forward_backward(benchmark, impl):
    model = _model(torch.float32, pre_seq_len=32)
    ids = _ids(model.config)
    labels = ids.clone()
    params = dict(model.state_dict())
    prefix_keys = [k for k in params if "prefix_encoder" in k]
    benchmark.group = f"p-tuning fwd+bwd {SEQ} tokens fp32"
    benchmark.extra_info["impl"] = impl

    def ours():
        model.zero_grad()
        model(ids, labels=labels).loss.backward()

    def ref():
        p = dict(params)
        for k in prefix_keys:
            p[k] = params[k].detach().requires_grad_()
        reference.lm_forward(p, model.config, ids, labels=labels)[1].backward()

    benchmark.pedantic(ours if impl == "glm_kernels" else ref, rounds=3, iterations=1, warmup_rounds=1)
