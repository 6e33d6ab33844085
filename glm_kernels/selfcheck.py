"""`glm-kernels selfcheck`: a small random ChatGLM with a P-Tuning prefix, checked against the reference.

Builds a 2-layer model (hidden 128, 4 heads, prefix of 8), runs a forward pass
and a short greedy `generate()` (preallocated cache), and reports the backend
in use, the largest difference from `glm_kernels.reference` and whether the
tokens equal the reference's own cached greedy loop.
"""
from __future__ import annotations

import torch
from . import backend as backend_mod
from . import reference
from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration

TINY = dict(vocab_size=1000, hidden_size=128, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
            max_sequence_length=256, bos_token_id=994, eos_token_id=995, mask_token_id=990, gmask_token_id=991,
            pad_token_id=3, tie_word_embeddings=False)


def tiny_config(**overrides) -> ChatGLMConfig:
    return ChatGLMConfig(**{**TINY, **overrides})


@torch.no_grad()
def run_selfcheck(seed: int = 0, new_tokens: int = 16, backend: str | None = None, dtype=torch.float32):
    torch.manual_seed(seed)
    config = tiny_config(pre_seq_len=8, kernel_backend=backend)
    model = ChatGLMForConditionalGeneration(config).to(dtype).eval()
    prompt = torch.tensor([[5, 17, 42, 256, 9, 77, config.gmask_token_id, config.bos_token_id]])
    used = backend_mod.resolve("attention", prompt.device, backend)

    logits = model(prompt).logits
    params = dict(model.state_dict())
    ref_logits, _, _ = reference.lm_forward(params, config, prompt)
    tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    ref_tokens = reference.greedy(params, config, prompt, new_tokens)
    return {
        "backend": used,
        "dtype": str(dtype).replace("torch.", ""),
        "logits_max_abs_diff": float((logits.float() - ref_logits.float()).abs().max()),
        "logits_scale": float(ref_logits.float().abs().max()),
        "tokens": tokens[0, prompt.shape[1]:].tolist(),
        "tokens_match_reference": bool(torch.equal(tokens, ref_tokens)),
    }
