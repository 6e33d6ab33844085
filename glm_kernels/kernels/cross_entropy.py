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
dtype): BLOCK_V = clamp(next_pow2(V), 16, 4096), num_warps =
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
from .common import TL_TYPE, CompileSpec, check_device, downcast

MIN_BLOCK_V = 16
MAX_BLOCK_V = 4096


def ce_config(vocab: int) -> dict:
    """BLOCK_V, num_warps, num_stages for rows of `vocab` logits (every dtype, with or without the gradient)."""
    if vocab < 1:
        raise ValueError(f"cross_entropy: vocabulary size {vocab} must be positive")
    block = min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), MAX_BLOCK_V)
    return {"BLOCK_V": block, "num_warps": min(8, max(1, block // 256)), "num_stages": 1}


@triton.jit
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
    _ce_rows_kernel[(rows,)](logits, labels, losses, vocab, logits.stride(0), float(scale),
                             COMPUTE_GRAD=compute_grad, BLOCK_V=cfg["BLOCK_V"],
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


@register("lm_loss", "triton")
def _lm_loss_triton(hidden, weight, labels, ignore_index, reduction, chunk_size):
    """`fused_linear_cross_entropy` with the per-chunk cross-entropy in `_ce_rows_kernel` (matmuls in torch)."""
    check_device(hidden, weight, labels)
    return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, cross_entropy_chunk)


def compile_specs() -> list[CompileSpec]:
    """Every (BLOCK_V, num_warps) `ce_config` can return (BLOCK_V = 16 .. 4096), fp16, bf16 and fp32 logits,
    with and without the gradient pass."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = TL_TYPE[dtype]
        sig = {"LOGITS": f"*{t}", "LABELS": "*i64", "LOSS": "*fp32", "n_cols": "i32", "stride_row": "i32",
               "scale": "fp32", "COMPUTE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
        block = MIN_BLOCK_V
        while block <= MAX_BLOCK_V:
            cfg = ce_config(block)
            for grad in (True, False):
                label = f"{t} BLOCK_V={cfg['BLOCK_V']} warps={cfg['num_warps']} {'grad' if grad else 'loss'}"
                specs.append(CompileSpec(_ce_rows_kernel, sig, dict(COMPUTE_GRAD=grad, BLOCK_V=cfg["BLOCK_V"]),
                                         cfg["num_warps"], cfg["num_stages"], label,
                                         extra={"dtype": dtype, "config": cfg, "grad": grad}))
            block *= 2
    return specs
