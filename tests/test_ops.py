"""Each op (torch backend) against the reference's unfused ops, and the backend switch."""

import pytest
import torch

from glm_kernels import backend, ops, reference
from helpers import assert_fp32_close, assert_lowp_close

LOWP = [torch.float16, torch.bfloat16]


def _positions(b, s, n=64):
    return torch.randint(0, n, (b, 2, s))


@pytest.mark.parametrize("hd", [64, 128])
def test_rotary_matches_reference_fp32(hd):
    q, k = torch.randn(2, 7, 3, 4, hd).unbind(0)
    pos = _positions(3, 7)
    cos, sin = ops.rotary_table(64, hd // 2, torch.float32)
    out = ops.apply_rotary_2d(q, k, cos, sin, pos, backend="torch")
    ref = reference.rotary_2d(q, k, pos)
    for o, r in zip(out, ref):
        assert_fp32_close(o, r, 1e-5, "rotary fp32")  # element-wise rule


@pytest.mark.parametrize("dtype", LOWP)
def test_rotary_matches_reference_low_precision(dtype):
    q, k = torch.randn(2, 9, 2, 4, 128).unbind(0)
    pos = _positions(2, 9, n=2048)
    cos, sin = ops.rotary_table(2048, 64, dtype)
    out = ops.apply_rotary_2d(q.to(dtype), k.to(dtype), cos, sin, pos)
    ref32 = reference.rotary_2d(q, k, pos)
    reflow = reference.rotary_2d(q.to(dtype), k.to(dtype), pos)
    for o, rl, r32 in zip(out, reflow, ref32):
        assert_lowp_close(o, rl, r32, f"rotary {dtype}")


def test_rotary_rejects_tables_of_another_dtype():
    q = torch.randn(2, 1, 1, 64, dtype=torch.float16)
    cos, sin = ops.rotary_table(8, 32, torch.float32)
    with pytest.raises(TypeError, match="float32.*float16"):
        ops.apply_rotary_2d(q, q, cos, sin, torch.zeros(1, 2, 2, dtype=torch.long))


def _attn_inputs(sq, sk, b=2, nh=4, hd=64, dtype=torch.float32):
    q = torch.randn(sq, b, nh, hd)
    k = torch.randn(sk, b, nh, hd)
    v = torch.randn(sk, b, nh, hd)
    mask = torch.rand(b, 1, sq, sk) < 0.3
    mask[0, :, 1, :] = True  # an all-masked row
    return q, k, v, mask


@pytest.mark.parametrize("layer_id", [0, 27])
def test_attention_matches_reference_fp32(layer_id):
    q, k, v, mask = _attn_inputs(7, 12)
    ctx, probs = ops.glm_attention(q, k, v, layer_id, mask, output_attentions=True)
    ref_ctx, ref_probs = reference.attention_core(q, k, v, mask, layer_id)
    assert_fp32_close(ctx, ref_ctx, 1e-4, "attention context")  # attention rule
    assert_fp32_close(probs, ref_probs, 1e-4, "attention probs")
    assert torch.isfinite(ctx).all()
    # the all-masked row attends uniformly: its context is the mean of v
    assert torch.allclose(ctx[1, 0].view(4, 64), v[:, 0].mean(0), atol=1e-5)


@pytest.mark.parametrize("dtype", LOWP)
def test_attention_matches_reference_low_precision(dtype):
    q, k, v, mask = _attn_inputs(5, 9)
    ctx, _ = ops.glm_attention(q.to(dtype), k.to(dtype), v.to(dtype), 3, mask)
    ref32, _ = reference.attention_core(q, k, v, mask, 3)
    reflow, _ = reference.attention_core(q.to(dtype), k.to(dtype), v.to(dtype), mask, 3)
    assert_lowp_close(ctx, reflow, ref32, f"attention {dtype}")


def test_attention_gradients_match_reference():
    q, k, v, mask = _attn_inputs(6, 10)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn(6, 2, 4 * 64)
    ops.glm_attention(*leaves, 2, mask)[0].backward(g)
    reference.attention_core(*ref_leaves, mask, 2)[0].backward(g)
    for a, r in zip(leaves, ref_leaves):
        assert_fp32_close(a.grad, r.grad, 1e-4, "attention grad")


def test_softmax_uniform_on_all_masked_rows_fp16():
    scores = (torch.randn(1, 2, 3, 5) * 30).half()
    mask = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 0, :] = True
    mask[..., 1, 3:] = True
    p = ops.scaled_masked_softmax(scores, mask, 28.0)
    assert p.dtype == torch.float16 and torch.isfinite(p).all()
    assert torch.equal(p[..., 0, :], torch.full_like(p[..., 0, :], 0.2))
    assert (p[..., 1, 3:] == 0).all()
    expected = torch.softmax(scores.float() * 28.0, -1)
    assert torch.allclose(p[..., 2, :].float(), expected[..., 2, :], atol=1e-3)


