"""Fused LM head + cross-entropy (glm_kernels/ops/lm_loss.py, kernels/cross_entropy.py), torch and Triton backends.

Against the unfused original: `F.cross_entropy(F.linear(hidden, weight).float(), labels, ...)`, loss and the
gradients w.r.t. hidden (and weight when it is trainable). GLM_SPEC.md "Tolerances for parity tests", fused LM
head + cross-entropy: fp32 with the model rule 1e-4 * max|ref| against the reference in fp32; fp16/bf16 with the
low-precision rule (error against the fp32 reference <= 2 x the low-dtype reference's own error + 1e-3 * scale).
The Triton backend runs on the interpreter (TRITON_INTERPRET=1, tests/conftest.py): shapes stay small.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from glm_kernels import backend, ops
from glm_kernels.kernels import cross_entropy as ce
from glm_kernels.ops import lm_loss
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close

N, H, V = 64, 48, 300
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(n=N, h=H, v=V, dtype=torch.float32, ignored_every=5, seed=0):
    """hidden [n, h], weight [v, h] (logits of spread ~3), labels [n] with every `ignored_every`-th row -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = 3 * torch.randn(v, h, generator=g) / math.sqrt(h)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignored_every:
        labels[::ignored_every] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def reference_loss(hidden, weight, labels, ignore_index=-100, reduction="mean", **_):
    """The original: logits in the model dtype, upcast to fp32, cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index, reduction=reduction)


def _run(fn, hidden, weight, labels, train_head=False, **kw):
    """{"loss", "dhidden"[, "dweight"]} of fn(hidden, weight, labels, **kw) after loss.backward()."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_head)
    loss = fn(h, w, labels, **kw)
    out = {"loss": loss.detach()}
    loss.backward()
    out["dhidden"] = h.grad
    if train_head:
        out["dweight"] = w.grad
    else:
        assert w.grad is None
    return out


def _fused(backend_name):
    def fn(hidden, weight, labels, **kw):
        return ops.fused_linear_cross_entropy(hidden, weight, labels, backend=backend_name, **kw)
    return fn


def _compare(backend_name, dtype, train_head=False, **kw):
    """Run the fused op and the reference on the same inputs and assert the GLM_SPEC rule for each output."""
    inputs = _inputs(dtype=dtype, **kw.pop("shape", {}))
    out = _run(_fused(backend_name), *inputs, train_head=train_head, **kw)
    assert out["loss"].dtype == torch.float32 and out["loss"].shape == ()
    ref32 = _run(reference_loss, inputs[0].float(), inputs[1].float(), inputs[2], train_head=train_head, **kw)
    what = f"{backend_name} {dtype} {kw}"
    if dtype == torch.float32:
        for k in ref32:
            assert_fp32_close(out[k], ref32[k], 1e-4, f"{k} {what}")  # fp32 model rule: 1e-4 * max|ref|
    else:
        ref_lowp = _run(reference_loss, *inputs, train_head=train_head, **kw)
        for k in ref32:
            assert out[k].dtype == ref_lowp[k].dtype
            assert_lowp_close(out[k], ref_lowp[k], ref32[k], f"{k} {what}")  # 2 x low-dtype ref error + 1e-3 * scale
    return out


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_matches_unfused_frozen_head(backend_name, dtype, chunk_size, reduction):
    # 64 rows, 13 ignored: 51 kept rows in chunks of 7 (the last of 2) or 16 (the last of 3), or one chunk
    _compare(backend_name, dtype, chunk_size=chunk_size, reduction=reduction)


