"""`QuantizedLinear` and `QuantizedEmbedding`: THUDM's weight-only INT8/INT4 modules, and `linear()`.

Both keep THUDM's parameters: `weight` (int8 storage; `[out, in]` for 8 bits,
`[out, in/2]` two nibbles per byte for 4 bits), `weight_scale` (`[out]`
fp16) and, for the linear, `bias` (model dtype). `state_dict()` and
`load_state_dict()` always speak that layout, so checkpoints are THUDM's.

On the CPU a 4-bit `QuantizedLinear` holds its weight repacked for
PyTorch's int4 kernel (`cpu_pack`, uint8, same bytes) instead of THUDM's
bytes (never both): the `weight` parameter keeps its shape and changes dtype
(int8 = THUDM's order, uint8 = the CPU kernel's). Moving the module off the
CPU converts it back first, and back on the CPU it is repacked (`_apply`);
`weight_scale` keeps its fp16 through `model.to(dtype)`, `.half()`,
`.bfloat16()`. An embedding tied to a quantized LM head shares the head's
parameters (one copy) and reads rows in either order.
"""
from __future__ import annotations

import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as backend_mod
from .. import cpu_ext
from . import cpu_pack
from .cpu_pack import PackedInt4
from .layout import check_bits, dequantize, quantize_weight, stored_shape, unpack_int4

# Lookups of at most this many ids (decode steps) take the extension's row dequantization on the CPU.
FEW_IDS = 16

logger = logging.getLogger(__name__)

# THUDM-layout copies of CPU-packed weights, alive only while a state dict holds them: an embedding and the
# head tied to it (one packed parameter) then hand out the same tensor, so savers see the tie.
_THUDM_COPIES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

