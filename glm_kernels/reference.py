"""Pure-PyTorch reference of ChatGLM-6B (v1): the oracle every kernel and module is checked against.

It follows `GLM_SPEC.md` (and THUDM's `modeling_chatglm.py`) literally, one
unfused op at a time: fp16-rounded rotary frequencies and tables built in the
model dtype, the per-head `[q | k | v]` split, `rotate_half`, the layer
coefficient `i + 1`, the finite `-10000` mask fill, fp32 softmax, tanh GeLU,
the `alpha = sqrt(56)` residuals on the normalised input.

Everything works on a plain state dict with the original parameter names
(`transformer.layers.{i}.attention.query_key_value.weight`, ...), so the
reference shares no code and no module structure with `glm_kernels.modeling`.

The one documented departure from the original: a bf16 model gets rotary
tables computed in fp32 and rounded to bf16 (the original computes positions
in bf16, exact only up to 256). See `glm_kernels/ops/rotary.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The original block's `num_layers` argument defaults to 28 and the model never
# passes `config.num_layers`: every config uses sqrt(2 * 28).
ALPHA = (2 * 28) ** 0.5


def gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotary_tables(n, dim, dtype):
    """cos, sin `[n, dim]` for positions 0..n-1, as `RotaryEmbedding` builds them."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
    work = torch.float32 if dtype == torch.bfloat16 else dtype
    inv_freq = inv_freq.to(work)
    t = torch.arange(n, dtype=work)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin, position_id):
    # position_id [sq, b]; q, k [sq, b, nh, d]; cos, sin [n, d] -> [sq, b, 1, d]
    cos, sin = F.embedding(position_id, cos).unsqueeze(2), F.embedding(position_id, sin).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_2d(q, k, position_ids):
    """2D rotary: first halves of q, k by positions, second halves by block positions. `[s, b, nh, hd]`."""
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    cos, sin = rotary_tables(int(position_ids.max()) + 1, q.shape[-1] // 2, q.dtype)
    q1, k1 = apply_rotary(q1, k1, cos, sin, position_ids[:, 0, :].t())
    q2, k2 = apply_rotary(q2, k2, cos, sin, position_ids[:, 1, :].t())
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


def attention_core(q, k, v, mask, layer_id):
    """q `[sq, b, nh, hd]`, k/v `[sk, b, nh, hd]`, mask bool `[b, 1, sq, sk]` or None.

    Returns (context `[sq, b, nh*hd]`, probs `[b, nh, sq, sk]`).
    """
    sq, b, nh, hd = q.shape
    sk = k.shape[0]
    coeff = float(layer_id + 1)
    q = q / (math.sqrt(hd) * coeff)
    scores = torch.bmm(q.reshape(sq, b * nh, hd).transpose(0, 1),
                       k.reshape(sk, b * nh, hd).transpose(0, 1).transpose(1, 2))
    scores = scores.view(b, nh, sq, sk)
    if mask is not None:  # the original skips an all-False mask: filling nothing is the same
        scores = scores.masked_fill(mask, -10000.0)
    probs = F.softmax(scores.float() * coeff, dim=-1).to(q.dtype)
    ctx = torch.bmm(probs.view(b * nh, sq, sk), v.reshape(sk, b * nh, hd).transpose(0, 1))
    return ctx.view(b, nh, sq, hd).permute(2, 0, 1, 3).reshape(sq, b, nh * hd), probs


def self_attention(p, pre, x, position_ids, mask, layer_id, layer_past, num_heads):
    """One layer's attention. x `[s, b, h]`; returns (output, (k, v), probs `[b, nh, sq, sk]`)."""
    sq, b, h = x.shape
    hd = h // num_heads
    mixed = F.linear(x, p[pre + "query_key_value.weight"], p[pre + "query_key_value.bias"])
    q, k, v = mixed.view(sq, b, num_heads, 3 * hd).split(hd, dim=-1)
    q, k = rotary_2d(q, k, position_ids)
    if layer_past is not None:
        k = torch.cat((layer_past[0], k), dim=0)
        v = torch.cat((layer_past[1], v), dim=0)
    ctx, probs = attention_core(q, k, v, mask, layer_id)
    out = F.linear(ctx, p[pre + "dense.weight"], p[pre + "dense.bias"])
    return out, (k, v), probs


def block(p, pre, x, position_ids, mask, layer_id, layer_past, num_heads, eps):
    """One GLM block. Returns (output `[s, b, h]`, (k, v), probs)."""
    h = x.shape[-1]
    a = F.layer_norm(x, (h,), p[pre + "input_layernorm.weight"], p[pre + "input_layernorm.bias"], eps)
    attn, present, probs = self_attention(p, pre + "attention.", a, position_ids, mask, layer_id, layer_past,
                                          num_heads)
    hidden = a * ALPHA + attn
    m = F.layer_norm(hidden, (h,), p[pre + "post_attention_layernorm.weight"],
                     p[pre + "post_attention_layernorm.bias"], eps)
    inner = gelu(F.linear(m, p[pre + "mlp.dense_h_to_4h.weight"], p[pre + "mlp.dense_h_to_4h.bias"]))
    mlp = F.linear(inner, p[pre + "mlp.dense_4h_to_h.weight"], p[pre + "mlp.dense_4h_to_h.bias"])
    return m * ALPHA + mlp, present, probs


class GLMBlock(nn.Module):
    """Reference GLM block as a module, with the original parameter names."""

    def __init__(self, hidden_size, num_heads, inner_hidden_size, layer_id, eps=1e-5):
        super().__init__()
        self.layer_id, self.num_heads, self.eps = layer_id, num_heads, eps
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(hidden_size, 3 * hidden_size)
        self.attention.dense = nn.Linear(hidden_size, hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(hidden_size, inner_hidden_size)
        self.mlp.dense_4h_to_h = nn.Linear(inner_hidden_size, hidden_size)

    def forward(self, x, position_ids, mask=None, layer_past=None):
        return block(dict(self.named_parameters()), "", x, position_ids, mask, self.layer_id, layer_past,
                     self.num_heads, self.eps)


# ---------------------------------------------------------------- inputs


def get_masks(input_ids, bos_token_id):
    """Bool `[b, 1, s, s]`, True = may not attend: context bidirectional, the rest causal."""
    batch_size, seq_length = input_ids.shape
    context_lengths = [seq.tolist().index(bos_token_id) for seq in input_ids]
    mask = torch.ones((batch_size, seq_length, seq_length))
    mask.tril_()
    for i, context_length in enumerate(context_lengths):
        mask[i, :, :context_length] = 1
    return (mask.unsqueeze(1) < 0.5).bool()


def get_position_ids(input_ids, bos_token_id, mask_token_id, gmask_token_id):
    """`[b, 2, s]`: positions (frozen at the mask position after the context) and block positions."""
    batch_size, seq_length = input_ids.shape
    rows = []
    for seq in input_ids.tolist():
        context_length = seq.index(bos_token_id)
        mask_token = gmask_token_id if gmask_token_id in seq else mask_token_id
        mask_position = seq.index(mask_token)
        position_ids = torch.arange(seq_length)
        position_ids[context_length:] = mask_position
        block_position_ids = torch.cat((torch.zeros(context_length, dtype=torch.long),
                                        torch.arange(seq_length - context_length) + 1))
        rows.append(torch.stack((position_ids, block_position_ids)))
    return torch.stack(rows)


def get_prompt(p, config, batch_size, dtype):
    """P-Tuning v2 prefix as per-layer (key, value) pairs, each `[P, b, nh, hd]` (no dropout)."""
    P, L, nh = config.pre_seq_len, config.num_layers, config.num_attention_heads
    tokens = torch.arange(P).unsqueeze(0).expand(batch_size, -1)
    x = F.embedding(tokens, p["transformer.prefix_encoder.embedding.weight"])
    if config.prefix_projection:
        x = F.linear(x, p["transformer.prefix_encoder.trans.0.weight"], p["transformer.prefix_encoder.trans.0.bias"])
        x = F.linear(torch.tanh(x), p["transformer.prefix_encoder.trans.2.weight"],
                     p["transformer.prefix_encoder.trans.2.bias"])
    x = x.to(dtype).view(batch_size, P, 2 * L, nh, config.hidden_size // nh)
    kv = x.permute(2, 1, 0, 3, 4).split(2)
    return [(pair[0], pair[1]) for pair in kv]


# ---------------------------------------------------------------- whole model


def model_forward(p, config, input_ids, position_ids=None, attention_mask=None, past_key_values=None):
    """ChatGLMModel forward. Returns (hidden `[s, b, h]` after final LayerNorm, presents, probs per layer)."""
    b, s = input_ids.shape
    x = F.embedding(input_ids, p["transformer.word_embeddings.weight"])
    if past_key_values is None:
        if config.pre_seq_len is not None:
            past_key_values = get_prompt(p, config, b, x.dtype)
        else:
            past_key_values = [None] * config.num_layers
        if attention_mask is None:
            attention_mask = get_masks(input_ids, config.bos_token_id)
        if position_ids is None:
            position_ids = get_position_ids(input_ids, config.bos_token_id, config.mask_token_id,
                                            config.gmask_token_id)
    if config.pre_seq_len is not None and attention_mask is not None:
        prefix = torch.zeros(b, 1, s, config.pre_seq_len, dtype=torch.bool)
        attention_mask = torch.cat((prefix, attention_mask), dim=3)
    x = x.transpose(0, 1)
    presents, all_probs = [], []
    for i in range(config.num_layers):
        x, present, probs = block(p, f"transformer.layers.{i}.", x, position_ids, attention_mask, i,
                                  past_key_values[i], config.num_attention_heads, config.layernorm_epsilon)
        presents.append(present)
        all_probs.append(probs)
    h = x.shape[-1]
    x = F.layer_norm(x, (h,), p["transformer.final_layernorm.weight"], p["transformer.final_layernorm.bias"],
                     config.layernorm_epsilon)
    return x, presents, all_probs


def lm_forward(p, config, input_ids, labels=None, **kwargs):
    """ChatGLMForConditionalGeneration forward. Returns (logits `[b, s, V]`, loss or None, presents)."""
    hidden, presents, _ = model_forward(p, config, input_ids, **kwargs)
    lm_head = p.get("lm_head.weight", p["transformer.word_embeddings.weight"])
    logits = F.linear(hidden, lm_head).permute(1, 0, 2)
    loss = None
    if labels is not None:
        shift_logits = logits.float()[:, :-1, :]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    return logits, loss, presents


def greedy(p, config, input_ids, max_new_tokens):
    """Greedy decoding with a growing cache, as the original's generation loop feeds the model."""
    mask_token_id, gmask_token_id, bos = config.mask_token_id, config.gmask_token_id, config.bos_token_id
    logits, _, past = lm_forward(p, config, input_ids)
    tokens = input_ids
    for _ in range(max_new_tokens):
        next_token = logits[:, -1, :].float().argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, next_token), dim=1)
        if tokens.shape[1] - input_ids.shape[1] == max_new_tokens:
            break
        seqs = tokens.tolist()
        position_ids = []
        for seq in seqs:
            mask_token = gmask_token_id if gmask_token_id in seq else mask_token_id
            position_ids.append([seq.index(mask_token), len(seq) - seq.index(bos)])
        position_ids = torch.tensor(position_ids).unsqueeze(-1)
        logits, _, past = lm_forward(p, config, next_token, position_ids=position_ids, past_key_values=past)
    return tokens
