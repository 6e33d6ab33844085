"""Triton GLM attention under the interpreter: forward and every gradient against the reference.

Tolerances (GLM_SPEC.md): fp32 max abs error <= 1e-4 * max|ref| (attention rule), gradients the same
against the reference gradient's scale; fp16/bf16 error vs the fp32 reference <= 2 * the low-precision
reference's own error + 1e-3 * scale.
"""
import pytest
import torch

from glm_kernels import ops, reference
from glm_kernels.backend import TARGETS, assume_device
from glm_kernels.kernels import attention as attn
from glm_kernels.kernels.common import specialization_key
from glm_kernels.ops.mask import GLMMask
from glm_kernels.tools.traffic import count_traffic
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
    # several key and query blocks after a prefix and cached tokens, left padding: the dK/dV kernel skips query
    # blocks before the causal edge of each key block
    "causal-skip-prefix-past-pad": (70, 2, 1, 64, 4, 6, [0, 9], [12, 40]),
    "causal-skip-prefix-past-pad-hd128": (40, 2, 1, 128, 3, 10, [0, 7], [9, 20]),
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
@pytest.mark.parametrize("name", ["prefill-prefix8-leftpad", "prefill-no-prefix-skip-blocks",
                                  "causal-skip-prefix-past-pad"])
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
    """On every target, every configuration the launchers choose (by dtype, head dim, mask, query count) is listed."""
    for sm, info in TARGETS.items():
        specs = {(s.name, s.extra["dtype"], tuple(sorted((k, v) for k, v in s.constexprs.items() if k != "UPCAST")),
                  s.num_warps, s.num_stages) for s in attn.compile_specs(info)}

        def listed(kernel, dtype, consts, warps, stages):
            return (kernel, dtype, tuple(sorted(consts.items())), warps, stages) in specs

        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            prec = "ieee" if dtype == torch.float32 else "tf32"
            for hd in attn.HEAD_DIMS:
                for mode in (attn.MASK_GLM, attn.MASK_BOOL):
                    for sq in (2, 16, 17, 1024):
                        cfg = attn.fwd_config(sq, hd, dtype, mode, info)
                        assert listed("_attn_fwd", dtype, dict(HD=hd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                                MASK_MODE=mode, PRECISION=prec),
                                      cfg["num_warps"], cfg["num_stages"]), (sm, dtype, hd, mode, sq)
                    cfg = attn.bwd_config(hd, dtype, info)
                    assert listed("_attn_bwd_dkdv", dtype, dict(HD=hd, BLOCK_M=cfg["BLOCK_M_KV"], BLOCK_N=cfg["BLOCK_N_KV"],
                                                                MASK_MODE=mode, PRECISION=prec),
                                  cfg["num_warps_kv"], cfg["num_stages"])
                    assert listed("_attn_bwd_dq", dtype, dict(HD=hd, BLOCK_M=cfg["BLOCK_M_Q"], BLOCK_N=cfg["BLOCK_N_Q"],
                                                              MASK_MODE=mode, PRECISION=prec),
                                  cfg["num_warps_q"], cfg["num_stages"])
                    assert listed("_attn_decode_partial", dtype,
                                  dict(HD=hd, BLOCK_N=attn.decode_block_n(hd), MASK_MODE=mode), 4, 2)
    for heads in (1, 32, 256):
        for L in (1, 100, 2048 + 128):
            splits, _ = attn.decode_config(heads, L, 128)
            assert 1 <= splits <= attn.DECODE_MAX_SPLITS


def test_launch_configuration_depends_on_the_device():
    t4, a100, rtx = TARGETS[75], TARGETS[80], TARGETS[86]
    for hd in attn.HEAD_DIMS:
        # tensor cores from sm_80: the large tiles; sm_75 (and fp32 everywhere): the FMA tables
        assert attn._kind(torch.float16, a100) == "mma" and attn._kind(torch.float16, rtx) == "mma_99k"
        assert attn._kind(torch.float16, t4) == attn._kind(torch.float32, t4) == "fma_64k"
        assert attn._kind(torch.float32, a100) == attn._kind(torch.float32, TARGETS[90]) == "fma"
        assert attn.bwd_config(hd, torch.float16, t4)["BLOCK_M_Q"] <= attn.bwd_config(hd, torch.float16, a100)["BLOCK_M_Q"]
    assert attn.bwd_config(128, torch.float16, t4) != attn.bwd_config(128, torch.float16, a100)
    assert attn.bwd_config(128, torch.float32, a100) != attn.bwd_config(128, torch.float16, a100)