# The four linears of every GLM block that THUDM quantizes.
BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class QuantizedWeightMixin:
    """Parameters `weight` (int8 THUDM / uint8 CPU-packed) and `weight_scale` (fp16), their moves and state dict."""

    bits: int
    rows: int  # out_features (linear) / num_embeddings
    columns: int  # in_features (linear) / embedding_dim

    def _init_quantized(self, rows: int, columns: int, bits: int, device) -> None:
        self.bits = check_bits(bits)
        self.rows, self.columns = rows, columns
        shape = stored_shape(rows, columns, bits)
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float16, device=device), requires_grad=False)

    # ------------------------------------------------------------------ forms

    def thudm_weight(self) -> torch.Tensor:
        """`weight` in THUDM's layout (a converted copy when the module holds the CPU form)."""
        w = self.weight.detach()
        if w.dtype != torch.uint8:
            return w
        key = (w.data_ptr(), self.weight._version, w.device, tuple(w.shape))
        copy = _THUDM_COPIES.get(key)
        if copy is None or copy._glm_source() is not self.weight:
            copy = cpu_pack.unpack(w)
            copy._glm_source = weakref.ref(self.weight)
            _THUDM_COPIES[key] = copy
        return copy

    def int_values(self) -> torch.Tensor:
        """The int8 q values `[rows, columns]`."""
        w = self.weight.detach()
        if w.dtype == torch.uint8:
            return cpu_pack.int_values(w)
        return unpack_int4(w) if self.bits == 4 else w

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """`q * scale[:, None]` `[rows, columns]` (computed in fp32)."""
        return dequantize(self.thudm_weight(), self.weight_scale.detach(), self.bits, dtype)

    def _prefers_cpu_form(self) -> bool:
        return False

    def settle(self) -> None:
        """Put `weight` in the form its device prefers (CPU-packed int4 on the CPU when possible, else THUDM's)."""
        w = self.weight
        if w.is_meta:
            return
        with torch.no_grad():
            if self._prefers_cpu_form() and w.device.type == "cpu":
                if w.dtype == torch.int8:
                    w.data = cpu_pack.pack(w.data)
            elif w.dtype == torch.uint8 and not (w.device.type == "cpu" and self._shares_cpu_form()):
                w.data = cpu_pack.unpack(w.data)

    def _shares_cpu_form(self) -> bool:
        # an embedding leaves a tied head's CPU form alone (the head decides), see QuantizedEmbedding
        return False

    # ------------------------------------------------------------------ writing

    def set_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        """Copy THUDM-layout int8 bytes into `weight` (repacked when the module holds the CPU form)."""
        expected = stored_shape(self.rows, self.columns, self.bits)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or tuple(weight.shape) != expected:
            raise ValueError(f"{name} must be int8 {list(expected)} (THUDM's {self.bits}-bit layout), got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)} "
                             f"{list(getattr(weight, 'shape', []))}")
        with torch.no_grad():
            src = weight.to(self.weight.device)
            if self.weight.dtype == torch.uint8:
                src = cpu_pack.pack(src)
            self.weight.copy_(src)

    def set_scale(self, scale: torch.Tensor, name: str = "weight_scale") -> None:
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (self.rows,):
            raise ValueError(f"{name} must be a floating [{self.rows}] tensor (fp16 in THUDM's layout), got "
                             f"{getattr(scale, 'dtype', type(scale).__name__)} {list(getattr(scale, 'shape', []))}")
        with torch.no_grad():
            self.weight_scale.copy_(scale.to(self.weight_scale.device, torch.float16))

    def quantize_from(self, weight: torch.Tensor, name: str = "weight") -> None:
        """Quantize a floating `[rows, columns]` weight into this module (THUDM's per-row scheme)."""
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or \
                tuple(weight.shape) != (self.rows, self.columns):
            raise ValueError(f"{name} must be a floating [{self.rows}, {self.columns}] weight to quantize, got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)} "
                             f"{list(getattr(weight, 'shape', []))}")
        q, scale = quantize_weight(weight.to(self.weight.device), self.bits)
        self.set_weight(q, name)
        self.set_scale(scale)

    # ------------------------------------------------------------------ nn.Module hooks

    def _apply(self, fn, recurse=True):
        w = self.weight
        target = fn(torch.empty(0, dtype=torch.float16, device=w.device)).device
        if w.dtype == torch.uint8 and target != w.device:
            with torch.no_grad():
                w.data = cpu_pack.unpack(w.data)  # THUDM's bytes travel; the CPU form is rebuilt on arrival
        was_meta = w.is_meta
        # weight_scale keeps fp16 through dtype conversions (model.to(bf16) would round it): moved, never cast
        items = list(self._parameters.items())
        scale = self._parameters.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            rebuilt = dict(self._parameters)
            self._parameters.clear()
            for key, _ in items:
                self._parameters[key] = scale if key == "weight_scale" else rebuilt.pop(key)
            self._parameters.update(rebuilt)
        with torch.no_grad():
            moved = fn(scale)
            if moved.dtype != scale.dtype:
                moved = torch.empty_like(scale, device=moved.device) if scale.is_meta else scale.to(moved.device)
            if torch._has_compatible_shallow_copy_type(scale, moved):
                scale.data = moved
            else:
                self._parameters["weight_scale"] = nn.Parameter(moved, requires_grad=False)
        if was_meta and self._prefers_cpu_form() and self.weight.device.type == "cpu":
            with torch.no_grad():  # freshly allocated (to_empty): take the CPU form's storage, nothing to convert
                self.weight.data = torch.empty(self.weight.shape, dtype=torch.uint8)
        else:
            self.settle()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dtype == torch.uint8:
            destination[prefix + "weight"] = self.thudm_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {"weight", "weight_scale"}
        taken = {}
        for name in own:
            key = prefix + name
            if key in state_dict:
                taken[name] = state_dict[key]
            elif strict:
                missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if not (k.startswith(prefix) and k[len(prefix):] in own)}
        # the other parameters (bias) load the standard way
        saved = {name: self._parameters.pop(name) for name in own}
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            params = dict(self._parameters)
            self._parameters.clear()
            self._parameters.update(saved)
            self._parameters.update(params)
        try:
            if "weight" in taken:
                self.set_weight(taken["weight"], prefix + "weight")
            if "weight_scale" in taken:
                self.set_scale(taken["weight_scale"], prefix + "weight_scale")
        except ValueError as err:
            error_msgs.append(str(err))


