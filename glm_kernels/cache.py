"""`GLMKVCache`: a preallocated, prefix-aware KV cache for ChatGLM generation (a transformers `Cache`).

Per layer one key and one value buffer of shape `[batch, heads, prefix + max_length, head_dim]`
(transformers' layout), allocated once. The P-Tuning v2 prefix is written into positions `[0, P)`
at the first forward; every step the fused `rope_qkv` op writes the new keys and values straight
into the next positions (no `torch.cat`, no copy of the past), and attention reads the filled part
as a view. Beam search reorders the filled part in place; the buffers never move.

    cache = GLMKVCache(model.config, batch_size=2, max_length=512, dtype=torch.float16, device="cuda")
    out = model(input_ids, past_key_values=cache)        # fills the prefix and the prompt
    out = model(next_ids, position_ids=..., past_key_values=cache)

`generate()` creates one for you, sized for `max_length`.

On a model spread over several devices (`from_pretrained(..., device_map=...)`), `device` is a list
with each layer's device: every layer's buffers live with that layer (`generate()` does this).

The cache also keeps the attention mask of the rows it holds (P-Tuning prefix length, left padding,
context length: a `GLMMask`), set by the first forward, so that the steps after it build nothing:
the model reads it from here, on each layer's device, without a host sync.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.mask import GLMMask


class GLMCacheLayer(CacheLayerMixin):
    """One layer's preallocated key and value buffers `[b, nh, capacity, hd]`."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False
    is_croppable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: GLMKVCache):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self._cache = cache

    def lazy_initialization(self, key_states, value_states) -> None:
        return

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' interface: append `[b, nh, s, hd]` states, return all `[b, nh, filled, hd]`."""
        start = self._cache.filled
        end = start + key_states.shape[2]
        self._cache.check_capacity(key_states.shape[2])
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return self.keys.shape[2] - self._cache.prefix_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.filled + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        n = self._cache.filled
        idx = beam_idx.to(self.keys.device)
        for buf in (self.keys, self.values):
            buf[:, :, :n].copy_(buf[:, :, :n].index_select(0, idx))

    def crop(self, tokens_to_remove: int) -> None:
        return  # the cache-wide length is cropped once in GLMKVCache.crop

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = self.keys[indices]
        self.values = self.values[indices]