def _recorded_launches(monkeypatch):
    seen = []
    real = attn.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append((kernel.__name__, kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(attn, "launch", record)
    return seen


def test_fp32_backward_hd128_runs_the_fp32_configs(monkeypatch):
    # fp32 dots are IEEE FMAs: the fp32 table (it fits 99 KiB and does not spill, unlike the fp16 one would)
    seen = _recorded_launches(monkeypatch)
    test_forward_and_gradients_fp32("causal-skip-prefix-past-pad-hd128")
    cfg = attn.bwd_config(128, torch.float32, TARGETS[80])
    assert cfg == attn.bwd_config(128, torch.float32, TARGETS[86])
    kv = next(kw for name, kw in seen if name == "_attn_bwd_dkdv")
    dq = next(kw for name, kw in seen if name == "_attn_bwd_dq")
    assert (kv["BLOCK_M"], kv["BLOCK_N"], kv["num_warps"]) == (cfg["BLOCK_M_KV"], cfg["BLOCK_N_KV"], cfg["num_warps_kv"])
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dq["num_warps"]) == (cfg["BLOCK_M_Q"], cfg["BLOCK_N_Q"], cfg["num_warps_q"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_t4_configs_under_the_interpreter(monkeypatch, dtype):
    """With the device pretending to be a T4: its small tiles and fp32 dots, forward and every gradient."""
    seen = _recorded_launches(monkeypatch)
    with assume_device(TARGETS[75]):
        test_forward_and_gradients_low_precision("prefill-prefix8-leftpad", dtype) if dtype != torch.float32 else \
            test_forward_and_gradients_fp32("prefill-prefix8-leftpad")
    cfg = attn.bwd_config(64, dtype, TARGETS[75])
    kv = next(kw for name, kw in seen if name == "_attn_bwd_dkdv")
    assert (kv["BLOCK_M"], kv["BLOCK_N"], kv["num_warps"]) == (cfg["BLOCK_M_KV"], cfg["BLOCK_N_KV"], cfg["num_warps_kv"])
    # no tensor cores: fp16 tiles go to fp32 FMA dots (fp32 ones are fp32 already)
    assert all(kw["UPCAST"] == (dtype != torch.float32) for name, kw in seen if "MASK_MODE" in kw)


def _dkdv_bytes(case, causal):
    q, k, v, pk, pv, mask = make_case(*CASES[case])
    mask = GLMMask(mask.prefix_len, mask.pad, mask.context, causal=causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv) if t is not None]
    out, _ = ops.glm_attention(*leaves[:3], 1, mask, past_k=leaves[3] if pk is not None else None,
                               past_v=leaves[4] if pk is not None else None, backend="triton")
    with count_traffic() as c:
        out.backward(torch.ones_like(out))
    return c["_attn_bwd_dkdv"].loaded


@pytest.mark.parametrize("case", ["causal-skip-prefix-past-pad", "prefill-no-prefix-skip-blocks"])
def test_dkdv_visits_only_the_query_blocks_that_see_the_keys(case):
    # the gradients themselves are checked by the parity tests of these cases (fp32 and fp16/bf16)
    assert _dkdv_bytes(case, causal=True) < 0.85 * _dkdv_bytes(case, causal=False)


def test_offsets_past_2_to_the_31_elements():
    """Row 2 of q and of the past keys sits 2^31 elements past row 0: offsets formed in int32 would wrap.

    The 4 GiB buffer is never touched but for the rows used (its pages are not committed)."""
    n = 2 ** 30
    big = torch.empty(2 * n + 4096, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)

    def strided(rows, values):
        t = torch.as_strided(big, (rows, 1, 1, 32), (n, 32, 32, 1), storage_offset=values)
        t.copy_(torch.randn(rows, 1, 1, 32, generator=g).half())
        return t

    q, pk = strided(3, 0), strided(3, 64)
    k, v, pv = (torch.randn(3, 1, 1, 32, generator=g).half() for _ in range(3))
    mask = GLMMask(1, torch.zeros(1, dtype=torch.long), torch.tensor([1]))
    with torch.no_grad():
        out, _ = ops.glm_attention(q, k, v, 0, mask, past_k=pk, past_v=pv, backend="triton")
        ref = reference_attention(q.float(), k.float(), v.float(), 0, mask, pk.float(), pv.float())
        assert_fp32_close(out.float(), ref, 2e-3, "huge strides, prefill")  # fp16 inputs: fp16 rounding of out
        out1, _ = ops.glm_attention(q[2:], k[2:], v[2:], 0, None, past_k=pk, past_v=pv, backend="triton")
        ref1 = reference_attention(q[2:].float(), k[2:].float(), v[2:].float(), 0, None, pk.float(), pv.float())
        assert_fp32_close(out1.float(), ref1, 2e-3, "huge strides, decode")


def test_decode_compiles_once_over_a_2048_token_generation(monkeypatch):
    """The JIT's specialisation key of each decode launch is the same at every length: no recompiles."""
    keys = {}
    real = attn.launch

    def record(kernel, grid, *args, **kwargs):
        keys.setdefault(kernel.__name__, set()).add(specialization_key(kernel, args, kwargs))

    monkeypatch.setattr(attn, "launch", record)  # record only: the keys, not the (slow) interpreted run
    b, nh, hd, P = 2, 4, 64, 8
    cache_k = torch.zeros(P + 2048, b, nh, hd, dtype=torch.float16)
    mask = GLMMask(P, torch.tensor([0, 3]), torch.tensor([5, 7]))
    q = torch.zeros(1, b, nh, hd, dtype=torch.float16)
    lengths = list(range(1, 40)) + [63, 64, 65, 127, 128, 129, 144, 255, 256, 1024, 1921, 2047, 2048]
    with torch.no_grad():
        for T in lengths:
            kv = cache_k[:P + T]
            ops.glm_attention(q, kv[-1:], kv[-1:], 3, mask, past_k=kv[:-1], past_v=kv[:-1], backend="triton")
    # the other kernels of a decode step: rope writing into the cache at the step's offset, LayerNorm, GeLU
    from glm_kernels.kernels import gelu, layernorm, rope
    for module in (rope, layernorm, gelu):
        monkeypatch.setattr(module, "launch", record)
    h = nh * hd
    cos, sin = ops.rotary_table(P + 2048, hd // 2, torch.float16)
    with torch.no_grad():
        for T in lengths:
            mixed = torch.zeros(1, b, 3 * h, dtype=torch.float16)
            pos = torch.tensor([[[5], [T]], [[7], [T]]])
            ops.rope_qkv(mixed, pos, cos, sin, nh, cache_k[P + T - 1:P + T], cache_k[P + T - 1:P + T], backend="triton")
            x = torch.zeros(1, b, h, dtype=torch.float16)
            ops.residual_layer_norm(x, x, 7.5, x[0, 0], x[0, 0], 1e-5, backend="triton")
            ops.bias_gelu(torch.zeros(1, b, 4 * h, dtype=torch.float16), None, backend="triton")
    assert {"_attn_decode_partial", "_attn_decode_combine", "_rope_qkv_kernel", "_ln_fwd_kernel",
            "_gelu_fwd_kernel"} == set(keys)
    assert all(len(k) == 1 for k in keys.values()), {name: len(k) for name, k in keys.items()}
    for module in (attn, rope, layernorm, gelu):
        monkeypatch.setattr(module, "launch", real)
    # the same holds for a run of the kernels themselves at a few lengths (and their keys match)
    with torch.no_grad():
        for T in (1, 17, 33):
            kv = torch.randn(P + T, b, nh, hd).half()
            out, _ = ops.glm_attention(q, kv[-1:], kv[-1:], 3, mask, past_k=kv[:-1], past_v=kv[:-1], backend="triton")
            assert torch.isfinite(out).all()
