"""Triton bias + tanh-GeLU (glm_kernels/kernels/gelu.py) against the torch backend and the reference (interpreter).

fp32: against `reference.gelu(x + bias)` (and the torch backend) with the element-wise rule 1e-5 * max|ref|;
fp16/bf16: the low-precision rule of GLM_SPEC.md, ref_lowp the torch backend in the low dtype, ref32 the
reference in fp32 on the upcast inputs. Every gradient (dx, dbias) is compared the same way.
"""
import pytest
import torch

from glm_kernels import backend, ops, reference
from glm_kernels.kernels import gelu as gk
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close


def _inputs(shape, has_bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g)  # covers the flat, curved and linear parts of gelu
    b = torch.randn(shape[-1], generator=g) if has_bias else None
    gy = torch.randn(*shape, generator=g)
    return [t.to(dtype) if t is not None else None for t in (x, b, gy)]


def _run(fn, x, b, gy, grads=("x", "b")):
    xl = x.detach().clone().requires_grad_("x" in grads)
    bl = b.detach().clone().requires_grad_("b" in grads) if b is not None else None
    y = fn(xl, bl)
    res = {"y": y.detach()}
    if xl.requires_grad or (bl is not None and bl.requires_grad):
        (y.float() * gy.float()).sum().backward()
        if xl.requires_grad:
            res["dx"] = xl.grad
        if bl is not None and bl.requires_grad:
            res["dbias"] = bl.grad
    return res


def triton_op(x, b):
    return ops.bias_gelu(x, b, backend="triton")


def torch_op(x, b):
    return ops.bias_gelu(x, b, backend="torch")


def reference_op(x, b):
    return reference.gelu(x + b if b is not None else x)


def _compare(shape, has_bias, dtype, grads=("x", "b")):
    x, b, gy = _inputs(shape, has_bias, dtype)
    out = _run(triton_op, x, b, gy, grads)
    assert out["y"].dtype == dtype and out["y"].shape == x.shape
    up = [t.float() if t is not None else None for t in (x, b, gy)]
    ref32 = _run(reference_op, *up, grads)
    assert set(out) == set(ref32)
    if dtype == torch.float32:
        ref_torch = _run(torch_op, x, b, gy, grads)
        for k in ref32:
            assert_fp32_close(out[k], ref32[k], 1e-5, f"{k} {shape} bias={has_bias} vs reference")
            assert_fp32_close(out[k], ref_torch[k], 1e-5, f"{k} {shape} bias={has_bias} vs torch backend")
    else:
        ref_lowp = _run(torch_op, x, b, gy, grads)
        for k in ref32:
            assert out[k].dtype == dtype
            assert_lowp_close(out[k], ref_lowp[k], ref32[k], f"{k} {dtype} {shape} bias={has_bias}")
    return out


def test_registered():
    assert "triton" in backend.available("gelu")
    assert backend.dispatch("gelu", "cpu", "triton") is gk._gelu_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,has_bias", [((1, 96), True), ((7, 1000), True), ((33, 96), False),
                                            ((2, 3, 1500), True), ((5, 40), False)])
def test_forward_backward(shape, has_bias, dtype):
    _compare(shape, has_bias, dtype)


def test_many_rows_per_program():
    # 200 rows: 3 rows per program, the last row group has 2 valid rows and 1 masked
    assert gk.rows_per_program(200) == 3
    _compare((200, 72), True, torch.float32)


@pytest.mark.parametrize("grads", [("x",), ("b",)])
def test_gradient_subsets(grads):
    out = _compare((7, 96), True, torch.float32, grads)
    assert set(out) == {"y"} | {"dx" if g == "x" else "dbias" for g in grads}


def test_extreme_inputs_are_finite():
    # exp(-2u) is clamped: large negative and positive inputs give 0 and x, never inf/nan
    x = torch.tensor([[-1e4, -100.0, -12.0, 0.0, 12.0, 100.0, 1e4]]).requires_grad_()
    y = triton_op(x, None)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    x32 = x.detach().double().requires_grad_()
    ref = reference.gelu(x32)
    ref.sum().backward()
    assert_fp32_close(y, ref, 1e-5, "extreme y")
    assert_fp32_close(x.grad, x32.grad, 1e-5, "extreme dx")


def test_strided_rows():
    g = torch.Generator().manual_seed(1)
    base = 3 * torch.randn(6, 200, generator=g)
    b, gy = torch.randn(96, generator=g), torch.randn(6, 96, generator=g)
    x = base[:, 8:104]  # row stride 200, read in place
    xs = x.detach().requires_grad_()
    y = triton_op(xs, b)
    (y * gy).sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = reference_op(xr, b)
    (ref * gy).sum().backward()
    assert_fp32_close(y, ref, 1e-5, "strided y")
    assert_fp32_close(xs.grad, xr.grad, 1e-5, "strided dx")


def test_bad_bias_shape_raises():
    with pytest.raises(ValueError, match="bias"):
        triton_op(torch.randn(2, 8), torch.randn(9))


# ---------------------------------------------------------------- bytes moved


def gelu_bytes(n, width, e, has_bias, eb=None):
    """{kernel: (reads, writes)} for forward + backward (dx and dbias), the module docstring's formulas."""
    eb = e if eb is None else eb
    p = -(-n // gk.rows_per_program(n))
    return {
        "_gelu_fwd_kernel": (n * width * e + p * width * eb * has_bias, n * width * e),
        "_gelu_bwd_kernel": (2 * n * width * e + p * width * eb * has_bias, n * width * e + 4 * p * width * has_bias),
    }


@pytest.mark.parametrize("n,width,dtype,has_bias", [(130, 1500, torch.float16, True), (1, 1000, torch.bfloat16, True),
                                                    (20, 96, torch.float32, False)])
def test_bytes_moved(n, width, dtype, has_bias):
    e = torch.tensor([], dtype=dtype).element_size()
    x, b, gy = _inputs((n, width), has_bias, dtype)
    xl = x.clone().requires_grad_()
    bl = b.clone().requires_grad_() if has_bias else None
    with count_traffic() as counts:
        y = triton_op(xl, bl)
        y.backward(gy)
    expected = gelu_bytes(n, width, e, has_bias)
    assert set(counts) == set(expected)
    for name, (reads, writes) in expected.items():
        c = counts[name]
        assert c.launches == 1, name
        assert (c.loaded, c.stored) == (reads, writes), name
        assert c.stored_unique == c.stored, name  # every output byte written once
    # distinct input bytes: x (+ bias) in the forward, x and dy (+ bias) in the backward
    assert counts["_gelu_fwd_kernel"].loaded_unique == n * width * e + width * e * has_bias
    assert counts["_gelu_bwd_kernel"].loaded_unique == 2 * n * width * e + width * e * has_bias
    if n == 1:  # decode: exactly the minimum
        assert counts["_gelu_fwd_kernel"].loaded == counts["_gelu_fwd_kernel"].loaded_unique
