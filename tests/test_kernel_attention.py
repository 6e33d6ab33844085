"""Triton GLM attention under the interpreter: forward and every gradient against the reference.

Tolerances (GLM_SPEC.md): fp32 max abs error <= 1e-4 * max|ref| (attention rule), gradients the same
against the reference gradient's scale; fp16/bf16 error vs the fp32 reference <= 2 * the low-precision
reference's own error + 1e-3 * scale.
"""
import pytest
import torch

from glm_kernels import ops, reference
from glm_kernels.kernels import attention as attn
from glm_kernels.ops.mask import GLMMask
from helpers import assert_fp32_close, assert_lowp_close


def reference_attention(q, k, v, layer_id, mask, past_k=None, past_v=None):
    """The reference core on the concatenated keys, the GLMMask materialised."""
    if past_k is not None:
        k, v = torch.cat((past_k, k)), torch.cat((past_v, v))
    if isinstance(mask, GLMMask):
        mask = mask.materialize(q.shape[0], k.shape[0])
    return reference.attention_core(q, k, v, mask, layer_id)[0]


def make_case(sq, b, nh, hd, prefix, cached, pads, contexts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, sq, b, nh, hd, generator=g) * 1.5).unbind(0)
    La = prefix + cached
    past = (torch.randn(2, La, b, nh, hd, generator=g)).unbind(0) if La else (None, None)
    mask = GLMMask(prefix, torch.tensor(pads), torch.tensor(contexts)) if pads is not None else None
    return q, k, v, past[0], past[1], mask


