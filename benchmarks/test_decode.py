"""Decode ms/token at context 128, 1024 and 2048, and prefill of 1024 tokens (on a GPU when there is one).

A mid-size random ChatGLM (hidden 2048, 8 layers, 16 heads of 128, vocabulary
130528), glm_kernels (preallocated cache, fused ops API) against the
reference path (the original's tuple cache: `torch.cat` of the past in every
layer at every token), fp32 and bf16. The cache is filled with random keys and
values to the context length (decode cost does not depend on their values).

Decode reads every weight once per token, so the time to read those weights
is the floor: measured on the model's own tensors with
`timing.read_floor_seconds` just before and after each decode case (the
faster of the two) and recorded with the bandwidth it implies (the table's
last columns).
"""
import os

import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, reference
from glm_kernels.cache import GLMKVCache
from timing import measure, read_floor_around

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(hidden_size=2048, num_layers=8, num_attention_heads=16, inner_hidden_size=8192,
              max_sequence_length=2304)
CONTEXTS = [128, 1024, 2048]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MODELS = {}


def model_for(dtype):
    if dtype not in _MODELS:
        torch.manual_seed(0)
        with torch.no_grad():
            model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CONFIG)).to(dtype).to(DEVICE).eval()
        _MODELS.clear()  # one model in memory at a time
        _MODELS[dtype] = model
    return _MODELS[dtype]


def weights_per_token(model) -> list:
    """Every layer weight, the final LayerNorm and the LM head (= the tied embedding) are read once."""
    return [p for n, p in model.named_parameters() if ".layers." in n or "final_layernorm" in n] + [
        model.lm_head.weight]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_decode_token(benchmark, impl, dtype_name, context):
    dtype = DTYPES[dtype_name]
    model = model_for(dtype)
    cfg = model.config
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    token = torch.tensor([[5]], device=DEVICE)
    position_ids = torch.tensor([[[context - 5], [5]]], device=DEVICE)
    with torch.no_grad(), read_floor_around(benchmark, weights_per_token(model), DEVICE):
        if impl == "glm_kernels":
            cache = GLMKVCache(cfg, batch_size=1, max_length=context + 64, dtype=dtype, device=DEVICE)
            prompt = torch.tensor([[5, 6, cfg.gmask_token_id, cfg.bos_token_id]], device=DEVICE)
            model(prompt, past_key_values=cache)  # the first forward sets what the cache keeps of the rows
            for layer in cache.layers:
                layer.keys[:, :, :context].normal_()
                layer.values[:, :, :context].normal_()
            cache.filled = context

            def step():
                model(token, position_ids=position_ids, past_key_values=cache)
                cache.filled -= 1  # keep the context fixed across rounds
        else:
            params = dict(model.state_dict())
            past = [tuple(torch.randn(context, 1, nh, hd, dtype=dtype, device=DEVICE) for _ in range(2))
                    for _ in range(cfg.num_layers)]

            def step():
                reference.lm_forward(params, cfg, token, position_ids=position_ids, past_key_values=past)

        measure(benchmark, f"decode 1 token at context {context} {dtype_name}", impl, step, device=DEVICE,
                dtype=dtype, rounds=5)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_prefill_1024(benchmark, impl, dtype_name):
    dtype = DTYPES[dtype_name]
    model = model_for(dtype)
    cfg = model.config
    ids = torch.randint(0, 130000, (1, 1024))
    ids[0, 1000], ids[0, 1001] = cfg.gmask_token_id, cfg.bos_token_id
    ids = ids.to(DEVICE)
    with torch.no_grad():
        if impl == "glm_kernels":
            def run():
                model(ids, past_key_values=GLMKVCache(cfg, 1, 1100, dtype=dtype, device=DEVICE), logits_to_keep=1)
        else:
            params = dict(model.state_dict())

            def run():
                reference.lm_forward(params, cfg, ids)
        measure(benchmark, f"prefill 1024 tokens {dtype_name}", impl, run, device=DEVICE, dtype=dtype, rounds=2,
                warmup_rounds=0)
