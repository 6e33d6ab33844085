"""Whole-model forward and P-Tuning forward+backward, glm_kernels vs the reference (on a GPU when there is one)."""
import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, reference
from timing import measure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# 6B head shape (head dim 128, 2D rotary) scaled to what a 2-core CPU runs in a benchmark.
CONFIG = dict(vocab_size=8192, hidden_size=1024, num_layers=4, num_attention_heads=8, inner_hidden_size=4096,
              max_sequence_length=2048, bos_token_id=8004, eos_token_id=8005, mask_token_id=8000,
              gmask_token_id=8001)
SEQ = 256


def _model(dtype, pre_seq_len=None):
    torch.manual_seed(0)
    cfg = ChatGLMConfig(**CONFIG, pre_seq_len=pre_seq_len)
    return ChatGLMForConditionalGeneration(cfg).to(dtype).to(DEVICE).eval()


def _ids(cfg):
    ids = torch.randint(0, 7990, (1, SEQ))
    ids[0, SEQ // 2] = cfg.gmask_token_id
    ids[0, SEQ // 2 + 1] = cfg.bos_token_id
    return ids.to(DEVICE)


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_forward(benchmark, impl, dtype):
    model = _model(dtype)
    ids = _ids(model.config)
    params = dict(model.state_dict())
    if impl == "glm_kernels":
        def run():
            return model(ids, use_cache=False)
    else:
        def run():
            return reference.lm_forward(params, model.config, ids)
    with torch.no_grad():
        measure(benchmark, f"forward {SEQ} tokens {str(dtype)[6:]}", impl, run, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_ptuning_forward_backward(benchmark, impl):
    model = _model(torch.float32, pre_seq_len=32)
    ids = _ids(model.config)
    labels = ids.clone()
    params = dict(model.state_dict())
    prefix_keys = [k for k in params if "prefix_encoder" in k]

    def ours():
        model.zero_grad()
        model(ids, labels=labels).loss.backward()

    def ref():
        p = dict(params)
        for k in prefix_keys:
            p[k] = params[k].detach().requires_grad_()
        reference.lm_forward(p, model.config, ids, labels=labels)[1].backward()

    measure(benchmark, f"p-tuning fwd+bwd {SEQ} tokens fp32", impl, ours if impl == "glm_kernels" else ref,
            device=DEVICE, dtype=torch.float32, rounds=3)
