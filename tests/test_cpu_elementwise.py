"""The extension's element-wise inference ops: `residual_layer_norm` (csrc/layernorm_cpu.cpp) and `bias_gelu`
(csrc/gelu_cpu.cpp), every build of their loops, against float64 references under GLM_SPEC's rules; and which
path `ops.residual_layer_norm` / `ops.bias_gelu` take on the CPU (the extension in inference, PyTorch's kernels
and autograd with a gradient to keep)."""
import pytest
import torch

from conftest import EXTENSION_MISSING
from helpers import assert_fp32_close, assert_lowp_close
from glm_kernels import cpu_ext, ops

ALPHA = 7.483314773547883  # sqrt(56), ChatGLM-6B's residual scale
LOW = [torch.float16, torch.bfloat16]


def ext():
    assert cpu_ext.extension() is not None, EXTENSION_MISSING
    return cpu_ext.extension()


def joined(x, r):
    """The op-by-op join in x's dtype: x * alpha rounded, then + r rounded."""
    return x if r is None else (x * ALPHA) + r


def layer_norm64(j, w, b, eps):
    j = j.double()
    mean = j.mean(-1, keepdim=True)
    var = ((j - mean) ** 2).mean(-1, keepdim=True)
    return (j - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def gelu64(v):
    """tanh-GeLU in float64, as v / (1 + exp(-2u)) (0.5 v (1 + tanh u) cancels for large negative v)."""
    v = v.double()
    u = 0.7978845608028654 * (v + 0.044715 * v ** 3)
    return v / (1 + torch.exp(-2 * u))


@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 100), (2, 5, 48)])  # one decode row; tails; several rows
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_residual_layer_norm(shape, with_residual, dtype, isa):
    torch.manual_seed(0)
    h = shape[-1]
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype) * 3
    w, b = (torch.rand(h) + 0.5).to(dtype), torch.randn(h).to(dtype)
    res = r if with_residual else None
    out = ext().residual_layer_norm(x, res, ALPHA, w, b, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    ref32 = layer_norm64(joined(x, res), w, b, 1e-5)  # the statistics of the rounded join, in float64
    if dtype == torch.float32:
        assert_fp32_close(out, ref32, 1e-5, f"residual_layer_norm {isa}")  # element-wise rule (GLM_SPEC)
    else:
        ref_lowp = torch.nn.functional.layer_norm(joined(x, res), (h,), w, b, 1e-5)
        assert_lowp_close(out, ref_lowp, ref32, f"residual_layer_norm {dtype} {isa}")  # 2 x ref error + 1e-3 scale


@pytest.mark.parametrize("dtype", LOW)
def test_residual_join_rounds_as_two_ops(dtype, isa):
    """x * alpha is rounded to the dtype before + r: with r = -round(x * alpha) the join is exactly zero in every
    lane, so the row normalises to the bias (a fused multiply-add would leave x * alpha's rounding error)."""
    x = torch.randn(1, 64).to(dtype)
    r = -(x * ALPHA)
    w, b = torch.ones(64, dtype=dtype), torch.arange(64).to(dtype)
    out = ext().residual_layer_norm(x, r, ALPHA, w, b, 1e-5)
    assert torch.equal(out, b.expand(1, 64))


@pytest.mark.parametrize("shape", [(1, 1, 8192), (3, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_bias_gelu(shape, with_bias, dtype, isa):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).to(dtype)  # down to ~-12: exp(-2u) far beyond fp32's range
    b = torch.randn(shape[-1]).to(dtype) if with_bias else None
    out = ext().bias_gelu(x, b)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    v = x if b is None else x + b  # the add rounded to the dtype, as the op-by-op form
    ref32 = gelu64(v)
    if dtype == torch.float32:
        assert_fp32_close(out, ref32, 1e-5, f"bias_gelu {isa}")  # element-wise rule (GLM_SPEC)
    else:
        ref_lowp = torch.nn.functional.gelu(v, approximate="tanh")
        assert_lowp_close(out, ref_lowp, ref32, f"bias_gelu {dtype} {isa}")  # 2 x ref error + 1e-3 scale
    # far from zero the relative error is fp32's, not only the scale's (no cancellation for negative inputs)
    if dtype == torch.float32:
        big = ref32.abs() > 1e-30
        assert float(((out.double() - ref32).abs()[big] / ref32.abs()[big]).max()) < 1e-5


def test_ops_take_the_extension_in_inference_only():
    torch.manual_seed(0)
    x, r = torch.randn(2, 64), torch.randn(2, 64)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    with torch.no_grad():
        assert torch.equal(ops.residual_layer_norm(x, r, ALPHA, w, b, 1e-5),
                           ext().residual_layer_norm(x, r, ALPHA, w, b, 1e-5))
        assert torch.equal(ops.bias_gelu(x, b), ext().bias_gelu(x, b))
    # with a gradient to keep: PyTorch's kernels and autograd, the same values within the fp32 rule
    xl = x.clone().requires_grad_()
    y = ops.residual_layer_norm(xl, r, ALPHA, w, b, 1e-5)
    g = ops.bias_gelu(xl, b)
    assert y.grad_fn is not None and g.grad_fn is not None
    assert_fp32_close(y, ext().residual_layer_norm(x, r, ALPHA, w, b, 1e-5), 1e-5, "layer norm, autograd path")
    assert_fp32_close(g, ext().bias_gelu(x, b), 1e-5, "bias gelu, autograd path")
    (y.sum() + g.sum()).backward()
    assert xl.grad is not None and torch.isfinite(xl.grad).all()
    # a bias of another dtype promotes in PyTorch's add: the op keeps PyTorch's kernels
    with torch.no_grad():
        mixed = ops.bias_gelu(x.to(torch.bfloat16), b)
    assert mixed.dtype == torch.float32


def test_errors_are_named():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"weight must be a CPU \[64\] tensor"):
        ext().residual_layer_norm(x, None, ALPHA, torch.ones(63), torch.zeros(64), 1e-5)
    with pytest.raises(RuntimeError, match="residual must match x"):
        ext().residual_layer_norm(x, torch.randn(2, 32), ALPHA, torch.ones(64), torch.zeros(64), 1e-5)
    with pytest.raises(RuntimeError, match="x must be fp32, fp16 or bf16"):
        ext().bias_gelu(torch.ones(2, 64, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"bias must be a CPU \[64\] tensor"):
        ext().bias_gelu(x, torch.zeros(65))