CASES = {
    # name: (sq, b, nh, hd, prefix, cached tokens, pads, contexts)
    "prefill-prefix8-leftpad": (33, 3, 2, 64, 8, 0, [0, 3, 5], [10, 12, 33]),
    "prefill-prefix1-hd128": (7, 1, 2, 128, 1, 0, [0], [4]),
    "prefill-no-prefix-skip-blocks": (70, 2, 2, 128, 0, 0, [0, 5], [20, 30]),
    "one-query-with-grad": (1, 3, 2, 64, 0, 12, [0, 2, 4], [5, 6, 7]),
    "chunk-after-cache": (9, 2, 2, 64, 8, 20, [0, 4], [15, 18]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_fp32(name):
    q, k, v, pk, pv, mask = make_case(*CASES[name])
    inputs = [t for t in (q, k, v, pk, pv)]
    ours = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    refs = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    layer_id = 5
    out, _ = ops.glm_attention(ours[0], ours[1], ours[2], layer_id, mask, past_k=ours[3], past_v=ours[4],
                               backend="triton")
    ref = reference_attention(refs[0], refs[1], refs[2], layer_id, mask, refs[3], refs[4])
    assert_fp32_close(out, ref, 1e-4, f"{name} output")
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for label, a, r in zip("q k v past_k past_v".split(), ours, refs):
        if a is not None:
            assert_fp32_close(a.grad, r.grad, 1e-4, f"{name} d{label}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["prefill-prefix8-leftpad", "prefill-no-prefix-skip-blocks"])
def test_forward_and_gradients_low_precision(name, dtype):
    q, k, v, pk, pv, mask = make_case(*CASES[name])
    inputs = (q, k, v, pk, pv)
    grad = torch.randn(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() if t is not None else None for t in inputs]
        out = fn(leaves)
        out.backward(grad.to(cast))
        return [out] + [t.grad for t in leaves if t is not None]

    ours = run(lambda x: ops.glm_attention(x[0], x[1], x[2], 3, mask, past_k=x[3], past_v=x[4],
                                           backend="triton")[0], dtype)
    ref32 = run(lambda x: reference_attention(*x[:3], 3, mask, x[3], x[4]), torch.float32)
    reflow = run(lambda x: reference_attention(*x[:3], 3, mask, x[3], x[4]), dtype)
    for label, a, rl, r32 in zip(["out", "dq", "dk", "dv", "dpast_k", "dpast_v"], ours, reflow, ref32):
        assert a.dtype == dtype
        assert_lowp_close(a, rl, r32, f"{name} {dtype} {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 128])
def test_decode_over_a_cache(dtype, hd):
    # one new token over prefix 8 + 40 cached tokens, left padding: the split-K decode kernel
    q, k, v, pk, pv, mask = make_case(1, 3, 2, hd, 8, 40, [0, 6, 11], [20, 25, 30])
    splits, _ = attn.decode_config(3 * 2, 8 + 41, hd)
    assert splits > 1  # the chunks are really combined
    with torch.no_grad():
        out, _ = ops.glm_attention(q.to(dtype), k.to(dtype), v.to(dtype), 7, mask, past_k=pk.to(dtype),
                                   past_v=pv.to(dtype), backend="triton")
        ref32 = reference_attention(q, k, v, 7, mask, pk, pv)
        if dtype == torch.float32:
            assert_fp32_close(out, ref32, 1e-4, "decode fp32")
        else:
            reflow = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), 7, mask, pk.to(dtype), pv.to(dtype))
            assert_lowp_close(out, reflow, ref32, f"decode {dtype}")


def test_decode_without_mask_and_with_bool_mask():
    q, k, v, pk, pv, _ = make_case(1, 2, 2, 64, 0, 30, None, None)
    bool_mask = torch.rand(2, 1, 1, 31) < 0.4
    bool_mask[1] = True  # a fully masked row: uniform over every key
    with torch.no_grad():
        for mask in (None, bool_mask):
            out, _ = ops.glm_attention(q, k, v, 2, mask, past_k=pk, past_v=pv, backend="triton")
            assert_fp32_close(out, reference_attention(q, k, v, 2, mask, pk, pv), 1e-4, f"decode mask={mask is None}")
    expected = torch.cat((pv, v))[:, 1].mean(0).reshape(-1)
    assert torch.allclose(out[0, 1], expected, atol=1e-5)


def test_explicit_bool_mask_with_all_masked_rows():
    q, k, v, pk, pv, _ = make_case(20, 2, 2, 64, 0, 5, None, None)
    mask = torch.rand(2, 1, 20, 25) < 0.5
    mask[0, :, 3] = True
    mask[1, :, 19] = True
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    refs = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out, _ = ops.glm_attention(*leaves[:3], 9, mask[:1].expand(2, -1, -1, -1), past_k=leaves[3],
                               past_v=leaves[4], backend="triton")
    ref = reference_attention(*refs[:3], 9, mask[:1].expand(2, -1, -1, -1), refs[3], refs[4])
    assert torch.isfinite(out).all()
    assert_fp32_close(out, ref, 1e-4, "bool mask output")
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(leaves, refs):
        assert_fp32_close(a.grad, r.grad, 1e-4, "bool mask gradient")


def test_compact_mask_equals_its_boolean_form():
    q, k, v, pk, pv, mask = make_case(*CASES["prefill-prefix8-leftpad"])
    dense = mask.materialize(q.shape[0], pk.shape[0] + k.shape[0])
    with torch.no_grad():
        a, _ = ops.glm_attention(q, k, v, 1, mask, past_k=pk, past_v=pv, backend="triton")
        b, _ = ops.glm_attention(q, k, v, 1, dense, past_k=pk, past_v=pv, backend="triton")
    assert_fp32_close(a, b, 1e-5, "GLMMask vs its bool mask")


def test_output_attentions_returns_the_probabilities():
    q, k, v, pk, pv, mask = make_case(5, 1, 2, 64, 2, 0, [0], [3])
    ctx, probs = ops.glm_attention(q, k, v, 4, mask, output_attentions=True, past_k=pk, past_v=pv,
                                   backend="triton")
    full_k, full_v = torch.cat((pk, k)), torch.cat((pv, v))
    ref_ctx, ref_probs = reference.attention_core(q, full_k, full_v, mask.materialize(5, 7), 4)
    assert_fp32_close(probs, ref_probs, 1e-4, "probabilities")
    assert_fp32_close(ctx, ref_ctx, 1e-4, "context")


def test_rejects_bad_shapes():
    q, k, v, pk, pv, mask = make_case(4, 1, 2, 64, 2, 0, [0], [2])
    with pytest.raises(ValueError, match="head dims"):
        ops.glm_attention(q[..., :48], k[..., :48], v[..., :48], 0, None, backend="triton")
    with pytest.raises(ValueError, match="past_k must be"):
        ops.glm_attention(q, k, v, 0, mask, past_k=pk[:, :, :1], past_v=pv, backend="triton")
    with pytest.raises(ValueError, match="prefix_len=2 exceeds the 1 keys"):
        ops.glm_attention(q, k[:1], v[:1], 0, mask, backend="triton")


def test_compile_specs_cover_every_launch_config():
    specs = {(s.name, tuple(sorted((k, v) for k, v in s.constexprs.items() if k != "UPCAST")), s.num_warps)
             for s in attn.compile_specs()}

    def listed(kernel, consts, warps):
        return (kernel, tuple(sorted(consts.items())), warps) in specs

    for hd in attn.HEAD_DIMS:
        for mode in (attn.MASK_NONE, attn.MASK_GLM, attn.MASK_BOOL):
            for sq in (1, 16, 17, 1024):
                cfg = attn.fwd_config(sq, hd, mode)
                assert listed("_attn_fwd", dict(HD=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                 MASK_MODE=mode, PRECISION="tf32"), cfg["num_warps"])
            cfg = attn.bwd_config(hd)
            assert listed("_attn_bwd_dkdv", dict(HD=hd, BLOCK_M=cfg["BLOCK_M_KV"], BLOCK_N=cfg["BLOCK_N_KV"],
                                                 MASK_MODE=mode, PRECISION="tf32"), cfg["num_warps"])
            assert listed("_attn_bwd_dq", dict(HD=hd, BLOCK_M=cfg["BLOCK_M_Q"], BLOCK_N=cfg["BLOCK_N_Q"],
                                               MASK_MODE=mode, PRECISION="tf32"), cfg["num_warps"])
            assert listed("_attn_decode_partial", dict(HD=hd, BLOCK_N=attn.decode_block_n(hd), MASK_MODE=mode), 4)
    for heads in (1, 32, 256):
        for L in (1, 100, 2048 + 128):
            splits, _ = attn.decode_config(heads, L, 128)
            assert 1 <= splits <= attn.DECODE_MAX_SPLITS
