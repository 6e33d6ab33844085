"""Triton alpha-residual LayerNorm (glm_kernels/kernels/layernorm.py) against the torch backend, under the interpreter.

Every forward output and every gradient is compared with the torch implementation of the same op
(`backend="torch"`): fp32 with the element-wise rule (1e-5 * max|ref|), fp16/bf16 with the low-precision
rule of GLM_SPEC.md (the torch op in the low dtype against the torch op in fp32 on the upcast inputs).
"""
import pytest
import torch

from glm_kernels import backend, ops, reference
from glm_kernels.kernels import layernorm as ln
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close

ALPHA = reference.ALPHA
EPS = 1e-5
LOWP = (torch.float16, torch.bfloat16)


def _inputs(shape, residual, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]
    x = torch.randn(*shape, generator=g)
    r = 4 * torch.randn(*shape, generator=g) + 1.0 if residual else None  # a residual stream of order ALPHA
    w = 1 + 0.1 * torch.randn(h, generator=g)
    b = 0.1 * torch.randn(h, generator=g)
    gy = torch.randn(*shape, generator=g)
    gs = torch.randn(*shape, generator=g)
    return [t.to(dtype) if t is not None else None for t in (x, r, w, b, gy, gs)]


def _run(be, x, r, w, b, gy, gs, return_sum, grads=("x", "r", "w", "b")):
    """Forward + backward of `residual_layer_norm` on fresh leaves; returns {name: tensor} of outputs and grads."""
    leaves = {"x": x, "r": r, "w": w, "b": b}
    leaves = {k: (v.detach().clone().requires_grad_(k in grads) if v is not None else None) for k, v in leaves.items()}
    out = ops.residual_layer_norm(leaves["x"], leaves["r"], ALPHA, leaves["w"], leaves["b"], EPS,
                                  return_sum=return_sum, backend=be)
    y, s = out if return_sum else (out, None)
    loss = (y.float() * gy.float()).sum()
    if return_sum:  # a gradient flows into the returned sum as well
        loss = loss + (s.float() * gs.float()).sum()
    res = {"y": y.detach()}
    if s is not None:
        res["sum"] = s.detach()
    if any(v is not None and v.requires_grad for v in leaves.values()):
        loss.backward()
        for k, v in leaves.items():
            if v is not None and v.requires_grad:
                res["d" + k] = v.grad
    return res


def _compare(shape, residual, return_sum, dtype, grads=("x", "r", "w", "b"), seed=0):
    x, r, w, b, gy, gs = _inputs(shape, residual, dtype, seed)
    out = _run("triton", x, r, w, b, gy, gs, return_sum, grads)
    ref = _run("torch", x, r, w, b, gy, gs, return_sum, grads)
    assert set(out) == set(ref)
    assert out["y"].dtype == dtype and out["y"].shape == x.shape
    if dtype == torch.float32:
        for k in ref:
            assert_fp32_close(out[k], ref[k], 1e-5, f"{k} {shape} res={residual} sum={return_sum}")
    else:
        up = [t.float() if t is not None else None for t in (x, r, w, b, gy, gs)]
        ref32 = _run("torch", *up, return_sum, grads)
        for k in ref:
            assert out[k].dtype == dtype
            assert_lowp_close(out[k], ref[k], ref32[k], f"{k} {dtype} {shape} res={residual} sum={return_sum}")
    return out, ref


CASES = [  # (shape, residual, return_sum)
    ((1, 96), True, True),
    ((7, 1000), True, False),
    ((33, 96), False, False),
    ((3, 5, 96), True, True),
    ((7, 96), False, True),
]


def test_registered():
    assert "triton" in backend.available("layernorm")
    assert backend.dispatch("layernorm", "cpu", "triton") is ln._layernorm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,residual,return_sum", CASES)