@pytest.mark.parametrize("chunk_size", [5, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_matches_unfused_trainable_head(backend_name, dtype, chunk_size):
    # the head's gradient accumulated over 11 chunks (fp32 accumulator) or computed in one
    _compare(backend_name, dtype, train_head=True, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_vocabulary_in_several_blocks(monkeypatch, dtype):
    # BLOCK_V = 64: the online max / sum-exp runs over 5 blocks of the 300 logits, the last one partial
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 64)
    assert ce.ce_config(V)["BLOCK_V"] == 64
    _compare("triton", dtype, train_head=True, chunk_size=16)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_ignored_rows_and_one_row_chunks(backend_name):
    _compare(backend_name, torch.float32, chunk_size=1, shape=dict(n=9, ignored_every=0))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_grad_output_scales_the_gradients(backend_name):
    hidden, weight, labels = _inputs()
    out = _run(lambda *a, **k: 2.5 * _fused(backend_name)(*a, **k), hidden, weight, labels, train_head=True,
               chunk_size=16)
    ref = _run(lambda *a, **k: 2.5 * reference_loss(*a, **k), hidden, weight, labels, train_head=True)
    for k in ref:
        assert_fp32_close(out[k], ref[k], 1e-4, k)  # fp32 model rule


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_all_rows_ignored(backend_name, reduction):
    hidden, weight, _ = _inputs(n=6)
    labels = torch.full((6,), -100)
    out = _run(_fused(backend_name), hidden, weight, labels, train_head=True, reduction=reduction)
    ref = _run(reference_loss, hidden, weight, labels, train_head=True, reduction=reduction)
    if reduction == "mean":  # 0 / 0, as PyTorch gives
        assert torch.isnan(out["loss"]) and torch.isnan(ref["loss"])
    else:
        assert out["loss"] == 0 and ref["loss"] == 0
    for k in ("dhidden", "dweight"):
        assert torch.equal(out[k], ref[k]) and not out[k].any()  # exact: every gradient is zero


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_other_ignore_index_and_int32_labels(backend_name):
    hidden, weight, labels = _inputs(ignored_every=0)
    labels[::3] = 7  # label 7 is the ignored value here
    out = _run(_fused(backend_name), hidden, weight, labels.int(), ignore_index=7, chunk_size=10)
    ref = _run(reference_loss, hidden, weight, labels, ignore_index=7)
    for k in ref:
        assert_fp32_close(out[k], ref[k], 1e-4, k)  # fp32 model rule


def test_torch_and_triton_backends_agree():
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    a = _run(_fused("torch"), hidden, weight, labels, train_head=True, chunk_size=16)
    b = _run(_fused("triton"), hidden, weight, labels, train_head=True, chunk_size=16)
    for k in a:
        # same arithmetic, fp32 sums in another order: at most one bf16 rounding step apart (2^-8 of the scale)
        assert_fp32_close(b[k], a[k], 2**-8, k)


# ---------------------------------------------------------------- memory and gradient work


class AllocationLog(TorchDispatchMode):
    """Records every aten op and the tensors it allocates (outputs whose storage none of its inputs owns)."""

    def __init__(self):
        super().__init__()
        self.ops, self.allocated = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append((func, [tuple(t.shape) for t in outputs]))
        for t in outputs:
            if t.untyped_storage().data_ptr() not in inputs and t.untyped_storage().nbytes():
                self.allocated.append((func, tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return out

    def calls(self, name):
        return [shapes for func, shapes in self.ops if func.__name__.startswith(name)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_full_logits_never_materialised(backend_name, dtype):
    # N*V = 19200 logits; chunks of C = 16 rows: nothing allocated, forward or backward, holds more than C*V
    # values (fp32 at most: the torch path's fp32 copy of the chunk), and no [V, h] tensor (frozen head, V*h = 14400)
    chunk = 16
    hidden, weight, labels = _inputs(dtype=dtype)
    h = hidden.clone().requires_grad_()
    with AllocationLog() as log:
        loss = ops.fused_linear_cross_entropy(h, weight, labels, chunk_size=chunk, backend=backend_name)
        loss.backward()
    assert log.allocated
    largest = max(nbytes for *_, nbytes in log.allocated)
    assert largest <= chunk * V * 4, sorted(log.allocated, key=lambda a: -a[-1])[:3]
    assert not [a for a in log.allocated if a[1] == (V, H) or a[1] == (N, V)]
    # the matmuls: per chunk of c <= C kept rows, logits [c, V] and grad_hidden [c, h]; nothing else
    kept = int((labels != -100).sum())
    mm = [shape for shapes in log.calls("mm") for shape in shapes]
    assert sorted(mm) == sorted([(min(chunk, kept - s), V) for s in range(0, kept, chunk)] +
                                [(min(chunk, kept - s), H) for s in range(0, kept, chunk)])
    # the [C, V] logits buffer is allocated once and reused by every chunk
    assert sum(1 for _, shape, dt, _ in log.allocated if shape == (chunk, V) and dt == dtype) == 1


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_trainable_head_only_allocates_its_gradient(backend_name):
    # a trainable head adds the [V, h] gradient (an fp32 accumulator and its bf16 cast) and nothing [N, V]
    chunk = 16
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with AllocationLog() as log:
        ops.fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, backend=backend_name).backward()
    big = {(shape, dt) for _, shape, dt, nbytes in log.allocated if nbytes > chunk * V * 4}
    assert big == {((V, H), torch.float32), ((V, H), torch.bfloat16)}
    assert w.grad.shape == (V, H) and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_gradient_work_without_grad(backend_name):
    hidden, weight, labels = _inputs()
    chunks = -(-int((labels != -100).sum()) // 16)
    cases = {"no_grad": (True, torch.no_grad), "nothing requires grad": (False, torch.enable_grad)}
    for name, (requires_grad, mode) in cases.items():
        h = hidden.clone().requires_grad_(requires_grad)
        with mode(), AllocationLog() as log:
            loss = ops.fused_linear_cross_entropy(h, weight, labels, chunk_size=16, backend=backend_name)
        assert loss.grad_fn is None and not loss.requires_grad, name
        assert len(log.calls("mm")) == chunks, name  # only the logits matmul, once per chunk
        ref = reference_loss(hidden, weight, labels)
        assert_fp32_close(loss, ref, 1e-4, name)  # fp32 model rule


# ---------------------------------------------------------------- chunk rule, registration, bad input


def test_default_chunk_size():
    assert lm_loss.default_chunk_size(4096, 130528) == 128  # fp32 [128, 130528] = 63.7 MiB <= 64 MiB
    assert 4 * 128 * 130528 <= lm_loss.CHUNK_BYTES < 4 * 129 * 130528
    assert lm_loss.default_chunk_size(4096, 130528, "cpu") == 514  # fp32 [514, 130528] = 255.9 MiB <= 256 MiB
    assert lm_loss.default_chunk_size(50, 130528) == 50
    assert lm_loss.default_chunk_size(10, 10**9) == 1
    assert lm_loss.default_chunk_size(0, 300) == 1


def test_registered():
    assert set(backend.available("lm_loss")) == {"torch", "triton"}
    assert backend.dispatch("lm_loss", "cpu", "triton") is ce._lm_loss_triton
    assert backend.dispatch("lm_loss", "cpu") is lm_loss._lm_loss_torch


@pytest.mark.parametrize("change,match", [
    (dict(hidden=torch.randn(4, 8, 2)), r"hidden must be \[N, h\].*\(4, 8, 2\)"),
    (dict(weight=torch.randn(30, 9)), r"weight must be \[V, h\] with h = 8.*\(30, 9\)"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels must be \[N\] = \[4\].*\(5,\)"),
    (dict(labels=torch.zeros(4)), r"labels must be integers.*float32"),
    (dict(labels=torch.tensor([0, 30, 1, 2])), r"labels must be in \[0, 30\).*labels\[1\] = 30"),
    (dict(labels=torch.tensor([0, -1, 1, 2])), r"labels\[1\] = -1"),
    (dict(weight=torch.randn(30, 8, dtype=torch.float16)), r"same dtype.*float32.*float16"),
    (dict(reduction="none"), r"reduction"),
    (dict(chunk_size=0), r"chunk_size"),
])
def test_bad_input_raises(change, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(30, 8), labels=torch.tensor([0, -100, 29, 3]))
    args.update(change)
    kw = {k: args.pop(k) for k in ("reduction", "chunk_size") if k in args}
    with pytest.raises(ValueError, match=match):
        ops.fused_linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kw)


def test_compile_specs_cover_every_launch_config():
    specs = ce.compile_specs()
    covered = {(s.extra["dtype"], s.constexprs["BLOCK_V"], s.num_warps, s.num_stages, s.constexprs["COMPUTE_GRAD"])
               for s in specs}
    assert len(covered) == len(specs)  # nothing listed twice
    seen = set()
    for vocab in list(range(1, 5000)) + [130528, 150528]:
        cfg = ce.ce_config(vocab)
        assert cfg["BLOCK_V"] >= min(vocab, ce.MAX_BLOCK_V) and cfg["BLOCK_V"] * cfg["num_warps"] <= 4096 * 8
        for dtype in DTYPES:
            for grad in (True, False):
                key = (dtype, cfg["BLOCK_V"], cfg["num_warps"], cfg["num_stages"], grad)
                assert key in covered, key
                seen.add(key)
    assert seen == covered  # nothing unreachable listed


# ---------------------------------------------------------------- bytes moved by the kernel


def chunk_bytes(rows, vocab, e, grad):
    """(loaded, stored) by one `_ce_rows_kernel` launch, the module docstring's formulas."""
    if grad:
        return 2 * rows * vocab * e + rows * (8 + e), rows * vocab * e + 4 * rows
    return rows * vocab * e + rows * (8 + e), 4 * rows


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype,vocab", [(torch.float16, 300), (torch.bfloat16, 1000), (torch.float32, 5000)])
def test_bytes_moved(dtype, vocab, grad):
    # vocab 5000 takes two blocks of 4096, the second partial
    rows = 5
    e = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(rows, vocab).to(dtype)
    labels, losses = torch.randint(0, vocab, (rows,)), torch.empty(rows)
    with count_traffic() as counts:
        ce.cross_entropy_chunk(logits, labels, losses, 0.5, grad)
    c = counts["_ce_rows_kernel"]
    assert c.launches == 1
    assert (c.loaded, c.stored) == chunk_bytes(rows, vocab, e, grad)
    assert c.stored_unique == c.stored  # every output byte written once
    assert c.loaded_unique == rows * vocab * e + rows * 8  # distinct: the chunk and the labels (z[label] re-read)
