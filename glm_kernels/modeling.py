"""ChatGLM-6B (v1) with P-Tuning v2, drop-in for THUDM's `modeling_chatglm.py`.

Same classes, parameter names, inputs and outputs as the original; the
attention math runs through `glm_kernels.ops` (torch or Triton, chosen in
`glm_kernels.backend`). Activations are sequence-first `[s, b, h]`; logits are
batch-first `[b, s, vocab]`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import inputs as glm_inputs
from . import ops
from .cache import GLMKVCache
from .configuration import ChatGLMConfig
from .generation import ChatGLMGenerationMixin
from .ops.mask import GLMMask
from .ops.rotary import inv_freq
from .placement import execution_device
from .step_plan import StepPlan, global_forward_hooks
from .quant.layout import check_bits
from .quant.modules import (BLOCK_LINEARS, QuantizedEmbedding, QuantizedLinear, embedding_parts, is_quantized, linear,
                            linear_parts, quantized_modules)

logger = logging.getLogger(__name__)

# THUDM's quantize(**kwargs) options for its own CPU kernels: accepted, without effect here.
THUDM_QUANTIZE_ARGS = {"use_quantization_cache", "parallel_num", "kernel_file", "cpu_kernel_code",
                       "compile_parallel_kernel", "quantized_weight_path"}

# The original GLMBlock's `num_layers` argument defaults to 28 and ChatGLMModel
# never passes config.num_layers: alpha is sqrt(56) for every config.
ALPHA = math.sqrt(2 * 28)


def make_linear(config: ChatGLMConfig, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """One of the block's linears: `nn.Linear`, or THUDM's `QuantizedLinear` when `config.quantization_bit` is set."""
    if config.quantization_bit:
        return QuantizedLinear(in_features, out_features, config.quantization_bit, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix encoder: `[b, P]` prefix token ids -> `[b, P, 2 * num_layers * hidden]`.

    Without `prefix_projection` an `Embedding(P, 2*L*h)`; with it an
    `Embedding(P, h)` followed by `Linear(h, h) -> tanh -> Linear(h, 2*L*h)`.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        self.num_layers, self.num_attention_heads = config.num_layers, config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        width = 2 * config.num_layers * config.hidden_size
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, width),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.prefix_projection else x

    def key_values(self, batch_size: int, device, dtype, dropout=None):
        """The prefix as attention keys and values: per layer a `[2, P, b, nh, hd]` tensor (key, value), in
        `dtype` on `device`, what `GLMKVCache.write_prefix` takes. `dropout`: applied to the encoder output
        (the model's, while training)."""
        P = self.embedding.num_embeddings
        tokens = torch.arange(P, device=execution_device(self)).unsqueeze(0).expand(batch_size, -1)
        past = self(tokens).to(device=device, dtype=dtype)
        past = past.view(batch_size, P, self.num_layers * 2, self.num_attention_heads, self.head_dim)
        if dropout is not None:
            past = dropout(past)
        return past.permute([2, 1, 0, 3, 4]).split(2)


class RotaryEmbedding(nn.Module):
    """Holds the original's `inv_freq` buffer so state dicts keep the same keys.

    Loading ignores the buffer, as the original does (the released checkpoint
    carries it for every layer); the tables themselves come from
    `glm_kernels.ops.rotary_table`.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", inv_freq(dim))

    def reset_parameters(self) -> None:
        self.inv_freq.copy_(inv_freq(self.dim))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass


def hooked(module: nn.Module) -> bool:
    """Whether calling `module` does more than its forward: its own forward hooks, or a forward replaced on the
    instance (accelerate's hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast))


def step_output(logits, past) -> CausalLMOutputWithPast:
    """`CausalLMOutputWithPast(logits=logits, past_key_values=past)` without its dataclass machinery, which costs
    ~0.1 ms of a decode step once the weights have swept the caches (a `fields()` call for every attribute set):
    the same object, every field an attribute, those not None also items in field order
    (tests/test_step_infer.py compares it with the constructor's)."""
    out = CausalLMOutputWithPast.__new__(CausalLMOutputWithPast)
    OrderedDict.__init__(out)
    values = {"logits": logits, "past_key_values": past}
    for name in _OUTPUT_FIELDS:
        value = values.get(name)
        object.__setattr__(out, name, value)
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
    return out


class CacheSlot(NamedTuple):
    """Layer `layer_idx` of a `GLMKVCache`, handed to the attention in place of a `(key, value)` past."""

    cache: GLMKVCache
    layer_idx: int


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        h = config.hidden_size
        self.layer_id = layer_id
        self.num_attention_heads = config.num_attention_heads
        self.hidden_size_per_attention_head = h // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(self.hidden_size_per_attention_head // 2)
        self.query_key_value = make_linear(config, h, 3 * h)
        self.dense = make_linear(config, h, h)

    def forward(self, hidden_states, position_ids, attention_mask, rotary, layer_past=None, use_cache=False,
                output_attentions=False, backend=None):
        mixed = linear(self.query_key_value, hidden_states, backend)
        if isinstance(layer_past, CacheSlot):
            # New keys and values go straight into the preallocated cache; attention reads it as a view.
            k_out, v_out, k_all, v_all = layer_past.cache.slots(layer_past.layer_idx, hidden_states.shape[0])
            q, _, _ = ops.rope_qkv(mixed, position_ids, rotary[0], rotary[1], self.num_attention_heads, k_out, v_out,
                                   backend=backend)
            context, probs = ops.glm_attention(q, k_all, v_all, self.layer_id, attention_mask, output_attentions,
                                               backend=backend)
            return linear(self.dense, context, backend), None, probs
        q, k, v = ops.rope_qkv(mixed, position_ids, rotary[0], rotary[1], self.num_attention_heads, backend=backend)
        past_k, past_v = layer_past if layer_past is not None else (None, None)
        context, probs = ops.glm_attention(q, k, v, self.layer_id, attention_mask, output_attentions, past_k, past_v,
                                           backend=backend)
        present = None
        if use_cache:
            present = (k, v) if past_k is None else (torch.cat((past_k, k), dim=0), torch.cat((past_v, v), dim=0))
        return linear(self.dense, context, backend), present, probs


class MLP(nn.Module):
    """`dense_4h_to_h(gelu(dense_h_to_4h(x)))` (the original calls this class GLU)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = make_linear(config, config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = make_linear(config, config.inner_hidden_size, config.hidden_size)

    def forward(self, x, backend=None):
        # the bias joins the GeLU (one fused op); the product is bias-free for either module type
        inner = ops.bias_gelu(linear(self.dense_h_to_4h, x, backend, bias=False), self.dense_h_to_4h.bias,
                              backend=backend)
        return linear(self.dense_4h_to_h, inner, backend)


class GLMBlock(nn.Module):
    """`a = LN_in(x); m = LN_post(a*alpha + attn(a)); out = m*alpha + mlp(m)`.

    The output is returned as the pair `(m, mlp(m))` and never materialised:
    the next block (or the final LayerNorm) joins it inside its residual
    LayerNorm. Called with `residual=r`, the block's input is `x = hidden*alpha + r`.
    """

    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=self.eps)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=self.eps)
        self.mlp = MLP(config)

    def infer_parts(self):
        """`(eps, norms, linears)` as `ops.block_infer` / `ops.layers_infer` take them, read afresh (the
        parameters straight from `_parameters`: this runs for every block of every decode step); or None when
        calling a submodule would do more than its forward (a forward hook of torch, the submodule's or a global
        one, or a replaced forward): the one-call forms read the weights without calling the submodules."""
        modules = self._modules
        ln_in, ln_post, attn_mod, mlp_mod = (modules["input_layernorm"], modules["post_attention_layernorm"],
                                             modules["attention"], modules["mlp"])
        attn, mlp = attn_mod._modules, mlp_mod._modules
        if global_forward_hooks() or any(hooked(m) for m in (ln_in, ln_post, attn_mod, mlp_mod, *attn.values(),
                                                              *mlp.values())):
            return None
        p_in, p_post = ln_in._parameters, ln_post._parameters
        linears = [linear_parts(attn["query_key_value"]), linear_parts(attn["dense"]),
                   linear_parts(mlp["dense_h_to_4h"]), linear_parts(mlp["dense_4h_to_h"])]
        return self.eps, (p_in["weight"], p_in["bias"], p_post["weight"], p_post["bias"]), linears

    def forward(self, hidden_states, position_ids, attention_mask, rotary, layer_past=None, use_cache=False,
                output_attentions=False, backend=None, residual=None):
        ln_in, ln_post = self.input_layernorm, self.post_attention_layernorm
        if isinstance(layer_past, CacheSlot) and not output_attentions and hidden_states.device.type == "cpu":
            # CPU decoding: the same operators in one C++ call when the call is one it takes (ops/block.py)
            parts = self.infer_parts()
            fused = None if parts is None else ops.block_infer(
                hidden_states, residual, ALPHA, *parts, position_ids, rotary, self.attention.num_attention_heads,
                layer_past.cache.slots(layer_past.layer_idx, hidden_states.shape[0]), attention_mask, backend)
            if fused is not None:
                return fused[0], fused[1], None, None
        if residual is None:
            a = ops.layer_norm(hidden_states, ln_in.weight, ln_in.bias, self.eps, backend=backend)
        else:
            a = ops.residual_layer_norm(hidden_states, residual, ALPHA, ln_in.weight, ln_in.bias, self.eps,
                                        backend=backend)
        attn, present, probs = self.attention(a, position_ids, attention_mask, rotary, layer_past, use_cache,
                                              output_attentions, backend)
        m = ops.residual_layer_norm(a, attn, ALPHA, ln_post.weight, ln_post.bias, self.eps, backend=backend)
        return m, self.mlp(m, backend), present, probs


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Base class: config, loading (`from_pretrained`, P-Tuning checkpoints), masks and positions."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (the fp16 `weight_scale` of quantized modules, fp16 in every model, aside)."""
        for name, param in self.named_parameters():
            if param.is_floating_point() and not name.endswith("weight_scale"):
                return param.dtype
        return torch.get_default_dtype()

    def _init_weights(self, module: nn.Module) -> None:
        # Modules keep PyTorch's default initialisation; checkpoints overwrite it.
        return

    def get_masks(self, input_ids, device=None):
        """Bool `[b, 1, s, s]` GLM mask (True = may not attend), as the original's `get_masks`."""
        return glm_inputs.get_masks(input_ids, self.config.bos_token_id).to(device or input_ids.device)

    def get_position_ids(self, input_ids, mask_positions=None, device=None, use_gmasks=None):
        """`[b, 2, s]` positions and block positions, as the original's `get_position_ids`.

        `mask_positions` (one index per row) overrides the [gMASK]/[MASK] lookup.
        """
        cfg = self.config
        position_ids = glm_inputs.get_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                   cfg.gmask_token_id, mask_positions)
        return position_ids.to(device or input_ids.device)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, torch_dtype=None,
                        dtype=None, ptuning_checkpoint=None, device=None, strict=True, **kwargs):
        """Load an original ChatGLM-6B checkpoint directory (see `glm_kernels.loading.from_pretrained`)."""
        from .loading import from_pretrained

        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments, got {model_args}")
        return from_pretrained(cls, pretrained_model_name_or_path, config=config,
                               dtype=dtype if dtype is not None else torch_dtype,
                               ptuning_checkpoint=ptuning_checkpoint, device=device, strict=strict, **kwargs)

    def quantize(self, bits: int, empty_init: bool = False, quantize_embeddings: bool = False, **kwargs):
        """THUDM's `model.quantize(bits)`: weight-only INT8/INT4 of the four linears of every block, in place.

        Args:
            bits: 8 or 4 (0 returns the model unchanged, as the original does).
            empty_init: allocate the quantized weights without computing them
                (a quantized state dict is loaded next), as the original's.
            quantize_embeddings: also quantize the word embeddings and the LM
                head (THUDM's `quantize_embeddings`; with tied embeddings they
                share one quantized matrix).
            kwargs: the original's CPU-kernel options (`use_quantization_cache`,
                `parallel_num`, `kernel_file`, ...) are accepted and ignored;
                anything else raises `TypeError`.
        Returns:
            the model (`config.quantization_bit` and `config.quantization_embeddings` set).

        Weights are quantized on their device one matrix at a time, per output row
        (`glm_kernels.quant.layout`). A model already quantized, bits other than 4
        or 8, or a width 4 bits cannot pack raise `ValueError` before anything changes.
        """
        unknown = set(kwargs) - THUDM_QUANTIZE_ARGS
        if unknown:
            raise TypeError(f"quantize() got unexpected arguments {sorted(unknown)}")
        for key in kwargs:
            logger.info("quantize: %s ignored (the original's CPU kernel option; glm_kernels uses PyTorch's "
                        "kernels)", key)
        if bits == 0:
            return self
        check_bits(bits, "quantize(bits)")
        if is_quantized(self):
            raise ValueError(f"the model is already quantized (config.quantization_bit="
                             f"{self.config.quantization_bit}): quantize() applies once; reload the unquantized "
                             "weights to quantize with other settings")
        if bits == 4:
            for name in ("hidden_size", "inner_hidden_size"):
                if getattr(self.config, name) % 2:
                    raise ValueError(f"4-bit quantization packs two columns per byte: ChatGLMConfig.{name}="
                                     f"{getattr(self.config, name)} must be even")
        base = getattr(self, self.base_model_prefix, self)
        head = getattr(self, "lm_head", None)
        with torch.no_grad():
            for layer in base.layers:
                for path in BLOCK_LINEARS:
                    owner_name, attr = path.rsplit(".", 1)
                    owner = layer.get_submodule(owner_name)
                    setattr(owner, attr, QuantizedLinear.from_linear(getattr(owner, attr), bits, empty_init))
            if quantize_embeddings:
                embedding = base.word_embeddings
                base.word_embeddings = QuantizedEmbedding.from_embedding(embedding, bits, empty_init)
                if head is not None:
                    tied = getattr(self.config, "tie_word_embeddings", True) and head.weight is embedding.weight
                    self.lm_head = QuantizedLinear.from_linear(head, bits, empty_init or tied)
                    if tied:
                        self.lm_head.set_weight(base.word_embeddings.weight)
                        self.lm_head.set_scale(base.word_embeddings.weight_scale)
                        self._tie_quantized_head()
                        self.lm_head.settle()
        self.config.quantization_bit = bits
        self.config.quantization_embeddings = bool(quantize_embeddings)
        return self

    def _tie_quantized_head(self) -> None:
        """Tied embeddings and a quantized head share `weight` and `weight_scale` (and say so to transformers)."""
        if not getattr(self.config, "tie_word_embeddings", True) or not hasattr(self, "lm_head"):
            return
        embedding = self.transformer.word_embeddings
        embedding.tie_to(self.lm_head)
        self._tied_weights_keys = {**type(self)._tied_weights_keys,
                                   "lm_head.weight_scale": "transformer.word_embeddings.weight_scale"}
        if hasattr(self, "all_tied_weights_keys"):
            self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)

    def settle_quantized(self) -> None:
        """Re-tie a quantized head and put every quantized weight in its device's form (after loading)."""
        if isinstance(getattr(self, "lm_head", None), QuantizedLinear):
            self._tie_quantized_head()
        for _, module in quantized_modules(self):
            module.settle()

    def load_ptuning_checkpoint(self, path) -> None:
        """Load a P-Tuning v2 checkpoint (only `transformer.prefix_encoder.*` keys) into this model."""
        from .loading import load_ptuning_checkpoint

        load_ptuning_checkpoint(self, path)

    def save_ptuning_checkpoint(self, directory) -> None:
        """Save only the prefix encoder, as `DIR/model.safetensors` with full key names, plus `config.json`."""
        from .loading import save_ptuning_checkpoint

        save_ptuning_checkpoint(self, directory)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM transformer: embeddings, `num_layers` GLM blocks, final LayerNorm.

    `forward` returns `last_hidden_state` sequence-first `[s, b, h]`, like the original.
    """

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        # `empty_init` is accepted for drop-in compatibility; loading builds the
        # model on the meta device instead, so it changes nothing here.
        config.validate_model_shape()
        super().__init__(config)
        self.num_layers = config.num_layers
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.hidden_size_per_attention_head = config.hidden_size // config.num_attention_heads
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        self.gradient_checkpointing = False
        self._rotary_tables = {}  # (dtype, device) -> (cos, sin): looked up, not rebuilt, in every forward

        if config.quantization_bit and config.quantization_embeddings:
            self.word_embeddings = QuantizedEmbedding(config.vocab_size, config.hidden_size, config.quantization_bit)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

        if self.pre_seq_len is not None:
            for param in self.parameters():
                param.requires_grad = False
            self.register_buffer("prefix_tokens", torch.arange(self.pre_seq_len), persistent=False)
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.word_embeddings = new_embeddings

    def get_prompt(self, batch_size, device, dtype=torch.half):
        """The P-Tuning v2 prefix: per layer a `(key, value)` pair, each `[P, b, nh, hd]` in `dtype` on `device`."""
        return self.prefix_encoder.key_values(batch_size, device, dtype, dropout=self.dropout)

    def rotary_table(self, dtype, device):
        """`(cos, sin)` for every position, in `dtype` on `device` (built once per dtype and device)."""
        key = (dtype, device)
        if key not in self._rotary_tables:
            self._rotary_tables[key] = ops.rotary_table(self.config.max_sequence_length,
                                                        self.hidden_size_per_attention_head // 2, dtype, device)
        return self._rotary_tables[key]

    def layer_devices(self) -> list[torch.device]:
        """The device each GLM block computes on (that of its weights, or accelerate's execution device)."""
        return [execution_device(layer, layer.input_layernorm.weight) for layer in self.layers]

    def _check_inputs(self, input_ids, inputs_embeds, past_key_values, check=True):
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        if input_ids is not None and check:  # reads the ids on the host: a sync on a GPU
            lo, hi = (int(t) for t in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids holds id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        if past_key_values is not None and not isinstance(past_key_values, GLMKVCache):
            if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != self.num_layers:
                raise TypeError(
                    f"past_key_values must be a GLMKVCache or a tuple of {self.num_layers} (key, value) pairs "
                    f"[seq, batch, heads, head_dim], got {type(past_key_values).__name__}"
                    + (f" of length {len(past_key_values)}" if isinstance(past_key_values, (tuple, list)) else "")
                )

    @staticmethod
    def _check_devices(device, attention_mask, position_ids, past_key_values, layer_devices):
        """Masks and positions on the inputs' device, a tuple past with each layer (a GLMKVCache checks itself)."""
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but the inputs (input_ids / inputs_embeds) are on "
                                 f"{device}: pass it on {device}")
        if past_key_values is not None and not isinstance(past_key_values, GLMKVCache):
            for i, (kv, layer_device) in enumerate(zip(past_key_values, layer_devices)):
                for name, t in zip(("key", "value"), kv):
                    if t.device != layer_device:
                        raise ValueError(f"past_key_values layer {i} {name} is on {t.device}, the model runs layer "
                                         f"{i} on {layer_device}")

    def _check_positions(self, position_ids, batch, seq, past_length, check=True):
        if position_ids.dim() != 3 or tuple(position_ids.shape) != (batch, 2, seq):
            raise ValueError(f"position_ids must be [batch, 2, seq] = [{batch}, 2, {seq}], got "
                             f"{tuple(position_ids.shape)}")
        limit = self.config.max_sequence_length
        if past_length + seq > limit:
            raise ValueError(f"sequence length {past_length + seq} (past {past_length} + new {seq}) exceeds "
                             f"max_sequence_length={limit}")
        if not check:
            return
        lo, hi = (int(t) for t in torch.aminmax(position_ids))  # a host sync on a GPU
        if lo < 0 or hi >= limit:
            raise ValueError(f"position_ids holds {lo if lo < 0 else hi}, outside [0, max_sequence_length={limit})")

    def _glm_mask(self, attention_mask, pad, context, batch, seq, past_length, prefix, recognise=True):
        """The mask for the attention op: a compact `GLMMask` whenever the mask is GLM's, else the bool mask.

        - No mask: the GLM mask of the rows' context lengths (the position of
          `<sop>`), or no mask at all when the context is unknown (a step after
          a tuple past, as the original).
        - A 2D padding mask `[b, past + seq]` (1 = token, 0 = left padding):
          the GLM mask with that padding.
        - A bool mask `[b, 1, seq, past + seq]` (True = may not attend, the
          original's): recognised as a `GLMMask` when it is one (`recognise`: this
          reads the mask on the host); any other mask is kept as it is, with the
          P-Tuning prefix columns prepended as visible.
        """
        if attention_mask is None or attention_mask.dim() == 2:
            if pad is None and context is None:
                return None
            pad = torch.zeros(batch, dtype=torch.int32, device=context.device) if pad is None else pad
            return GLMMask(prefix, pad, pad if context is None else context)
        key_length = past_length + seq
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or \
                attention_mask.shape[0] not in (1, batch) or tuple(attention_mask.shape[2:]) != (seq, key_length):
            raise ValueError(
                f"attention_mask must be a bool tensor [batch, 1, seq, past + seq] = [{batch}, 1, {seq}, "
                f"{key_length}] (True = may not attend), or a padding mask [batch, past + seq] = [{batch}, "
                f"{key_length}]; got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        compact = GLMMask.from_bool(attention_mask, prefix, batch) if recognise else None
        if compact is not None:
            return compact
        if prefix:
            visible = attention_mask.new_zeros(attention_mask.shape[0], 1, seq, prefix)
            attention_mask = torch.cat((visible, attention_mask), dim=3)
        return attention_mask

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        check_inputs: Optional[bool] = None,
    ):
        """Args as the original, plus a preallocated cache and padding masks.

        - `input_ids [b, s]`, `position_ids [b, 2, s]` (computed from the ids
          when omitted on the first step; required after a past).
        - `attention_mask`: the original's bool `[b, 1, s, past + s]` (True = may
          not attend; P-Tuning prefix columns are added here), or a padding
          mask `[b, past + s]` (1 = token, 0 = left padding), or None. With a
          `GLMKVCache`, None after the first step means the mask the first step
          set (left padding and context of each row).
        - `past_key_values`: a `GLMKVCache` (filled in place, returned as the
          new past), or the original's tuple of per-layer `(key, value)`
          `[past, b, nh, hd]` (a new tuple is returned).
        - `check_inputs` (default True): check the values of the inputs (ids in
          the vocabulary, positions in range, a padding mask that pads on the
          left, a bool mask recognised as GLM's), which makes the host wait for
          the device. `generate()` checks the prompt and passes False for the
          steps it builds itself; pass False in a decode loop of your own to make
          its steps free of host syncs. Shapes, dtypes, devices and lengths are
          always checked.

        Masks, positions and the `GLMKVCache` must be on the device of the inputs
        (for a cache: each layer's buffers on the device that layer runs on);
        otherwise `ValueError` names the tensor and the devices.
        """
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False
        check = check_inputs is not False
        self._check_inputs(input_ids, inputs_embeds, past_key_values, check)
        devices = self.layer_devices()
        device = (input_ids if input_ids is not None else inputs_embeds).device
        self._check_devices(device, attention_mask, position_ids, past_key_values, devices)

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids.to(execution_device(self.word_embeddings,
                                                                               self.word_embeddings.weight)))
        batch, seq = inputs_embeds.shape[:2]
        dtype = inputs_embeds.dtype

        cache = past_key_values if isinstance(past_key_values, GLMKVCache) else None
        if cache is not None:
            cache.check_compatible(batch, dtype, devices)
            cache.check_capacity(seq)
            past_length = cache.get_seq_length()
        else:
            past_length = 0 if past_key_values is None else past_key_values[0][0].shape[0] - (self.pre_seq_len or 0)
        first = past_length == 0
        position_ids, attention_mask, mask_on = self._step_inputs(input_ids, position_ids, attention_mask, cache,
                                                                  batch, seq, past_length, check)

        prompt_device = devices[0]
        if cache is not None:
            if first:
                glm = attention_mask if isinstance(attention_mask, GLMMask) else None
                cache.set_mask(glm, padded=glm is not None and bool(glm.pad.any()))  # one host sync, first step only
                if not cache.prefix_written:
                    if self.pre_seq_len != cache.prefix_len:
                        raise ValueError(f"the KV cache reserves {cache.prefix_len} prefix columns, the model's prefix "
                                         f"encoder has pre_seq_len={self.pre_seq_len}: write the prefix with "
                                         "cache.write_prefix(encoder.key_values(...)) before the first forward")
                    cache.write_prefix(self.get_prompt(batch, prompt_device, dtype))
            layer_pasts = [CacheSlot(cache, i) for i in range(self.num_layers)]
        elif past_key_values is not None:
            layer_pasts = past_key_values
        elif self.pre_seq_len is not None:
            layer_pasts = [tuple(t.to(d) for t in kv)
                           for kv, d in zip(self.get_prompt(batch, prompt_device, dtype), devices)]
        else:
            layer_pasts = (None,) * self.num_layers

        # positions, mask and rotary tables: moved / looked up once per device, shared by every layer there
        on_device = {}

        def inputs_on(d):
            if d not in on_device:
                on_device[d] = (position_ids.to(d), mask_on(d), self.rotary_table(dtype, d))
            return on_device[d]

        backend = ops.kernel_plan(cfg.kernel_backend, inputs_embeds.device)  # asked once per device (cached)
        hidden_states, residual = inputs_embeds.transpose(0, 1), None
        presents = () if use_cache else None
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        fused = None
        if cache is not None and not output_attentions and not output_hidden_states and \
                not (self.gradient_checkpointing and self.training) and all(d.type == "cpu" for d in devices) and \
                self._blocks_unhooked():
            # CPU decoding: every block in one C++ call when each would take its one-call form (ops/block.py)
            layer_positions, layer_mask, rotary = inputs_on(devices[0])
            fused = ops.layers_infer(hidden_states, [layer.infer_parts() for layer in self.layers], ALPHA,
                                     layer_positions, rotary, cfg.num_attention_heads, cache, layer_mask, backend)
        if fused is not None:
            hidden_states, residual = fused
        for i, layer in enumerate(self.layers if fused is None else ()):
            if hidden_states.device != devices[i]:  # a block boundary between devices
                hidden_states = hidden_states.to(devices[i])
                residual = None if residual is None else residual.to(devices[i])
            if output_hidden_states:
                all_hidden_states += (hidden_states if residual is None else hidden_states * ALPHA + residual,)
            layer_positions, layer_mask, rotary = inputs_on(devices[i])
            args = (hidden_states, layer_positions, layer_mask, rotary, layer_pasts[i], use_cache,
                    output_attentions, backend, residual)
            if self.gradient_checkpointing and self.training:
                hidden_states, residual, present, probs = self._gradient_checkpointing_func(layer.__call__, *args)
            else:
                hidden_states, residual, present, probs = layer(*args)
            if use_cache and cache is None:
                presents += (present,)
            if output_attentions:
                all_attentions += (probs.reshape(-1, *probs.shape[2:]),)

        if cache is not None:
            cache.advance(seq)
            presents = cache if use_cache else None
        ln = self.final_layernorm
        ln_device = execution_device(ln, ln.weight)
        if hidden_states.device != ln_device:
            hidden_states, residual = hidden_states.to(ln_device), residual.to(ln_device)
        hidden_states = ops.residual_layer_norm(hidden_states, residual, ALPHA, ln.weight, ln.bias, ln.eps,
                                                backend=backend)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states, attentions=all_attentions)

    def _blocks_unhooked(self) -> bool:
        """True when no block's call does more than its forward: no forward hooks of torch (the block's own or
        global ones) and no replaced forward (accelerate's offload hooks, which load a block's weights in just
        before it runs). Only then may all blocks run in one call, which does not call the block modules."""
        return not global_forward_hooks() and not any(hooked(layer) for layer in self.layers)

    def _step_inputs(self, input_ids, position_ids, attention_mask, cache, batch, seq, past_length, check):
        """`(position_ids, mask, mask_on)`: the positions, the mask for the attention op (a `GLMMask`, a bool
        mask or None) and `mask_on(device)` giving it on a layer's device.

        A step after the first with a `GLMKVCache` and no mask takes the mask the
        cache keeps (built at the first step, moved to each device once per
        cache): nothing is built or read on the host. One new token then sees
        every key that is not left padding, so an unpadded batch needs no mask.
        """
        cfg = self.config
        first = past_length == 0
        if first and input_ids is None and (attention_mask is None or attention_mask.dim() == 2 or
                                            position_ids is None):
            raise ValueError("with inputs_embeds and no input_ids, pass a bool attention_mask and position_ids")
        if position_ids is None and not first:
            raise ValueError("position_ids are required with past_key_values (e.g. [[mask_position], "
                             "[block_position]] per row for the next token)")
        if cache is not None and not first and attention_mask is None and cache.mask is not None:
            self._check_positions(position_ids, batch, seq, past_length, check)
            if seq == 1 and not cache.padded:
                return position_ids, None, lambda device: None
            return position_ids, cache.mask, cache.mask_on
        pad = None
        if attention_mask is not None and attention_mask.dim() == 2:
            pad = glm_inputs.left_padding(attention_mask, batch, past_length + seq, check)
        context = None
        if first and input_ids is not None and (attention_mask is None or attention_mask.dim() == 2):
            context = glm_inputs.context_lengths(input_ids, cfg.bos_token_id)
        elif cache is not None:
            context = cache.context
        if position_ids is None:
            position_ids = glm_inputs.get_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                       cfg.gmask_token_id, pad=pad)
        self._check_positions(position_ids, batch, seq, past_length, check)
        prefix = cache.prefix_len if cache is not None else (self.pre_seq_len or 0)  # the cache's prefix rules
        mask = self._glm_mask(attention_mask, pad, context, batch, seq, past_length, prefix, recognise=check or first)
        return position_ids, mask, lambda device: None if mask is None else mask.to(device)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, ChatGLMGenerationMixin):
    """ChatGLM-6B language model: `ChatGLMModel` + `lm_head` (no bias), tied to the embeddings by default.

    Generation: `generate()` (transformers'), `chat()`, `stream_chat()`, `stream_generate()`; see
    `glm_kernels.generation`.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    accepts_loss_kwargs = True  # forward takes num_items_in_batch (transformers' Trainer reads this)

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True):
        config.validate_model_shape()
        super().__init__(config)
        self.max_sequence_length = config.max_sequence_length
        self.position_encoding_2d = config.position_encoding_2d
        self.transformer = ChatGLMModel(config, empty_init=empty_init)
        if config.quantization_bit and config.quantization_embeddings:
            self.lm_head = QuantizedLinear(config.hidden_size, config.vocab_size, config.quantization_bit, bias=False)
            self._tie_quantized_head()
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.pre_seq_len is not None:
            self.lm_head.weight.requires_grad = False

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep=0,
        skip_logits: Optional[bool] = None,
        num_items_in_batch=None,
        check_inputs: Optional[bool] = None,
        **kwargs,
    ):
        """As `ChatGLMModel.forward`, plus `labels [b, s]` (-100 = ignored) for the shifted LM loss.

        Returns logits `[b, s, vocab]`; with labels, the loss of fp32 logits
        (returned in the model dtype, as the original does). `logits_to_keep`:
        0 for every position, n > 0 for the last n (generation needs only the
        last one), or a 1D tensor of positions.

        `skip_logits` (default: True in training mode with labels, as
        Liger-Kernel does): compute the loss with the fused LM head +
        cross-entropy (`ops.fused_linear_cross_entropy`) over the labelled
        positions only, never materialising the `[b, s, vocab]` logits;
        `logits` is then None. Same loss and gradients as the unfused path.
        `num_items_in_batch` (passed by transformers' Trainer under gradient
        accumulation / several processes): the loss is the sum over labelled
        tokens divided by it instead of their mean.
        `check_inputs`: see `ChatGLMModel.forward`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is None and not skip_logits:
            step = self._one_call_step(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds,
                                       use_cache, output_attentions, output_hidden_states, logits_to_keep,
                                       check_inputs)
            if step is not None:
                logits, past = step
                if not return_dict:
                    return (logits,) if past is None else (logits, past)
                return step_output(logits, past)
        if labels is not None:
            expected = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
            if tuple(labels.shape) != expected:
                raise ValueError(f"labels must be [batch, seq] = {list(expected)}, got {list(labels.shape)}")
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns only the loss: it needs labels")
        outputs = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            check_inputs=check_inputs,
        )
        hidden_states = outputs.last_hidden_state.to(execution_device(self.lm_head, self.lm_head.weight))
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: logits_to_keep must be 0")
        logits = loss = None
        if skip_logits:
            loss = self._fused_loss(hidden_states, labels, num_items_in_batch)
        else:
            if isinstance(logits_to_keep, int):
                kept = hidden_states[-logits_to_keep:] if logits_to_keep > 0 else hidden_states
            else:
                kept = hidden_states[logits_to_keep.to(hidden_states.device)]
            plan = ops.kernel_plan(self.config.kernel_backend, kept.device)
            logits = linear(self.lm_head, kept, plan).permute(1, 0, 2).contiguous()
            if labels is not None:
                shift_logits = logits.float()[:, :-1, :]
                loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                       labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100,
                                       reduction="mean" if num_items_in_batch is None else "sum")
                if num_items_in_batch is not None:
                    loss = loss / num_items_in_batch
        if loss is not None:
            loss = loss.to(hidden_states.dtype)
        if not return_dict:
            rest = tuple(v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions)
                         if v is not None)
            return ((loss,) if loss is not None else ()) + ((logits,) if logits is not None else ()) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _one_call_step(self, input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, use_cache,
                       output_attentions, output_hidden_states, logits_to_keep, check_inputs):
        """`(logits, past)` of a CPU decoding step computed in one C++ call (`ops.step_infer`: embeddings, blocks,
        final LayerNorm, head), or None when the step is not one it takes; then `forward` runs as usual.

        Taken for the steps `generate()` makes after the prompt: input ids and positions on the CPU, a
        `GLMKVCache` past its first step with the mask that step set, no mask given, nothing asked beyond the
        logits of every new position, the model and cache on the CPU, and a model whose calls do nothing but their
        forwards (no hooks). The checks and errors are the forward's; the logits are bitwise those of the full
        forward (tests/test_step_infer.py). The step's unchanging arguments are gathered once per cache
        (`StepPlan`, kept on the cache) and used while they hold; `ops.step_infer` declines (None) a tensor that
        moved off the CPU or to another dtype, or a weight that needs a gradient, before anything is written.
        """
        cfg, model = self.config, self.transformer
        cache = past_key_values
        if not isinstance(cache, GLMKVCache) or input_ids is None or inputs_embeds is not None or \
                attention_mask is not None or position_ids is None or cache.mask is None or \
                (output_attentions if output_attentions is not None else cfg.output_attentions) or \
                (output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states) or \
                not isinstance(logits_to_keep, int) or input_ids.device.type != "cpu" or \
                position_ids.device != input_ids.device or (model.gradient_checkpointing and model.training):
            return None
        plan = cache.step_plan
        if plan is None or not plan.holds(self):
            plan = cache.step_plan = self._plan_step(cache)
            if plan is None:
                return None
        check = check_inputs is not False
        model._check_inputs(input_ids, None, cache, check=False)  # the ranges of the ids: in ops.step_infer
        batch, seq = input_ids.shape
        past_length = cache.get_seq_length()
        if past_length == 0 or (0 < logits_to_keep < seq):
            return None  # the first step sets the cache's mask and prefix; part of the logits is another product
        device = input_ids.device
        cache.check_compatible(batch, plan.args.dtype, (device,) * plan.args.num_layers)
        cache.check_capacity(seq)
        model._check_positions(position_ids, batch, seq, past_length, check=False)  # their range: as the ids'
        mask = None if seq == 1 and not cache.padded else cache.mask_on(device)
        logits = ops.step_infer(plan.args, input_ids, position_ids, cache.filled, mask,
                                (cfg.vocab_size, cfg.max_sequence_length) if check else None)
        if logits is None:
            cache.step_plan = None
            return None
        cache.advance(seq)
        return logits, cache if (use_cache if use_cache is not None else cfg.use_cache) else None

    def _plan_step(self, cache):
        """A `StepPlan` of this model over `cache`, or None when its steps do not take the one-call step (a hooked
        module, a weight in another form or off the CPU, a cache elsewhere)."""
        model = self.transformer
        # _blocks_unhooked also looks for global hooks
        if any(hooked(m) for m in (model, model.word_embeddings, self.lm_head)) or not model._blocks_unhooked():
            return None
        embedding, head = embedding_parts(model.word_embeddings), linear_parts(self.lm_head)
        if embedding is None or head is None or any(layer.keys.device.type != "cpu" for layer in cache.layers):
            return None  # a cache elsewhere: the forward moves CPU ids to the model (or names the device)
        dtype, device, ln = embedding[3], torch.device("cpu"), model.final_layernorm
        args = ops.step_args(embedding, [layer.infer_parts() for layer in model.layers], ALPHA,
                             model.rotary_table(dtype, device), self.config.num_attention_heads, cache,
                             (ln.weight, ln.bias, ln.eps), head, ops.kernel_plan(self.config.kernel_backend, device))
        return None if args is None else StepPlan(self, cache, args)

    def _fused_loss(self, hidden_states, labels, num_items_in_batch=None):
        """Shifted LM loss from the sequence-first `[s, b, h]` hidden states, through the fused head + CE.

        Only the labelled positions go through the head: position t of row i
        predicts `labels[i, t + 1]`. Mean over them (NaN when there is none, as
        the unfused loss), or their sum / `num_items_in_batch`.
        """
        hidden = hidden_states[:-1]  # [s-1, b, h]: contiguous, rows in (position, batch) order
        targets = labels[:, 1:].transpose(0, 1).reshape(-1).to(hidden.device)
        keep = (targets != -100).nonzero().squeeze(1)  # one host sync per training step
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
        if isinstance(self.lm_head, QuantizedLinear):
            total = self._quantized_head_loss(rows, targets.index_select(0, keep))
        else:
            total = ops.fused_linear_cross_entropy(rows, self.lm_head.weight, targets.index_select(0, keep),
                                                   reduction="sum", backend=self.config.kernel_backend)
        return total / (num_items_in_batch if num_items_in_batch is not None else keep.numel())

    def _quantized_head_loss(self, rows, targets):
        """Summed fp32 cross-entropy of a quantized head over chunks of rows, each recomputed in the backward
        (torch.utils.checkpoint), so only one `[chunk, vocab]` logits block exists at a time."""
        from torch.utils.checkpoint import checkpoint

        from .ops.lm_loss import default_chunk_size

        plan = ops.kernel_plan(self.config.kernel_backend, rows.device)

        def chunk_loss(h, t):
            logits = linear(self.lm_head, h, plan).float()
            return F.cross_entropy(logits, t, reduction="sum")

        size = default_chunk_size(rows.shape[0], self.config.vocab_size, rows.device.type)
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], size):
            h, t = rows[start:start + size], targets[start:start + size]
            total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if h.requires_grad
                             else chunk_loss(h, t))
        return total
