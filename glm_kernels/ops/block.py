"""One GLM block of CPU inference over a KV cache in a single call (`glm_kernels._C`'s `block_infer`).

A decoded token runs ~40 small Python calls per block (module calls, backend dispatch, argument checks) around
the products; on the CPU that is ~0.15 ms per block, 7% of an INT4 token of the benchmark model. `block_infer`
runs the same operators in C++ in the same order (csrc/block_cpu.cpp): the residual joins, the LayerNorms, the
four products (the extension's `linear` for THUDM's INT8/INT4 bytes, `at::linear` for float weights),
`rope_qkv` writing the cache, `attention_few`, the bias + GeLU. Its results are bitwise those of the block run
op by op (tests/test_block_infer.py), so the model takes it whenever the call is one the op-by-op path would run
on exactly those operators, and otherwise runs op by op.

`layers_infer` runs every block of a forward in one call (`_C.layers_infer`: the same C++ block, layer after
layer, the cache views cut in C++), which also saves each block's module call; the model takes it when every
block would take `block_infer` and none is hooked, else it calls the blocks one by one.

`step_infer` runs a whole decoding step of `ChatGLMForConditionalGeneration` in one call (`_C.step_infer`:
embeddings, `layers_infer`, final LayerNorm, LM head); the model takes it for the steps after the prompt
(`ChatGLMForConditionalGeneration._one_call_step` says when), bitwise its forward. Its arguments that stay the
same from step to step (`step_args`: every weight and cache buffer) are gathered once and kept by the model
(glm_kernels/step_plan.py) for as long as they hold.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backend as backend_mod
from .. import cpu_ext
from .attention import FEW_ROWS
from .mask import GLMMask
from .quant_linear import EXTENSION_MAX_ROWS
from .rotary import FEW_TOKENS

# Tests turn these off to compare against the op-by-op path (ENABLED), the one-call-per-block path (ALL_LAYERS:
# every block in one call when the model's blocks all take it) and the model's forward around the blocks
# (WHOLE_STEP: a decoding step of ChatGLMForConditionalGeneration in one call).
ENABLED = True
ALL_LAYERS = True
WHOLE_STEP = True


def _takes(ext, s: int, b: int, dtype, device, backend) -> bool:
    """What a one-call block needs of the call (hidden `[s, b, h]` of `dtype` on `device`): the extension, CPU
    tensors, at most as many rows as the extension's product, `rope_qkv` and `attention_few` each take (`s * b`
    and `s`), the torch backend."""
    if not ENABLED or ext is None or device.type != "cpu":
        return False
    if s > FEW_ROWS or s * b > min(FEW_TOKENS, EXTENSION_MAX_ROWS.get(dtype, 0)):
        return False
    # on the CPU every op of the block resolves alike: torch unless a backend is requested explicitly
    return backend_mod.resolve("attention", device, backend) == "torch"


def block_infer(hidden, residual, alpha: float, eps: float, norms, linears, position_ids, rotary, num_heads: int,
                slots, mask, backend=None):
    """The block's `(m, mlp(m))` in one call, or None when this call is not one it takes.

    Args:
        hidden, residual: `[s, b, h]` (residual None for the first block); the block input is
            `hidden * alpha + residual`.
        norms: `(ln_in.weight, ln_in.bias, ln_post.weight, ln_post.bias)`.
        linears: four `(weight, scale, bias, bits)` (query_key_value, dense, dense_h_to_4h, dense_4h_to_h): a
            float weight with scale None and bits 0, or THUDM's int8 bytes, fp16 row scale, bits 8 or 4; None
            for a linear in another form (the call is then not taken).
        position_ids: `[b, 2, s]`; rotary: `(cos, sin)` tables in hidden's dtype.
        slots: the cache's `(k_out, v_out, k_all, v_all)` views for this layer (`GLMKVCache.slots`).
        mask: None, a bool `[b or 1, 1, s, sk]` mask or a `GLMMask`.
    Taken when: the extension is built, everything is on the CPU, the backend is torch (automatic or
    requested), at most as many rows as the extension's product, `rope_qkv` and `attention_few` each take
    (`s * b` and `s`), and nothing needs a gradient.
    """
    ext = cpu_ext.extension()
    if any(p is None for p in linears) or not _takes(ext, *hidden.shape[:2], hidden.dtype, hidden.device, backend):
        return None
    s = hidden.shape[0]
    k_out, v_out, k_all, v_all = slots
    if torch.is_grad_enabled() and _needs_grad(hidden, residual, k_all, v_all, *norms,
                                                *(t for parts in linears for t in parts[:3])):
        return None
    if isinstance(mask, GLMMask):
        mask = mask.dense(s, k_all.shape[0])
    weights, scales, biases, bits = zip(*linears)
    return ext.block_infer(hidden, residual, alpha, eps, list(norms), list(weights), list(scales), list(biases),
                           list(bits), position_ids, rotary[0], rotary[1], num_heads, k_out, v_out, k_all, v_all,
                           mask)


def layers_infer(hidden, blocks, alpha: float, position_ids, rotary, num_heads: int, cache, mask, backend=None):
    """Every block of the model in one call (`_C.layers_infer`): the last block's `(m, mlp)`, or None when the
    call is not one every block would take in `block_infer` (then the model calls its blocks one by one).

    Args:
        hidden: `[s, b, h]`, the first block's input (no residual yet).
        blocks: per layer `(eps, norms, linears)` as `block_infer` takes them (`GLMBlock.infer_parts()`), or
            None for a block with a hooked submodule (the call is then not taken).
        position_ids, rotary, num_heads, mask: as for `block_infer`, the same for every layer.
        cache: the `GLMKVCache` (every layer on the CPU); the new positions go to `[filled, filled + s)`.
    Its results are bitwise those of the blocks called one by one (the same C++ block, layer after layer); it
    saves the Python of each block call (~0.1 ms per layer of a decode step once the weights have swept the
    caches).
    """
    args = _layers_args(*hidden.shape[:2], hidden.dtype, hidden.device, blocks, alpha, position_ids, rotary,
                        num_heads, cache, mask, backend, (hidden,))
    return None if args is None else cpu_ext.extension().layers_infer(hidden, *args)


class StepArgs(NamedTuple):
    """What `_C.step_infer` takes that stays the same from one decoding step to the next (`step_args`): the
    arguments before the positions, those between the positions and the start, and those after the mask."""
    before: tuple  # embedding (table, scale, bits, dtype), alpha, eps, norms, weights, scales, biases, bits
    between: tuple  # cos, sin, num_heads, keys, values (each layer's [capacity, b, nh, hd] cache buffers)
    after: tuple  # the final LayerNorm's weight, bias and eps, the head's weight, scale and bits
    dtype: torch.dtype  # the model's: of the embeddings, every float weight and the cache
    num_layers: int


def step_args(embedding, blocks, alpha: float, rotary, num_heads: int, cache, final_norm, head, backend=None):
    """The arguments of a CPU decoding step in one call (`step_infer`) that do not change from one step to the
    next, or None when a step of this model and cache is not one it takes (then the model runs its forward).

    Args:
        embedding: `(table, scale, bits, dtype)`: an `nn.Embedding`'s weight with None, 0 and its dtype, or a
            `QuantizedEmbedding`'s THUDM bytes, fp16 scale, bits and the dtype of its rows (the model's).
        blocks: per layer `(eps, norms, linears)` (`GLMBlock.infer_parts()`), None for a hooked block.
        rotary: the `(cos, sin)` tables in that dtype; num_heads: the attention heads.
        cache: the `GLMKVCache` (every layer on the CPU) whose buffers the step writes.
        final_norm: `(weight, bias, eps)` of the final LayerNorm.
        head: the LM head's `(weight, scale, bias, bits)` (`quant.modules.linear_parts`) without a bias, or None
            for a head in another form.
    Taken when every block would take `block_infer` (the extension, every linear in a form it takes, one eps,
    the torch backend) with the tables on the CPU. Devices, dtypes and gradients are checked again by every
    step (`_C.step_infer` declines, before it writes anything, a tensor that moved or needs a gradient).
    """
    table, table_scale, table_bits, dtype = embedding
    if cpu_ext.extension() is None or head is None or head[2] is not None or not blocks or \
            any(blk is None for blk in blocks) or backend_mod.resolve("attention", "cpu", backend) != "torch":
        return None
    tables = (table, table_scale, head[0], head[1], *final_norm[:2])
    flat = _flat_blocks(blocks, cache)
    if flat is None or any(t is not None and t.device.type != "cpu" for t in tables):
        return None
    eps, norms, weights, scales, biases, bits, keys, values = flat
    return StepArgs((table, table_scale, table_bits, dtype, alpha, eps, norms, weights, scales, biases, bits),
                    (rotary[0], rotary[1], num_heads, keys, values),
                    (*final_norm, head[0], head[1], head[3]), dtype, len(blocks))


def step_infer(args: StepArgs, input_ids, position_ids, start: int, mask, limits=None):
    """The logits `[b, s, vocab]` of a whole forward of `ChatGLMForConditionalGeneration` in one call
    (`_C.step_infer`: embeddings, every block, final LayerNorm, LM head), or None when the call is not one it
    takes (then the model runs its forward, and nothing has been written).

    Args:
        args: `step_args(...)` of the model and cache.
        input_ids: `[b, s]` integer ids on the CPU; position_ids: `[b, 2, s]`.
        start: the cache position of the first new token (`cache.filled`).
        mask: None, a bool `[b or 1, 1, s, start + s]` mask or a `GLMMask`.
        limits: `(vocab_size, max_sequence_length)` to check the ids and positions against (the forward's
            `ValueError`s), or None not to check them.
    Declined: more rows than the extension's product, `rope_qkv` and `attention_few` each take, or a tensor the
    step reads that is no longer on the CPU in the model's dtype, or that needs a gradient with gradients on.
    Its logits are bitwise those of the model's forward (the same operators in the same order); it saves the
    model-level Python of a decode step (docs/quantization.md).
    """
    b, s = input_ids.shape
    if not (ENABLED and ALL_LAYERS and WHOLE_STEP) or s > FEW_ROWS or \
            s * b > min(FEW_TOKENS, EXTENSION_MAX_ROWS.get(args.dtype, 0)):
        return None
    if isinstance(mask, GLMMask):
        mask = mask.dense(s, start + s)
    vocab, positions = limits if limits is not None else (0, 0)
    try:
        return cpu_ext.extension().step_infer(input_ids, *args.before, position_ids, *args.between, start, mask,
                                              *args.after, vocab, positions)
    except NotImplementedError:  # _C.step_infer declines before it writes anything
        return None


def _layers_args(s: int, b: int, dtype, device, blocks, alpha, position_ids, rotary, num_heads, cache, mask,
                 backend, inputs):
    """`layers_infer`'s arguments after `hidden` (`[s, b, h]` of `dtype` on `device`), or None when the call is
    not one every block would take (`inputs`: the call's other tensors, which must not need a gradient)."""
    ext = cpu_ext.extension()
    if not ALL_LAYERS or not blocks or any(blk is None for blk in blocks) or \
            not _takes(ext, s, b, dtype, device, backend):
        return None
    flat = _flat_blocks(blocks, cache)
    if flat is None:
        return None
    eps, norms, weights, scales, biases, bits, keys, values = flat
    if torch.is_grad_enabled() and _needs_grad(*inputs, *keys, *values, *norms, *weights, *scales, *biases):
        return None
    start = cache.filled
    if isinstance(mask, GLMMask):
        mask = mask.dense(s, start + s)
    return (alpha, eps, norms, weights, scales, biases, bits, position_ids, rotary[0], rotary[1], num_heads, keys,
            values, start, mask)


def _flat_blocks(blocks, cache):
    """`(eps, norms, weights, scales, biases, bits, keys, values)`: the blocks' shared eps, their parts as flat
    lists (four per layer) and each layer's `[capacity, b, nh, hd]` cache buffers; or None unless every block
    shares one eps and holds every linear in a form the C++ block takes, on the CPU (not meta, not offloaded)."""
    eps = blocks[0][0]
    if any(e != eps or any(p is None or p[0].device.type != "cpu" for p in linears) for e, _, linears in blocks):
        return None
    keys, values = zip(*(cache.seq_view(i) for i in range(len(blocks))))
    norms = [t for _, layer_norms, _ in blocks for t in layer_norms]
    weights, scales, biases, bits = zip(*(parts for _, _, linears in blocks for parts in linears))
    return eps, norms, list(weights), list(scales), list(biases), list(bits), list(keys), list(values)


def _needs_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)
