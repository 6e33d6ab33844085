"""One P-Tuning v2 optimizer step: glm_kernels against the reference path, time and peak memory, same loss.

The mid-size ChatGLM of `test_decode.py` (hidden 2048, 8 layers, 16 heads of 128, vocabulary 130528) with a
prefix of 128 (`Embedding(128, 2*8*2048)`), batch 4 x 128 tokens laid out as THUDM's training rows with
`--max_source_length 64 --max_target_length 64`: 62 prompt tokens, `[gMASK] <sop>`, 63 response tokens,
`<eop>`; labels -100 over the prompt, so about half the positions carry a loss.

- glm_kernels: `ChatGLMForConditionalGeneration` in training mode (the fused LM head + cross-entropy over the
  labelled positions, logits never materialised), prefix dropout off so both paths compute the same loss.
- reference: `glm_kernels.reference.lm_forward`, the original's arithmetic on the same tensors (unfused ops,
  full `[4, 128, 130528]` logits cast to fp32).

A step is forward + backward + AdamW on the prefix encoder (the only trainable tensor). Peak memory is the
growth above what is held before the step (weights, optimizer state after a warm-up step): the resident
set's high-water mark in a fresh process on the CPU, the allocator's peak on a GPU (`benchmarks/memory.py`).
"""
import os

import pytest
import torch

from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, reference
from memory import peak_mib
from timing import measure

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(hidden_size=2048, num_layers=8, num_attention_heads=16, inner_hidden_size=8192,
              max_sequence_length=2304, pre_seq_len=128)
BATCH, SEQ, PROMPT = 4, 128, 62
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MODELS = {}
_LOSSES = {}


def model_for(dtype):
    if dtype not in _MODELS:
        _MODELS.clear()  # one model in memory at a time
        torch.manual_seed(0)
        with torch.no_grad():
            model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CONFIG)).to(dtype)
        model.transformer.prefix_encoder.float()  # THUDM's recipe: the trained prefix in fp32
        model.transformer.dropout.p = 0.0
        _MODELS[dtype] = model.to(DEVICE).train()
    return _MODELS[dtype]


def batch(cfg):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 130000, (BATCH, SEQ), generator=g)
    ids[:, PROMPT], ids[:, PROMPT + 1], ids[:, -1] = cfg.gmask_token_id, cfg.bos_token_id, cfg.eos_token_id
    labels = ids.clone()
    labels[:, :PROMPT + 1] = -100  # THUDM: -100 up to <sop>, then <sop> + response + <eop>
    return ids.to(DEVICE), labels.to(DEVICE)


def step_fn(impl, model):
    ids, labels = batch(model.config)
    prefix = model.transformer.prefix_encoder.embedding.weight
    optimizer = torch.optim.AdamW([prefix], lr=1e-2)
    if impl == "glm_kernels":
        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    else:
        params = dict(model.state_dict(keep_vars=True))  # the same tensors; the prefix requires grad

        def loss_fn():
            return reference.lm_forward(params, model.config, ids, labels=labels)[1]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    return loss_fn, step


def make_step(impl, dtype_name):
    """The optimizer step of one implementation (for the memory measurement in a fresh process)."""
    return step_fn(impl, model_for(DTYPES[dtype_name]))[1]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_ptuning_step(benchmark, impl, dtype_name):
    model = model_for(DTYPES[dtype_name])
    prefix = model.transformer.prefix_encoder.embedding.weight
    start = prefix.detach().clone()
    loss_fn, step = step_fn(impl, model)
    with torch.no_grad():
        _LOSSES[(impl, dtype_name)] = float(loss_fn())  # same initial prefix for both paths
    step()  # warm-up: allocates the optimizer state, outside the memory measurement
    measure(benchmark, f"P-Tuning step 4x128 + prefix 128, {dtype_name}", impl, step, device=DEVICE,
            dtype=dtype_name, rounds=5, warmup_rounds=0,  # steps vary by 10-30% on this machine
            peak_mib=peak_mib("test_ptune_step", "make_step", impl, dtype_name), loss=_LOSSES[(impl, dtype_name)])
    with torch.no_grad():
        prefix.copy_(start)  # the other path starts from the same prefix
    other = ("reference" if impl == "glm_kernels" else "glm_kernels", dtype_name)
    if other in _LOSSES and dtype_name == "fp32":
        ours, ref = _LOSSES[("glm_kernels", "fp32")], _LOSSES[("reference", "fp32")]
        assert abs(ours - ref) <= 1e-4 * abs(ref), (ours, ref)  # GLM_SPEC fp32 model rule