def test_residual_layernorm_matches_reference():
    x, r = torch.randn(2, 5, 3, 64).unbind(0)
    w, b = torch.randn(64), torch.randn(64)
    out = ops.residual_layer_norm(x, r, reference.ALPHA, w, b, 1e-5)
    ref = torch.nn.functional.layer_norm(x * reference.ALPHA + r, (64,), w, b, 1e-5)
    assert_fp32_close(out, ref, 1e-5, "residual layernorm")
    assert_fp32_close(ops.layer_norm(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (64,), w, b, 1e-5),
                      1e-5, "layernorm")


def test_bias_gelu_matches_reference():
    x, b = torch.randn(4, 3, 96) * 3, torch.randn(96)
    assert_fp32_close(ops.bias_gelu(x, b), reference.gelu(x + b), 1e-5, "bias gelu")
    xr = x.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    ops.bias_gelu(xr, b).sum().backward()
    reference.gelu(xg + b).sum().backward()
    assert_fp32_close(xr.grad, xg.grad, 1e-5, "bias gelu grad")


def test_backend_by_device_and_environment(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve("attention", "cpu") == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.resolve("attention", "cpu") == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="GLM_KERNELS_BACKEND is 'cuda-please'"):
        backend.resolve("attention", "cpu")
    # the argument beats the environment
    assert backend.resolve("attention", "cpu", "torch") == "torch"
    with pytest.raises(ValueError, match="backend argument is 'nope'"):
        backend.resolve("attention", "cpu", "nope")


