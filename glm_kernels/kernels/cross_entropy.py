"""Cross-entropy over one chunk of LM-head logits, in place, as a Triton kernel (op "lm_loss", triton backend).

`fused_linear_cross_entropy` (`glm_kernels/ops/lm_loss.py`) walks the tokens
in chunks of C rows; the two matmuls per chunk (`logits = hidden @ weight.T`
and `grad_hidden = grad_logits @ weight`) stay torch (cuBLAS). Between them
`_ce_rows_kernel` processes the chunk `[C, V]` (model dtype, contiguous rows)
row by row, one program per row:

    pass 1: online max m and sum s = sum(exp(z - m)) over the vocabulary in
            BLOCK_V-wide blocks (z the logits upcast to fp32, s rescaled when
            m grows); loss = m + log(s) - z[label], stored in fp32;
    pass 2 (only when a gradient is wanted): reads the row again and writes
            (exp(z - m) / s - onehot(label)) * scale over the logits, cast to
            the model dtype (the cast the backward of `.float()` does).

The autograd.Function and the chunk loop are shared with the torch backend
(`ops.lm_loss.linear_cross_entropy`); this module supplies the per-chunk
step `cross_entropy_chunk`. Labels reaching the kernel are in [0, V): the
loop drops rows with `ignore_index` before the matmul.

Launch configuration (`ce_config`, a function of V only, the same for every
dtype): BLOCK_V = clamp(next_pow2(V), 1024, 4096), num_warps =
clamp(BLOCK_V / 256, 1, 8) (8 elements per thread up to BLOCK_V = 2048, 16 at
4096), one stage. Grid: C programs. `compile_specs()` lists every
(BLOCK_V, num_warps) for fp16, bf16 and fp32, with and without the gradient
pass.

Bytes per launch (C rows, V columns, element size e), all programs:
    loss only:     reads C*V*e + C*(8 + e) (row, label, z[label]), writes 4*C
    with gradient: reads 2*C*V*e + C*(8 + e), writes C*V*e + 4*C
The gradient pass re-reads the row (V*e = 261 KB in fp16 at V = 130528, an
L2 hit on A100/H100 for the rows in flight) because a row of the vocabulary
does not fit in one program's registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register
from ..ops.lm_loss import linear_cross_entropy
from ..backend import TARGETS, DeviceInfo, assume_device
from .common import (DTYPES, TL_TYPE, CompileSpec, aligned, check_device, downcast, launch, meta, record_launches,
                     row_stride, specs_from_launches, tensor_dtype)

MIN_BLOCK_V = 1024  # smaller vocabularies (toy models) are masked: no configurations of their own
MAX_BLOCK_V = 4096


def ce_config(vocab: int) -> dict:
    """BLOCK_V, num_warps, num_stages for rows of `vocab` logits (every dtype, with or without the gradient)."""
    if vocab < 1:
        raise ValueError(f"cross_entropy: vocabulary size {vocab} must be positive")
    block = min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V)
    return {"BLOCK_V": block, "num_warps": min(8, max(1, block // 256)), "num_stages": 1}


@triton.jit(do_not_specialize=["LABELS", "LOSS"])  # one scalar per row: alignment facts buy nothing
def _ce_rows_kernel(LOGITS, LABELS, LOSS, n_cols, stride_row, scale,
                    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row `program_id`: LOSS[row] = logsumexp(z) - z[label] (fp32, z = LOGITS[row].float());
    with COMPUTE_GRAD, LOGITS[row] = ((softmax(z) - onehot(label)) * scale) in the LOGITS dtype."""
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))  # finite: every block has a column < n_cols
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
    target = tl.load(base + label).to(tl.float32)
    tl.store(LOSS + row, run_max + tl.log(run_sum) - target)
    if COMPUTE_GRAD:
        inv_sum = 1.0 / run_sum
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            ok = cols < n_cols
            z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
            grad = (tl.exp(z - run_max) * inv_sum - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(base + cols, downcast(grad, LOGITS.dtype.element_ty), mask=ok)


def cross_entropy_chunk(logits, labels, losses, scale, compute_grad):
    """One launch of `_ce_rows_kernel` on a chunk: logits `[c, V]` fp32/fp16/bf16 with unit column stride,
    labels `[c]` int64 in [0, V), losses `[c]` fp32 (written); with compute_grad the logits are overwritten by
    `(softmax - onehot) * scale` in their dtype."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    cfg = ce_config(vocab)
    launch(_ce_rows_kernel, (rows,), aligned(logits), labels, losses, vocab, row_stride(logits), float(scale),
           COMPUTE_GRAD=compute_grad, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


@register("lm_loss", "triton")
def _lm_loss_triton(hidden, weight, labels, ignore_index, reduction, chunk_size):
    """`fused_linear_cross_entropy` with the per-chunk cross-entropy in `_ce_rows_kernel` (matmuls in torch)."""
    check_device(hidden, weight, labels)
    return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, cross_entropy_chunk)


def compile_specs(target: DeviceInfo | None = None) -> list[CompileSpec]:
    """Every (BLOCK_V, num_warps) `ce_config` can return (BLOCK_V = 16 .. 4096, the same on every GPU), fp16,
    bf16 and fp32 logits, with and without the gradient pass, recorded from `cross_entropy_chunk` on meta
    tensors with vocabularies 16-divisible and not (the chunk's row stride is the vocabulary)."""
    with assume_device(target or TARGETS[80]), record_launches() as launches:
        for dtype in DTYPES:
            block = MIN_BLOCK_V
            while block <= MAX_BLOCK_V:
                for vocab in sorted({block, block - 1, 130528 if block == MAX_BLOCK_V else block}):
                    if ce_config(vocab)["BLOCK_V"] != block:
                        continue
                    for grad in (True, False):
                        cross_entropy_chunk(meta(4, vocab, dtype=dtype), meta(4, dtype=torch.long),
                                            meta(4, dtype=torch.float32), 0.25, grad)
                block *= 2

    def label(ln, consts):
        return (f"{TL_TYPE[tensor_dtype(ln)]} BLOCK_V={consts['BLOCK_V']} warps={ln.kwargs['num_warps']} "
                f"{'grad' if consts['COMPUTE_GRAD'] else 'loss'}")

    def extra(ln):
        return {"dtype": tensor_dtype(ln), "config": ce_config(ln.arg("n_cols")), "grad": ln.kwargs["COMPUTE_GRAD"]}

    return specs_from_launches(launches, label, extra)