class QuantizedLinear(QuantizedWeightMixin, nn.Module):
    """Weight-only quantized `nn.Linear`: `y = x @ (q * scale[:, None])^T + bias`, through `ops.quant_linear`.

    Parameters (THUDM's names and layout): `weight` int8 `[out, in]` (8 bits) or
    `[out, in/2]` (4 bits; on the CPU uint8 in the int4 kernel's order, see the
    module docstring), `weight_scale` fp16 `[out]`, `bias` `[out]` or None.
    `forward(x, backend=None, with_bias=True)`: x `[..., in]` fp32/fp16/bf16 ->
    `[..., out]` in x's dtype; gradients reach x and the bias only.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None, dtype=None,
                 empty_init: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quantized(out_features, in_features, bits, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device,
                                                 dtype=dtype or torch.get_default_dtype()))
        else:
            self.register_parameter("bias", None)
        self._sz_cache = None
        if not empty_init and not self.weight.is_meta:
            self.reset_parameters()
            self.settle()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, empty_init: bool = False) -> "QuantizedLinear":
        """Quantize `linear` (its bias Parameter is reused as it is); `empty_init` allocates without quantizing."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, bias=False, device=weight.device, empty_init=True)
        module.bias = linear.bias
        if not empty_init and not weight.is_meta:
            module.quantize_from(weight.detach())
        module.settle()
        return module

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, quantized (for weights a non-strict load did not provide)."""
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.quantize_from(w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def _prefers_cpu_form(self) -> bool:
        # PyTorch's int4 kernel needs the repacked order; the C++ extension reads THUDM's bytes as they are
        return self.bits == 4 and cpu_ext.extension() is None and cpu_pack.packable(self.out_features,
                                                                                     self.in_features)

    def packed_weight(self) -> PackedInt4:
        """The CPU form with the kernel's unit `scales_and_zeros` (built once; 3% of the packed bytes)."""
        if self._sz_cache is None or self._sz_cache.device != self.weight.device:
            self._sz_cache = cpu_pack.unit_scales_and_zeros(self.out_features, self.in_features,
                                                            device=self.weight.device)
        return PackedInt4(self.weight.detach(), self._sz_cache, cpu_pack.group_size(self.in_features))

    def forward(self, x: torch.Tensor, backend=None, with_bias: bool = True) -> torch.Tensor:
        from ..ops.quant_linear import quant_linear

        bias = self.bias if with_bias else None
        weight = self.weight.detach()
        if weight.dtype == torch.uint8:
            # The CPU form is read by the torch backend only; a Triton run forced on CPU tensors (the
            # interpreter) gets THUDM's bytes, converted for the call.
            if backend_mod.resolve("quant_linear", x.device, backend) == "torch":
                weight = self.packed_weight()
            else:
                weight = cpu_pack.unpack(weight)
        return quant_linear(x, weight, self.weight_scale.detach(), self.bits, bias, backend=backend)

    def extra_repr(self) -> str:
        form = "cpu-int4-packed" if self.weight.dtype == torch.uint8 else "thudm"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, weight={form}")


