"""Per-op benchmarks: glm_kernels ops vs the reference's unfused ops, forward and forward+backward.

The 6B head shape (head dim 128, 2D rotary, prefix 128) scaled to a 2-core CPU:
8 heads, 256 tokens, prefix 32. On a GPU the ops dispatch to the Triton
kernels; on the CPU to the torch path. The interpreter is never timed.
"""
import os

import pytest
import torch

from glm_kernels import ops, reference
from glm_kernels.ops.mask import GLMMask
from timing import measure

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("benchmarks never time the Triton interpreter (unset TRITON_INTERPRET)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, B, NH, HD, P = 256, 1, 8, 128, 32
H = NH * HD
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _run(benchmark, group, impl, fn, backward, dtype):
    if backward:
        def step():
            out = fn()
            out.backward(torch.ones_like(out))
        measure(benchmark, group + " fwd+bwd", impl, step, device=DEVICE, dtype=dtype, rounds=5)
    else:
        with torch.no_grad():
            measure(benchmark, group + " fwd", impl, fn, device=DEVICE, dtype=dtype)


def _leaf(*shape, dtype, grad):
    return torch.randn(*shape, dtype=torch.float32, device=DEVICE).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_rope(benchmark, impl, dtype, backward):
    mixed = _leaf(S, B, 3 * H, dtype=dtype, grad=backward)
    pos = torch.randint(0, 2048, (B, 2, S), device=DEVICE)
    cos, sin = ops.rotary_table(2048, HD // 2, dtype, DEVICE)

    def ours():
        q, k, v = ops.rope_qkv(mixed, pos, cos, sin, NH)
        return q + k + v if backward else q

    def ref():
        q, k, v = mixed.view(S, B, NH, 3 * HD).split(HD, dim=-1)
        q, k = reference.rotary_2d(q, k, pos)
        return q + k + v if backward else q

    _run(benchmark, f"rope {S} tokens {_name(dtype)}", impl, ours if impl == "glm_kernels" else ref, backward,
         dtype)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_attention_prefill(benchmark, impl, dtype, backward):
    q, k, v = (_leaf(S, B, NH, HD, dtype=dtype, grad=backward) for _ in range(3))
    pk, pv = (_leaf(P, B, NH, HD, dtype=dtype, grad=backward) for _ in range(2))
    mask = GLMMask(P, torch.zeros(B, dtype=torch.long, device=DEVICE), torch.full((B,), S // 2, device=DEVICE))

    def ours():
        return ops.glm_attention(q, k, v, 13, mask, past_k=pk, past_v=pv)[0]

    def ref():
        return reference.attention_core(q, torch.cat((pk, k)), torch.cat((pv, v)), mask.materialize(S, S + P), 13)[0]

    _run(benchmark, f"attention {S}+{P} keys {_name(dtype)}", impl, ours if impl == "glm_kernels" else ref,
         backward, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_attention_decode(benchmark, impl, dtype):
    ctx = 1024
    q, k, v = (_leaf(1, B, NH, HD, dtype=dtype, grad=False) for _ in range(3))
    pk, pv = (_leaf(P + ctx, B, NH, HD, dtype=dtype, grad=False) for _ in range(2))

    def ours():
        return ops.glm_attention(q, k, v, 13, None, past_k=pk, past_v=pv)[0]

    def ref():
        return reference.attention_core(q, torch.cat((pk, k)), torch.cat((pv, v)), None, 13)[0]

    _run(benchmark, f"attention decode 1 over {P}+{ctx} {_name(dtype)}", impl,
         ours if impl == "glm_kernels" else ref, False, dtype)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_residual_layernorm(benchmark, impl, dtype, backward):
    hidden = 4096
    x, r = (_leaf(S, B, hidden, dtype=dtype, grad=backward) for _ in range(2))
    w, b = (_leaf(hidden, dtype=dtype, grad=backward) for _ in range(2))

    def ours():
        return ops.residual_layer_norm(x, r, reference.ALPHA, w, b, 1e-5)

    def ref():
        return torch.nn.functional.layer_norm(x * reference.ALPHA + r, (hidden,), w, b, 1e-5)

    _run(benchmark, f"residual layernorm {S}x{hidden} {_name(dtype)}", impl, ours if impl == "glm_kernels" else ref,
         backward, dtype)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_bias_gelu(benchmark, impl, dtype, backward):
    inner = 16384
    x = _leaf(S // 4, B, inner, dtype=dtype, grad=backward)
    bias = _leaf(inner, dtype=dtype, grad=backward)

    def ours():
        return ops.bias_gelu(x, bias)

    def ref():
        return reference.gelu(x + bias)

    _run(benchmark, f"bias gelu {S // 4}x{inner} {_name(dtype)}", impl, ours if impl == "glm_kernels" else ref,
         backward, dtype)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("impl", ["glm_kernels", "reference"])
def test_scaled_masked_softmax(benchmark, impl, dtype, backward):
    scores = _leaf(B, NH, S, S + P, dtype=dtype, grad=backward)
    mask = torch.rand(B, 1, S, S + P, device=DEVICE) < 0.3

    def ours():
        return ops.scaled_masked_softmax(scores, mask, 13.0)

    def ref():
        return torch.softmax(scores.masked_fill(mask, -10000.0).float() * 13.0, dim=-1).to(dtype)

    _run(benchmark, f"softmax {NH}x{S}x{S + P} {_name(dtype)}", impl, ours if impl == "glm_kernels" else ref,
         backward, dtype)
