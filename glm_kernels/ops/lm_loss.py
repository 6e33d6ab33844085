"""LM head + cross-entropy without the full logits (op "lm_loss").

The original computes, for every position,

    logits = lm_head(hidden)                          # [N, V] in the model dtype
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)

which for ChatGLM-6B (V = 130528) holds `[N, V]` in the model dtype, its fp32
copy, the fp32 log-softmax and, in the backward, two more `[N, V]` gradients:
about 2 GB per 1024 tokens. `fused_linear_cross_entropy` gives the same loss
and gradients while holding one `[C, V]` chunk of rows at a time.

Per chunk of C rows (the idea of Liger-Kernel's FusedLinearCrossEntropy):

1. `logits = hidden[chunk] @ weight.T` in the model dtype (a torch matmul,
   cuBLAS on a GPU), rounded there as the original's `lm_head` is;
2. the logits are upcast to fp32 row by row; fused: log-sum-exp, the row loss
   `lse - z[label]`, and, when a gradient is needed, `d loss / d z =
   (softmax(z) - onehot(label)) * scale` written back over the logits in the
   model dtype (the cast the backward of `.float()` does). The torch backend
   does this with torch ops on the chunk; the triton backend with one kernel
   launch (`glm_kernels/kernels/cross_entropy.py`);
3. `grad_hidden[chunk] = grad_logits @ weight` in the model dtype, and, only
   when the head is trainable, `grad_weight += grad_logits.T @ hidden[chunk]`.

So the gradients are computed in the forward (no second matmul pass over
the vocabulary); the backward multiplies them by `grad_output` (skipped when
it is 1). `scale` is 1/(number of non-ignored rows) for `reduction="mean"`
and 1 for `"sum"`, applied before the cast to the model dtype as in the
original; a `grad_output` other than 1 is applied after it (one more
rounding in fp16/bf16, none in fp32).

Rows whose label is `ignore_index` have zero loss and zero gradient: they are
dropped before the matmul (their `grad_hidden` rows are zeros).

The head's gradient, when the head requires grad, is accumulated over chunks
in fp32 and cast once at the end, as one unchunked matmul rounds it once:
`[V, h]` fp32 (2.1 GB for 6B) plus the final cast. A frozen head (P-Tuning)
computes and allocates nothing of size `[V, h]`.

Default chunk size (`default_chunk_size`): the largest C with the fp32
`[C, V]` chunk within a byte budget, at least 1, at most the number of rows.
The budget is 64 MiB on GPUs (128 rows for V = 130528: cuBLAS is efficient
there already) and 256 MiB on the CPU (514 rows), where a matmul of 128 rows
costs about 1.4x per row what 512 rows cost (measured on the 2-core CPU
machine: fp32 loss+backward of 512 x 2048 x 130528 took 13.1 s in chunks of
128, 9.6 s in one chunk of 512, as much as the unfused original).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backend import dispatch, register

CHUNK_BYTES = 64 * 2**20  # GPUs
CPU_CHUNK_BYTES = 256 * 2**20  # CPUs: larger matmuls pay off, memory is plentiful
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum")

# process(logits [c, V] model dtype, labels [c] int64 in [0, V), losses [c] fp32, scale, compute_grad):
# writes each row's loss into `losses`; with compute_grad, overwrites `logits` with the gradient.
ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], None]


def default_chunk_size(n_rows: int, vocab: int, device_type: str = "cuda") -> int:
    """Rows per chunk: the fp32 `[C, vocab]` buffer within the device's budget, between 1 and n_rows.

    128 rows at V = 130528 on a GPU (CHUNK_BYTES), 514 on the CPU (CPU_CHUNK_BYTES).
    """
    budget = CPU_CHUNK_BYTES if device_type == "cpu" else CHUNK_BYTES
    return max(1, min(max(n_rows, 1), budget // (4 * vocab)))


def check_inputs(hidden, weight, labels, ignore_index, reduction, chunk_size) -> None:
    """Raise ValueError naming the argument for any input the op does not take."""
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 2):
        raise ValueError(f"fused_linear_cross_entropy: hidden must be [N, h]; got shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden.shape[1]):
        raise ValueError(f"fused_linear_cross_entropy: weight must be [V, h] with h = {hidden.shape[1]} "
                         f"(hidden {tuple(hidden.shape)}); got weight {tuple(getattr(weight, 'shape', ()))}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden and weight must have the same dtype, fp32, fp16 or "
                         f"bf16; got hidden {hidden.dtype} {tuple(hidden.shape)}, weight {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if not (isinstance(labels, torch.Tensor) and tuple(labels.shape) == (hidden.shape[0],)):
        raise ValueError(f"fused_linear_cross_entropy: labels must be [N] = [{hidden.shape[0]}] (hidden "
                         f"{tuple(hidden.shape)}); got labels {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"fused_linear_cross_entropy: labels must be integers (int64); got labels {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"fused_linear_cross_entropy: hidden ({hidden.device}), weight ({weight.device}) and "
                         f"labels ({labels.device}) must be on one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be a positive int or None; got {chunk_size!r}")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: labels must be in [0, {vocab}) (weight {tuple(weight.shape)}) "
                         f"or ignore_index={ignore_index}; labels[{first}] = {int(labels[first])}")


def _accumulate_grad_weight(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, h] fp32 (or the model dtype when that is fp32) += grad_logits.T @ hidden, fp32 accumulation.

    fp16/bf16 on CUDA: cuBLAS writes the fp32 sum directly (`out_dtype`). Elsewhere the operands are upcast;
    products of fp16/bf16 numbers are exact in fp32, so this is the same arithmetic.
    """
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    elif acc.device.type == "cuda":
        torch.addmm(acc, grad_logits.t(), hidden, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(grad_logits.t().float(), hidden.float())


def chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, process: ChunkFn,
                                 need_hidden_grad: bool, need_weight_grad: bool):
    """(loss fp32 scalar, grad_hidden [N, h] or None, grad_weight [V, h] or None) for grad_output = 1.

    The chunk loop shared by the backends; `process` is the backend's per-chunk cross-entropy (see ChunkFn).
    Largest buffers: one `[C, V]` logits chunk in the model dtype (reused by every chunk), plus what `process`
    needs per chunk (the torch backend: an fp32 `[C, V]` copy in fp16/bf16), plus the `[V, h]` fp32
    accumulator when the head's gradient is wanted.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    labels = labels.long()
    keep = labels != ignore_index
    count = int(keep.sum())
    rows = None
    if count < n:  # ignored rows: zero loss, zero gradient; only the others enter the matmul
        rows = keep.nonzero().squeeze(1)
        hidden_kept, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    else:
        hidden_kept = hidden
    scale = (1.0 / count if count else 0.0) if reduction == "mean" else 1.0
    compute_grad = need_hidden_grad or need_weight_grad
    chunk = min(chunk_size or default_chunk_size(count, vocab, hidden.device.type), max(count, 1))
    losses = torch.empty(count, dtype=torch.float32, device=hidden.device)
    grad_kept = torch.empty_like(hidden_kept, memory_format=torch.contiguous_format) if need_hidden_grad else None
    acc = None
    if need_weight_grad:
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    buffer = torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device) if count else None
    for start in range(0, count, chunk):
        end = min(start + chunk, count)
        logits = buffer[: end - start]
        torch.mm(hidden_kept[start:end], weight.t(), out=logits)
        process(logits, labels[start:end], losses[start:end], scale, compute_grad)
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_kept[start:end])
        if need_weight_grad:
            _accumulate_grad_weight(acc, logits, hidden_kept[start:end])
    del buffer
    total = losses.sum()
    loss = total / count if reduction == "mean" else total  # mean over no rows: 0 / 0 = NaN, as PyTorch gives
    grad_hidden = grad_kept
    if need_hidden_grad and rows is not None:
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        grad_hidden.index_copy_(0, rows, grad_kept)
    grad_weight = None
    if need_weight_grad:
        grad_weight = acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the chunk loop with the gradients (for grad_output = 1); backward: scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, process, need_hidden_grad,
                need_weight_grad):
        loss, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, labels, ignore_index, reduction, chunk_size, process, need_hidden_grad,
            need_weight_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if bool(grad_output != 1):
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, process: ChunkFn):
    """Run the chunk loop with `process`, through autograd when a gradient is wanted, else without gradient work."""
    grad_on = torch.is_grad_enabled()
    need_hidden_grad = grad_on and hidden.requires_grad
    need_weight_grad = grad_on and weight.requires_grad
    if not (need_hidden_grad or need_weight_grad):
        return chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size, process,
                                            False, False)[0]
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk_size, process,
                                     need_hidden_grad, need_weight_grad)


def _cross_entropy_chunk_torch(logits, labels, losses, scale, compute_grad):
    """Torch ops on one chunk: `logits [c, V]` (model dtype) -> row losses, and the gradient in place.

    fp32 work buffer `z` (the chunk itself in fp32, else one fp32 copy), changed in place: z - max, exp, softmax.
    """
    z = logits.float()
    zmax = z.amax(dim=1, keepdim=True)
    z.sub_(zmax)
    target = z.gather(1, labels[:, None]).squeeze(1)  # z[label] - max
    z.exp_()
    sumexp = z.sum(dim=1)
    losses.copy_(sumexp.log() - target)  # lse - z[label]
    if compute_grad:
        z.div_(sumexp[:, None])
        z.scatter_add_(1, labels[:, None], torch.full_like(target[:, None], -1.0))
        z.mul_(scale)
        if z is not logits:
            logits.copy_(z)


@register("lm_loss", "torch")
def _lm_loss_torch(hidden, weight, labels, ignore_index, reduction, chunk_size):
    """`fused_linear_cross_entropy` with the per-chunk cross-entropy in torch ops (the CPU path)."""
    return linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                _cross_entropy_chunk_torch)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                               backend: str | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index, reduction)` without `[N, V]` logits.

    Args:
        hidden: `[N, h]` fp32 / fp16 / bf16 (the final LayerNorm output, rows = tokens).
        weight: `[V, h]` the LM head (no bias), same dtype and device as hidden.
        labels: `[N]` integers (int64) in `[0, V)`, or `ignore_index` for rows without a loss.
        ignore_index: label value of ignored rows (-100, as the original).
        reduction: "mean" (over non-ignored rows; NaN when every row is ignored, as PyTorch) or "sum".
        chunk_size: rows per chunk; None: `default_chunk_size` (the fp32 `[C, V]` chunk within 64 MiB on a
            GPU, 256 MiB on the CPU).
        backend: "torch" or "triton" (see `glm_kernels.backend`); None chooses by device.
    Returns:
        fp32 scalar. Differentiable w.r.t. hidden, and w.r.t. weight when `weight.requires_grad` (otherwise no
        `[V, h]` gradient is computed or allocated). Logits are computed in the model dtype, upcast to fp32 for
        the log-softmax; d loss / d logits is cast to the model dtype before the two backward matmuls, as the
        original's autograd does. Raises ValueError on shapes, dtypes or labels the op does not take.
    """
    check_inputs(hidden, weight, labels, ignore_index, reduction, chunk_size)
    return dispatch("lm_loss", hidden.device, backend)(hidden, weight, labels, ignore_index, reduction, chunk_size)