class QuantizedEmbedding(QuantizedWeightMixin, nn.Module):
    """Weight-only quantized `nn.Embedding` (THUDM's `quantize_embeddings`): rows of `q * scale`, in `dtype`.

    `weight` int8 `[num, dim]` / `[num, dim/2]` and `weight_scale` fp16 `[num]`;
    `forward(ids)` -> `[..., dim]` in `self.dtype` (the model dtype; it follows
    `model.to(dtype)`). Tied to a quantized LM head, the two share the same
    parameters, in the head's form.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, device=None, dtype=None,
                 empty_init: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_quantized(num_embeddings, embedding_dim, bits, device)
        # a zero-size buffer whose dtype is the model's: the dtype of the looked-up rows
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=dtype or torch.get_default_dtype(),
                                                          device=device), persistent=False)
        if not empty_init and not self.weight.is_meta:
            self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_marker.dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, empty_init: bool = False) -> "QuantizedEmbedding":
        weight = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits, device=weight.device,
                     dtype=weight.dtype, empty_init=True)
        if not empty_init and not weight.is_meta:
            module.quantize_from(weight.detach())
        return module

    def tie_to(self, head: QuantizedLinear) -> None:
        """Share `head`'s parameters (the tied LM head of ChatGLM)."""
        self.weight, self.weight_scale = head.weight, head.weight_scale

    def _shares_cpu_form(self) -> bool:
        return True

    def reset_parameters(self) -> None:
        w = torch.empty(self.num_embeddings, self.embedding_dim, device=self.weight.device)
        nn.init.normal_(w)
        self.quantize_from(w)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"QuantizedEmbedding takes integer ids, got {input_ids.dtype}")
        flat = input_ids.reshape(-1).to(self.weight.device)
        weight = self.weight.detach()
        ext = cpu_ext.extension() if weight.device.type == "cpu" and weight.dtype == torch.int8 else None
        if ext is not None and flat.numel() <= FEW_IDS:
            # a decode step's few ids: each row dequantized by the extension in one call (q * scale in fp32, as
            # below), instead of ~10 small ATen ops (0.3 ms of a step once the weights have swept the caches)
            rows = []
            for i in flat.tolist():
                if not 0 <= i < self.num_embeddings:
                    raise IndexError(f"QuantizedEmbedding: id {i} outside [0, {self.num_embeddings})")
                rows.append(ext.dequantize(weight, self.weight_scale, self.bits, i, i + 1))
            out = rows[0] if len(rows) == 1 else torch.cat(rows)
            return out.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        if weight.dtype == torch.uint8:
            q = cpu_pack.gather_rows(weight, flat)
        else:
            rows = weight.index_select(0, flat)
            q = unpack_int4(rows) if self.bits == 4 else rows
        out = q.float() * self.weight_scale.detach().index_select(0, flat).float()[:, None]
        return out.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def linear(module: nn.Module, x: torch.Tensor, backend=None, bias: bool = True) -> torch.Tensor:
    """`x @ W^T (+ b)` for an `nn.Linear` or a `QuantizedLinear`: the one place the model tells them apart."""
    if isinstance(module, QuantizedLinear):
        return module(x, backend=backend, with_bias=bias)
    if bias:
        return module(x)
    return F.linear(x, module.weight)


def linear_parts(module: nn.Module):
    """`(weight, scale, bias, bits)` as `ops.block_infer` takes them: an `nn.Linear` as (weight, None, bias, 0), a
    `QuantizedLinear` holding THUDM's bytes as (int8 weight, fp16 scale, bias, bits); None for another form (the
    repacked CPU int4 form used without the extension)."""
    # read from `_parameters` directly: this runs for every linear of every decode step, where each
    # `module.weight` (nn.Module.__getattr__) costs more than the lookup itself
    params = module._parameters
    if isinstance(module, QuantizedLinear):
        weight = params["weight"]
        if weight.dtype != torch.int8:
            return None
        return weight, params["weight_scale"], params["bias"], module.bits
    if isinstance(module, nn.Linear):
        return params["weight"], None, params["bias"], 0
    return None


def embedding_parts(module: nn.Module):
    """`(table, scale, bits, dtype)` as `ops.step_infer` takes an embedding: an `nn.Embedding` as (weight, None, 0,
    its dtype), a `QuantizedEmbedding` holding THUDM's bytes as (int8 weight, fp16 scale, bits, the model dtype);
    None for another form, or an `nn.Embedding` with `max_norm` (its lookup renormalises the table in place)."""
    params = module._parameters
    if isinstance(module, QuantizedEmbedding):
        weight = params["weight"]
        return None if weight.dtype != torch.int8 else (weight, params["weight_scale"], module.bits, module.dtype)
    if type(module) is nn.Embedding and module.max_norm is None:
        weight = params["weight"]
        return weight, None, 0, weight.dtype
    return None


def quantized_modules(model: nn.Module):
    """`(name, module)` of every quantized module in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantized_modules(model))