class GLMKVCache(Cache):
    """Preallocated KV cache of every layer, with the P-Tuning prefix in front.

    Args:
        config: the model's `ChatGLMConfig` (layers, heads, head dim, `pre_seq_len`).
        batch_size: rows (beams included).
        max_length: tokens the cache holds (prompt + generated), prefix not counted;
            at most `config.max_sequence_length`.
        dtype: that of the model.
        device: that of the model, or one device per layer for a model spread over several
            (`model.transformer.layer_devices()`).
        prefix_len: prefix columns to reserve, instead of `config.pre_seq_len`: a prefix from another
            `PrefixEncoder` (`encoder.key_values(...)`, written with `write_prefix` before the first
            forward) runs over a base model without one; the model's mask follows the cache.
    """

    def __init__(self, config, batch_size: int, max_length: int, dtype=torch.float32,
                 device: torch.device | str | int | Sequence = "cpu", prefix_len: int | None = None):
        if max_length > config.max_sequence_length:
            raise ValueError(f"max_length={max_length} exceeds the model's max_sequence_length="
                             f"{config.max_sequence_length}")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"GLMKVCache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        prefix_len = (config.pre_seq_len or 0) if prefix_len is None else prefix_len
        if prefix_len < 0:
            raise ValueError(f"GLMKVCache prefix_len must be >= 0, got {prefix_len}")
        if isinstance(device, (list, tuple)):
            if len(device) != config.num_layers:
                raise ValueError(f"GLMKVCache got {len(device)} devices for {config.num_layers} layers")
            devices = [torch.device(d) for d in device]
        else:
            devices = [torch.device(device)] * config.num_layers
        nh = config.num_attention_heads
        hd = config.hidden_size // nh
        shape = (batch_size, nh, prefix_len + max_length, hd)
        self._adopt([torch.zeros(shape, dtype=dtype, device=d) for d in devices],
                    [torch.zeros(shape, dtype=dtype, device=d) for d in devices], prefix_len)

    def _adopt(self, keys, values, prefix_len: int) -> None:
        self.prefix_len = prefix_len
        self._uncounted = prefix_len  # written columns that are not tokens (get_seq_length)
        self.filled = 0  # positions written, prefix included
        self.prefix_written = self.prefix_len == 0
        self.mask: GLMMask | None = None  # the rows' GLM mask, set by the first forward (set_mask)
        self.padded = True  # whether any row is left-padded (known once the mask is set)
        self._masks: dict[torch.device, GLMMask] = {}  # self.mask on each layer device
        self._checked = None  # (batch, dtype, layer devices) the cache was last checked against
        self._views: dict[tuple, tuple] = {}  # (layer, modes) -> (keys, values, their seq_view)
        # the one-call decoding step's arguments over these buffers (glm_kernels/step_plan.py), set by the model
        self.step_plan = None
        super().__init__(layers=[GLMCacheLayer(k, v, self) for k, v in zip(keys, values)])

    @classmethod
    def from_buffers(cls, keys, values, filled: int, mask: GLMMask | None, padded: bool | None = None,
                     seq_length: int | None = None) -> GLMKVCache:
        """A cache over buffers the caller owns (continuous batching: views of the first rows of a pool).

        `keys`, `values`: per layer `[b, nh, capacity, hd]` (views are written through); `filled`: positions
        already written (no prefix columns: a row's prefix is part of its tokens); `mask`: the rows' `GLMMask`
        (per-row `pad` = the first column the row uses), which the next forwards take as the cache's;
        `padded`: whether any `pad` is non-zero (read from the mask when not given: a host sync on a GPU);
        `seq_length`: tokens of the longest row (default `filled`), what `get_seq_length` reports and the
        model's position checks see: padding and prefix columns are not tokens.
        """
        if len(keys) != len(values) or not keys:
            raise ValueError(f"GLMKVCache.from_buffers needs one key and one value buffer per layer, got "
                             f"{len(keys)} and {len(values)}")
        for i, (k, v) in enumerate(zip(keys, values)):
            if k.dim() != 4 or k.shape != v.shape or k.shape[:2] != keys[0].shape[:2] or \
                    k.shape[2:] != keys[0].shape[2:]:
                raise ValueError(f"GLMKVCache.from_buffers: layer {i} keys {list(k.shape)} / values "
                                 f"{list(v.shape)} are not [b, nh, capacity, hd] like layer 0's {list(keys[0].shape)}")
        if not 0 <= filled <= keys[0].shape[2]:
            raise ValueError(f"GLMKVCache.from_buffers: filled={filled} outside [0, {keys[0].shape[2]}]")
        cache = cls.__new__(cls)
        cache._adopt(list(keys), list(values), 0)
        cache.filled = filled
        if seq_length is not None:
            if not 0 < seq_length <= filled:
                raise ValueError(f"GLMKVCache.from_buffers: seq_length={seq_length} outside [1, filled={filled}]")
            cache._uncounted = filled - seq_length
        if mask is not None:
            if mask.batch != keys[0].shape[0] or mask.prefix_len != 0:
                raise ValueError(f"GLMKVCache.from_buffers: the mask is for {mask.batch} rows with prefix_len="
                                 f"{mask.prefix_len}, the buffers hold {keys[0].shape[0]} rows and no prefix columns")
            cache.set_mask(mask, padded=bool(mask.pad.any()) if padded is None else padded)
        return cache

    # ------------------------------------------------------------------ transformers' Cache interface

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens in the cache (prefix not counted), as `input_ids` columns already processed."""
        return max(0, self.filled - self._uncounted) if self.prefix_written else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.layers[0].get_max_length()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            tokens_to_remove = self.get_seq_length() + tokens_to_remove  # crop(-n): keep n tokens
        self.filled = max(self.prefix_len, self.filled - tokens_to_remove) if self.prefix_written else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows_changed(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows_changed(lambda t: t.repeat_interleave(repeats, dim=0, output_size=t.shape[0] * repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows_changed(lambda t: t[indices.to(t.device)])

    def _rows_changed(self, select) -> None:
        self._checked = None
        self._views = {}  # the views of the replaced buffers would keep them alive
        self.step_plan = None  # and so would the plan's
        if self.mask is not None:
            m = self.mask
            self.set_mask(GLMMask(m.prefix_len, select(m.pad), select(m.context), m.causal), self.padded)

    # ------------------------------------------------------------------ what the model uses

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def check_capacity(self, new_tokens: int) -> None:
        if self.filled + new_tokens > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity - self.prefix_len} tokens; "
                             f"{self.get_seq_length()} are cached and {new_tokens} more were given")

    def check_compatible(self, batch: int, dtype: torch.dtype, devices: Sequence[torch.device]) -> None:
        """Raise `ValueError` unless the cache holds `batch` rows of `dtype` with layer i on `devices[i]`.

        No host sync: shapes, dtypes and devices only (checked once per batch/dtype/devices).
        """
        key = (batch, dtype, tuple(devices))
        if key == self._checked:
            return
        keys = self.layers[0].keys
        if keys.shape[0] != batch or keys.dtype != dtype:
            raise ValueError(f"the KV cache was built for batch {keys.shape[0]}, {keys.dtype}; the input is batch "
                             f"{batch}, {dtype}")
        if len(devices) != len(self.layers):
            raise ValueError(f"the KV cache has {len(self.layers)} layers, the model {len(devices)}")
        for i, (layer, device) in enumerate(zip(self.layers, devices)):
            if layer.keys.device != device:
                where = "the model's inputs are" if len(set(devices)) == 1 else f"the model runs layer {i}"
                raise ValueError(f"past_key_values (GLMKVCache) layer {i} is on {layer.keys.device}, {where} on "
                                 f"{device}: build the cache with device=model.transformer.layer_devices()")
        self._checked = key

    @property
    def context(self) -> torch.Tensor | None:
        """Per-row context length (index of `<sop>`), once the first forward has set the mask."""
        return None if self.mask is None else self.mask.context

    def set_mask(self, mask: GLMMask | None, padded: bool = True) -> None:
        """Keep the rows' GLM mask for the following steps; `padded`: whether any row is left-padded."""
        self.mask, self.padded = mask, padded
        self._masks = {}

    def mask_on(self, device: torch.device) -> GLMMask | None:
        """The rows' GLM mask on `device`, moved there once per cache (not per step)."""
        if self.mask is None:
            return None
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def seq_view(self, layer_idx: int):
        """Key and value buffers of a layer as `[capacity, b, nh, hd]` views (the ops' layout), made once per
        buffer (a CPU decode step asks for every layer's: 16 ATen calls from cold caches otherwise)."""
        layer = self.layers[layer_idx]
        keys, values = layer.keys, layer.values
        # per grad and inference mode: autograd refuses an in-place write, with gradients on, to a view made
        # without them, and any write outside inference mode to a view made in it
        key = (layer_idx, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        made = self._views.get(key)
        if made is None or made[0] is not keys or made[1] is not values:
            made = self._views[key] = (keys, values, keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3))
        return made[2], made[3]

    def write_prefix(self, prompt) -> None:
        """Write the P-Tuning prefix (per layer a `[2, P, b, nh, hd]` tensor from `get_prompt`, on any device) once."""
        prompt = list(prompt)
        if len(prompt) != len(self.layers):
            raise ValueError(f"the prefix has {len(prompt)} layers, the KV cache {len(self.layers)}")
        k0 = self.layers[0].keys
        want = (2, self.prefix_len, k0.shape[0], k0.shape[1], k0.shape[3])
        if tuple(prompt[0].shape) != want:
            raise ValueError(f"the prefix's layer 0 keys and values are {list(prompt[0].shape)}, the KV cache "
                             f"expects [2, prefix_len, batch, heads, head_dim] = {list(want)}")
        for i, kv in enumerate(prompt):
            k, v = self.seq_view(i)
            k[: self.prefix_len].copy_(kv[0])
            v[: self.prefix_len].copy_(kv[1])
        self.filled = self.prefix_len
        self.prefix_written = True

    def slots(self, layer_idx: int, new_tokens: int):
        """`(k_out, v_out, k_all, v_all)`: views for the next `new_tokens` positions and for everything up to them."""
        k, v = self.seq_view(layer_idx)
        start, end = self.filled, self.filled + new_tokens
        return k[start:end], v[start:end], k[:end], v[:end]

    def advance(self, new_tokens: int) -> None:
        self.filled += new_tokens

    def to_legacy(self):
        """The original's `past_key_values`: per layer `(key, value)` `[prefix + tokens, b, nh, hd]` (views)."""
        return tuple(tuple(t[: self.filled] for t in self.seq_view(i)) for i in range(len(self.layers)))