def test_forward_backward_matches_torch(shape, residual, return_sum, dtype):
    _compare(shape, residual, return_sum, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h", [5000, 9000])
def test_wide_rows_chunked_kernels(h, dtype):
    # 5000: whole-row forward (BLOCK 8192), chunked backward; 9000: chunked in both directions
    assert ln.ln_config(h, "bwd")["chunked"] and ln.ln_config(h, "fwd")["chunked"] == (h > 8192)
    _compare((3, h), True, True, dtype)
    _compare((2, h), False, False, dtype)


def test_many_rows_per_program():
    # 257 rows: 2 rows per program, the last program has one valid row and one masked row
    assert ln.rows_per_program(257) == 2
    _compare((257, 40), True, True, torch.float32)


@pytest.mark.parametrize("grads", [("w", "b"), ("x",), ("r",), ("x", "w")])
def test_gradient_subsets(grads):
    # P-Tuning freezes the LayerNorm parameters: only activations need gradients; and the other way round
    out, ref = _compare((7, 96), True, True, torch.float32, grads=grads)
    assert {k for k in out if k.startswith("d")} == {"d" + g for g in grads}


def test_only_sum_used():
    x, r, w, b, _, gs = _inputs((5, 96), True, torch.float32)
    grads = []
    for be in ("triton", "torch"):
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        _, s = ops.residual_layer_norm(xl, rl, ALPHA, w, b, EPS, return_sum=True, backend=be)
        (s * gs).sum().backward()
        grads.append((xl.grad, rl.grad))
    assert_fp32_close(grads[0][0], grads[1][0], 1e-5, "dx when only the sum is used")
    assert_fp32_close(grads[0][1], grads[1][1], 1e-5, "dr when only the sum is used")


def test_plain_layer_norm_and_sum_without_residual():
    x, _, w, b, _, _ = _inputs((9, 1000), False, torch.float32)
    y = ops.layer_norm(x, w, b, EPS, backend="triton")
    assert_fp32_close(y, torch.nn.functional.layer_norm(x, (1000,), w, b, EPS), 1e-5, "layer_norm")
    y2, s = ops.residual_layer_norm(x, None, ALPHA, w, b, EPS, return_sum=True, backend="triton")
    assert s is x  # as the torch op: the "sum" without a residual is x itself
    assert_fp32_close(y2, y, 1e-5, "alpha is ignored without a residual")


def test_no_affine():
    x, r, _, _, gy, _ = _inputs((7, 96), True, torch.float32)
    outs = []
    for be in ("triton", "torch"):
        xl = x.clone().requires_grad_()
        y = ops.residual_layer_norm(xl, r, ALPHA, None, None, EPS, backend=be)
        (y * gy).sum().backward()
        outs.append((y, xl.grad))
    assert_fp32_close(outs[0][0], outs[1][0], 1e-5, "y without weight/bias")
    assert_fp32_close(outs[0][1], outs[1][1], 1e-5, "dx without weight/bias")


def test_strided_rows():
    # rows with a stride of 2h (a column slice of a wider tensor) are read in place; a transposed
    # [s, b, h] view is copied to rows
    g = torch.Generator().manual_seed(3)
    base_x, base_r = torch.randn(6, 192, generator=g), torch.randn(6, 192, generator=g)
    w, b = 1 + 0.1 * torch.randn(96, generator=g), 0.1 * torch.randn(96, generator=g)
    gy = torch.randn(6, 96, generator=g)
    for x, r in ((base_x[:, :96], base_r[:, 96:]), (base_x.view(2, 3, 192)[..., :96].transpose(0, 1),
                                                    base_r.view(2, 3, 192)[..., 96:].transpose(0, 1))):
        res = []
        for be in ("triton", "torch"):
            xl, rl = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
            xs, rs = x.detach().requires_grad_(), r.detach().requires_grad_()  # the strided views themselves
            y = ops.residual_layer_norm(xs if be == "triton" else xl, rs if be == "triton" else rl, ALPHA, w, b,
                                        EPS, backend=be)
            (y * gy.view(y.shape)).sum().backward()
            res.append((y, (xs if be == "triton" else xl).grad, (rs if be == "triton" else rl).grad))
        for a, c, what in zip(res[0], res[1], ("y", "dx", "dr")):
            assert_fp32_close(a, c, 1e-5, f"strided {what}")


def test_unsupported_width_raises():
    x = torch.randn(2, 16385)
    w = torch.ones(16385)
    with pytest.raises(ValueError, match="h=16385"):
        ops.layer_norm(x, w, None, EPS, backend="triton")


# ---------------------------------------------------------------- bytes moved


def fwd_bytes(n, h, e, residual, return_sum, stats, ew=None, eb=None):
    """(reads, writes) of the forward launch, the formula of the module docstring."""
    ew = e if ew is None else ew
    eb = e if eb is None else eb
    if not ln.ln_config(h, "fwd")["chunked"]:
        p = -(-n // ln.rows_per_program(n))
        reads = n * h * e * (1 + residual) + p * h * (ew + eb)
    else:  # chunked: x and r read twice, weight and bias once per row
        reads = 2 * n * h * e * (1 + residual) + n * h * (ew + eb)
    writes = n * h * e * (1 + return_sum) + 8 * n * stats
    return reads, writes


def bwd_bytes(n, h, e, residual, dsum, dx, dr, dw, db, ew=None):
    """{kernel: (reads, writes)} of the backward launches, the formula of the module docstring."""
    ew = e if ew is None else ew
    p = -(-n // ln.rows_per_program(n))
    if not ln.ln_config(h, "bwd")["chunked"]:
        reads = n * h * e * (2 + residual + dsum) + 8 * n + p * h * ew * (dx or dr)
        return {"_ln_bwd_kernel": (reads, n * h * e * (dx + dr) + 4 * p * h * (dw + db))}
    col_blocks = -(-h // ln.DWDB_BLOCK)
    return {
        "_ln_bwd_dx_kernel": (2 * n * h * (e * (2 + residual) + ew) + n * h * e * dsum + 8 * n,
                              n * h * e * (dx + dr)),
        "_ln_bwd_dwdb_kernel": (n * h * e * (1 + dw * (1 + residual)) + 8 * n * col_blocks * dw,
                                4 * p * h * (dw + db)),
    }


@pytest.mark.parametrize("n,h,dtype", [(300, 96, torch.float16), (5, 1000, torch.float32), (2, 9000, torch.bfloat16)])
@pytest.mark.parametrize("residual,return_sum", [(True, True), (False, False)])
def test_bytes_moved(n, h, dtype, residual, return_sum):
    e = torch.tensor([], dtype=dtype).element_size()
    x, r, w, b, gy, gs = _inputs((n, h), residual, dtype)
    # inference: no statistics are written
    with torch.no_grad(), count_traffic() as counts:
        ops.residual_layer_norm(x, r, ALPHA, w, b, EPS, return_sum=return_sum, backend="triton")
    kname = "_ln_fwd_chunked_kernel" if ln.ln_config(h, "fwd")["chunked"] else "_ln_fwd_kernel"
    c = counts[kname]
    reads, writes = fwd_bytes(n, h, e, residual, return_sum, stats=False)
    assert c.launches == 1 and (c.loaded, c.stored) == (reads, writes)
    # the excess over the minimum is only re-reads: every distinct input byte is read, every output byte
    # written, exactly once
    assert c.loaded_unique == n * h * e * (1 + residual) + 2 * h * e
    assert c.stored_unique == c.stored

    # training: statistics stored, then the backward with every gradient (and the sum's)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    with count_traffic() as counts:
        out = ops.residual_layer_norm(*leaves[:2], ALPHA, *leaves[2:], EPS, return_sum=return_sum,
                                      backend="triton")
        y, s = out if return_sum else (out, None)
        torch.autograd.backward([y, s] if return_sum else [y], [gy, gs] if return_sum else [gy])
    assert (counts[kname].loaded, counts[kname].stored) == fwd_bytes(n, h, e, residual, return_sum, stats=True)
    expected = bwd_bytes(n, h, e, residual, return_sum, dx=True, dr=residual, dw=True, db=True)
    for name, (reads, writes) in expected.items():
        assert counts[name].launches == 1, name
        assert (counts[name].loaded, counts[name].stored) == (reads, writes), name
    assert not set(counts) - {kname} - set(expected)


def test_bytes_moved_frozen_weights():
    # P-Tuning: LayerNorm parameters frozen, so no partial buffers are written at all
    n, h = 40, 256
    x, r, w, b, gy, _ = _inputs((n, h), True, torch.float16)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = ops.residual_layer_norm(xl, rl, ALPHA, w, b, EPS, backend="triton")
    with count_traffic() as counts:
        y.backward(gy)
    c = counts["_ln_bwd_kernel"]
    assert (c.loaded, c.stored) == bwd_bytes(n, h, 2, True, False, dx=True, dr=True, dw=False, db=False)[
        "_ln_bwd_kernel"]
    assert c.stored == 2 * n * h * 2  # dx and dr only