def test_explicit_backend_is_strict():
    backend.register("_probe_op", "torch")(lambda: "torch impl")
    with pytest.raises(ValueError, match="op '_probe_op' has no triton implementation"):
        backend.dispatch("_probe_op", "cpu", "triton")
    assert backend.dispatch("_probe_op", "cuda")() == "torch impl"  # by-device choice falls back in order


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP)
def test_attention_inference_path_matches_reference(dtype, cpu_path):
    # no gradient, no probabilities, no fully masked row: the torch backend's fused inference path
    from glm_kernels.ops.mask import GLMMask

    q, k, v = torch.randn(3, 6, 2, 4, 64).unbind(0)
    pk, pv = torch.randn(2, 5, 2, 4, 64).unbind(0)
    mask = GLMMask(3, torch.tensor([0, 1]), torch.tensor([2, 4]))
    dense = mask.materialize(6, 11)
    with torch.no_grad():
        out, probs = ops.glm_attention(q.to(dtype), k.to(dtype), v.to(dtype), 4, mask, past_k=pk.to(dtype),
                                       past_v=pv.to(dtype), backend="torch")
        ref32, _ = reference.attention_core(q, torch.cat((pk, k)), torch.cat((pv, v)), dense, 4)
        reflow, _ = reference.attention_core(q.to(dtype), torch.cat((pk, k)).to(dtype), torch.cat((pv, v)).to(dtype),
                                             dense, 4)
    assert probs is None and out.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(out, ref32, 1e-4, "inference attention fp32")  # attention rule
    else:
        assert_lowp_close(out, reflow, ref32, f"inference attention {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP)
def test_attention_inference_path_with_fully_masked_rows(dtype, cpu_path):
    # left padding without a prefix: padded query rows see no key; the original attends uniformly to every key.
    # The fused inference path must give that row the mean of v, decided on the device (no host sync).
    from sync_counter import count_syncs

    q, k, v, mask = _attn_inputs(7, 12)
    mask[1, :, 4, :] = True  # a second fully masked row, in the other batch row
    lowp = [t.to(dtype) for t in (q, k, v)]
    with torch.no_grad(), count_syncs() as syncs:
        out, probs = ops.glm_attention(*lowp, 5, mask, backend="torch")
    assert probs is None and sum(syncs.values()) == 0, dict(syncs)
    ref32, _ = reference.attention_core(q, k, v, mask, 5)
    reflow, _ = reference.attention_core(*lowp, mask, 5)
    if dtype == torch.float32:
        assert_fp32_close(out, ref32, 1e-4, "inference attention, fully masked rows")  # attention rule
    else:
        assert_lowp_close(out, reflow, ref32, f"inference attention, fully masked rows {dtype}")
    uniform = v[:, 0].mean(0).to(dtype).float()
    assert torch.allclose(out[1, 0].view(4, 64).float(), uniform, atol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP)
@pytest.mark.parametrize("sq, batch_mask", [(1, False), (1, True), (5, True)])
@pytest.mark.parametrize("hd", [64, 128, 48, 40])
def test_attention_few_reads_cache_views(dtype, sq, batch_mask, hd, isa):
    """The extension's few-row attention (CPU decoding): strided views of a [max, b, nh, hd] cache, a query
    sliced out of the fused QKV output, masks per batch row or broadcast, a fully masked row (uniform weights).
    Head widths: multiples of 32 (the bf16 loops on even / odd halves), of 16 only (q and the output in
    registers), and neither (the plain loops); 37 keys leave a tail after the four-key steps."""
    from glm_kernels import cpu_ext

    b, nh, filled = 2, 4, 37
    qkv = torch.randn(sq, b, nh, 3 * hd)
    cache_k, cache_v = torch.randn(2, 48, b, nh, hd).unbind(0)
    k, v = cache_k[:filled], cache_v[:filled]
    q = qkv[..., :hd]  # not contiguous, as rope_qkv returns it
    mask = torch.rand(b if batch_mask else 1, 1, sq, filled) < 0.3
    mask[..., -1] = False
    mask[0, 0, sq - 1] = True  # fully masked: the original's uniform weights over every key
    lowp = [t.to(dtype) for t in (q, k, v)]
    with torch.no_grad():
        out = cpu_ext.extension().attention_few(*lowp, mask)
    assert out.dtype == dtype and out.shape == (sq, b, nh * hd)
    ref32, _ = reference.attention_core(q, k, v, mask, 2)
    reflow, _ = reference.attention_core(*lowp, mask, 2)
    if dtype == torch.float32:
        assert_fp32_close(out, ref32, 1e-4, f"attention_few {isa}")  # attention rule
    else:
        assert_lowp_close(out, reflow, ref32, f"attention_few {dtype} {isa}")
    assert torch.allclose(out[sq - 1, 0].float().view(nh, hd), v[:, 0].float().mean(0),
                          atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_attention_few_errors_are_named():
    from glm_kernels import cpu_ext

    ext = cpu_ext.extension()
    assert ext is not None
    q, k = torch.randn(1, 2, 4, 8), torch.randn(5, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"mask must be bool \[b or 1, 1, sq, sk\] = \[2, 1, 1, 5\]"):
        ext.attention_few(q, k, k, torch.zeros(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="q, k, v must share a dtype"):
        ext.attention_few(q, k.half(), k.half(), None)
    with pytest.raises(RuntimeError, match="do not match"):
        ext.attention_few(q, torch.randn(5, 2, 4, 16), torch.randn(5, 2, 4, 16), None)


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP)
@pytest.mark.parametrize("s, b", [(1, 1), (1, 3), (5, 2)])
def test_rope_qkv_inference_path(dtype, s, b, cpu_path):
    """CPU inference on few tokens (the extension's fused `rope_qkv`; PyTorch ops without it): q, k, v against the
    reference rotation, k and v written into strided cache views at an offset, nothing else of the cache touched."""
    nh, hd, total, offset = 3, 64, 12, 4
    mixed32 = torch.randn(s, b, 3 * nh * hd).to(dtype).float()  # exactly representable: every path sees the same
    pos = torch.randint(0, 2048, (b, 2, s))
    cos, sin = ops.rotary_table(2048, hd // 2, dtype)
    cache = torch.randn(total, b, 2, nh, hd).to(dtype)  # k and v interleaved: views with non-trivial strides
    before = cache.clone()
    k_out, v_out = cache[offset:offset + s, :, 0], cache[offset:offset + s, :, 1]
    with torch.no_grad():
        q, k, v = ops.rope_qkv(mixed32.to(dtype), pos, cos, sin, nh, k_out, v_out, backend="torch")
    assert k is k_out and v is v_out and q.shape == (s, b, nh, hd) and q.dtype == dtype
    rest = torch.ones(total, dtype=torch.bool)
    rest[offset:offset + s] = False
    assert torch.equal(cache[rest], before[rest]), "the cache outside [offset, offset + s) changed"
    q32, k32, v32 = mixed32.view(s, b, nh, 3 * hd).split(hd, dim=-1)
    rq, rk = reference.rotary_2d(q32, k32, pos)  # fp32 tables
    assert torch.equal(v, v32.to(dtype))  # v is a copy: exact
    if dtype == torch.float32:
        for name, o, r in (("q", q, rq), ("k", k, rk)):
            assert_fp32_close(o, r, 1e-5, f"rope {name} {cpu_path}")  # element-wise rule
    else:
        lq, lk = reference.rotary_2d(q32.to(dtype), k32.to(dtype), pos)
        for name, o, rl, r in (("q", q, lq, rq), ("k", k, lk, rk)):
            assert_lowp_close(o, rl, r, f"rope {name} {dtype} {cpu_path}")  # low-precision rule


def test_rope_qkv_extension_errors_are_named():
    from glm_kernels import cpu_ext

    ext = cpu_ext.extension()
    assert ext is not None
    mixed = torch.randn(1, 2, 3 * 2 * 8)
    cos, sin = ops.rotary_table(16, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"position_ids hold 16, outside the rotary table's 16 positions"):
        ext.rope_qkv(mixed, torch.full((2, 2, 1), 16), cos, sin, 2, None, None)
    with pytest.raises(RuntimeError, match=r"position_ids must be int64 \[b, 2, s\] = \[2, 2, 1\]"):
        ext.rope_qkv(mixed, torch.zeros(1, 2, 1, dtype=torch.long), cos, sin, 2, None, None)
    with pytest.raises(RuntimeError, match="not 3 x num_heads"):
        ext.rope_qkv(mixed, torch.zeros(2, 2, 1, dtype=torch.long), cos, sin, 5, None, None)
