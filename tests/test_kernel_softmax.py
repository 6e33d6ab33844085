"""Triton scaled masked softmax (glm_kernels/kernels/softmax.py) against the torch backend, under the interpreter.

Tolerances (GLM_SPEC.md): fp32 max abs error <= 1e-5 * max|ref| (element-wise op), forward and gradient;
fp16/bf16: error against the fp32 torch path <= 2 * (low-dtype torch path's error) + 1e-3 * max|ref32|.
"""
import pytest
import torch

from glm_kernels import ops
from glm_kernels.kernels import softmax as K
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FWD, FWD_CHUNKED = "_softmax_fwd_kernel", "_softmax_fwd_chunked_kernel"
BWD, BWD_CHUNKED = "_softmax_bwd_kernel", "_softmax_bwd_chunked_kernel"


@pytest.fixture
def small_chunks(monkeypatch):
    """Lower the chunking threshold so short rows take the chunked path: rows with sk > 64, chunks of 32."""
    monkeypatch.setattr(K, "MAX_FUSED_BLOCK", 64)
    monkeypatch.setattr(K, "CHUNK", 32)


def _make_mask(kind, b, sq, sk, p=0.3):
    if kind is None:
        return None
    if kind == "full":
        return torch.rand(b, 1, sq, sk) < p
    if kind == "bcast":  # [1, 1, sq, sk] and an expanded view with stride 0 on the batch
        return (torch.rand(1, 1, sq, sk) < p) if b == 1 else (torch.rand(1, 1, sq, sk) < p).expand(b, 1, sq, sk)
    raise ValueError(kind)


def _layout(x, layout):
    """x [b, nh, sq, sk] as a tensor with the same values and another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "permuted":  # storage [b, sq, nh, sk]: unit last stride, heads interleaved
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if layout == "strided_k":  # storage [b, nh, sk, sq]: last-dim stride sq
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def _run(scores, mask, scale, grad, backend):
    leaf = scores.detach().clone().requires_grad_()  # clone keeps the strides of a permuted dense tensor
    assert leaf.stride() == scores.stride()
    out = ops.scaled_masked_softmax(leaf, mask, scale, backend=backend)
    out.backward(grad)
    return out.detach(), leaf.grad


def check_parity(scores32, mask, scale, dtype, layout="contiguous", grad_layout="contiguous"):
    """Forward and d(scores) of the triton backend against the torch backend, with the spec's tolerances."""
    scores = _layout(scores32.to(dtype), layout)
    grad = _layout(torch.randn(scores32.shape).to(dtype), grad_layout)
    assert scores.is_contiguous() == (layout == "contiguous") and grad.is_contiguous() == (grad_layout == "contiguous")
    out, dscores = _run(scores, mask, scale, grad, "triton")
    assert out.dtype == dtype and dscores.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(dscores).all()
    if dtype == torch.float32:
        ref, dref = _run(scores, mask, scale, grad, "torch")
        assert_fp32_close(out, ref, 1e-5, "softmax fp32")  # element-wise op: 1e-5 * scale
        assert_fp32_close(dscores, dref, 1e-5, "softmax grad fp32")
    else:
        ref_lowp, dref_lowp = _run(scores, mask, scale, grad, "torch")
        ref32, dref32 = _run(scores.float(), mask, scale, grad.float(), "torch")
        assert_lowp_close(out, ref_lowp, ref32, f"softmax {dtype}")  # 2x low-dtype ref error + 1e-3 * scale
        assert_lowp_close(dscores, dref_lowp, dref32, f"softmax grad {dtype}")
    if mask is not None:  # masked_fill blocks the gradient: exactly zero at masked positions
        assert (dscores.float()[mask.expand_as(dscores)] == 0).all()
    return out, dscores


@pytest.mark.parametrize("scale", [1.0, 28.0])
@pytest.mark.parametrize("mask_kind", [None, "full", "bcast"])
@pytest.mark.parametrize("sk", [1, 7, 33, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_single_tile(dtype, sk, mask_kind, scale):
    b, nh, sq = 2, 3, 5
    with count_traffic() as counts:
        check_parity(torch.randn(b, nh, sq, sk) * 3, _make_mask(mask_kind, b, sq, sk), scale, dtype)
    # the torch runs launch nothing; the triton run is one forward and one backward launch
    assert counts[FWD].launches == 1 and counts[BWD].launches == 1 and FWD_CHUNKED not in counts


@pytest.mark.parametrize("mask_kind", [None, "full", "bcast"])
@pytest.mark.parametrize("sk", [65, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_chunked(dtype, sk, mask_kind, small_chunks):
    b, nh, sq = 2, 2, 3
    with count_traffic() as counts:
        check_parity(torch.randn(b, nh, sq, sk) * 3, _make_mask(mask_kind, b, sq, sk), 28.0, dtype)
    assert counts[FWD_CHUNKED].launches == 1 and counts[BWD_CHUNKED].launches == 1 and FWD not in counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_parity_chunked_default_threshold(dtype):
    """sk = 4100 > MAX_FUSED_BLOCK = 4096: the real chunked path (CHUNK 2048, 3 chunks, the last one 4 wide)."""
    b, nh, sq, sk = 1, 2, 1, 4100
    with count_traffic() as counts:
        check_parity(torch.randn(b, nh, sq, sk) * 3, _make_mask("full", b, sq, sk), 28.0, dtype)
    assert counts[FWD_CHUNKED].launches == 1 and counts[BWD_CHUNKED].launches == 1


@pytest.mark.parametrize("layout,grad_layout", [("permuted", "strided_k"), ("strided_k", "permuted"),
                                                ("contiguous", "permuted")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunked", [False, True])
def test_parity_non_contiguous(dtype, layout, grad_layout, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(K, "MAX_FUSED_BLOCK", 16)
        monkeypatch.setattr(K, "CHUNK", 16)
    b, nh, sq, sk = 2, 3, 4, 33
    check_parity(torch.randn(b, nh, sq, sk) * 3, _make_mask("bcast", b, sq, sk), 7.0, dtype, layout, grad_layout)


def test_expanded_gradient_and_fewer_dims():
    """Gradient with stride 0 everywhere (from .sum()) and 2D scores [sq, sk] with a 2D mask."""
    scores = torch.randn(5, 9)
    mask = torch.rand(5, 9) < 0.3
    a = scores.clone().requires_grad_()
    r = scores.clone().requires_grad_()
    out = ops.scaled_masked_softmax(a, mask, 3.0, backend="triton")
    ref = ops.scaled_masked_softmax(r, mask, 3.0, backend="torch")
    assert out.shape == ref.shape == (5, 9)
    assert_fp32_close(out, ref, 1e-5, "2D softmax")  # element-wise op: 1e-5 * scale
    (out * torch.arange(9.0)).sum().backward()
    (ref * torch.arange(9.0)).sum().backward()
    assert_fp32_close(a.grad, r.grad, 1e-5, "2D softmax grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [False, True])
def test_all_masked_rows_are_uniform_with_zero_gradient(dtype, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(K, "MAX_FUSED_BLOCK", 16)
        monkeypatch.setattr(K, "CHUNK", 16)
    b, nh, sq, sk = 2, 2, 4, 37
    scores = (torch.randn(b, nh, sq, sk) * 30).to(dtype)
    mask = torch.rand(b, 1, sq, sk) < 0.3
    mask[0, :, 1] = True  # a left-padded row: every key masked
    mask[1, :, :, :5] = True  # left-padded columns
    out, dscores = check_parity(scores.float(), mask, 28.0, dtype)
    uniform = torch.full((nh, sk), 1.0 / sk).to(dtype)
    assert torch.equal(out[0, :, 1], uniform)  # every logit -10000 * 28: exactly 1/sk, no NaN
    assert (dscores[0, :, 1] == 0).all()
    assert (out[1, :, :, :5] == 0).all()  # exp(-280000 - max) underflows to 0


@pytest.mark.parametrize("scale", [1.0, 28.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_large_magnitude_fp16(scale, chunked, monkeypatch):
    """fp16 scores near the fp16 range (|s| up to 6e4): the fp32 upcast before scaling must not overflow."""
    if chunked:
        monkeypatch.setattr(K, "MAX_FUSED_BLOCK", 32)
        monkeypatch.setattr(K, "CHUNK", 32)
    b, nh, sq, sk = 1, 2, 3, 70
    scores = (torch.randn(b, nh, sq, sk) * 2e4).clamp(-6e4, 6e4)
    scores[..., 3] = 60000.0  # a large max in the middle of the row
    out, _ = check_parity(scores, _make_mask("full", b, sq, sk, p=0.2), scale, torch.float16)
    assert (out.float().sum(-1) - 1).abs().max() < 0.05  # fp16 row sums: sk roundings of <= 2^-11 each


def test_bf16_fill_is_minus_10000_rounded_to_bf16():
    """masked_fill(-10000) in bf16 stores -9984: a masked entry ties an unmasked -9984, exactly as the original."""
    scores = torch.tensor([[-9984.0, -9984.0, -10048.0]]).bfloat16()
    mask = torch.tensor([[True, False, False]])
    out = ops.scaled_masked_softmax(scores, mask, 1.0, backend="triton")
    ref = ops.scaled_masked_softmax(scores, mask, 1.0, backend="torch")
    assert torch.equal(out, ref)
    assert out[0, 0] == out[0, 1] and abs(float(out[0, 0]) - 0.5) < 1e-6


def test_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        ops.scaled_masked_softmax(torch.randn(1, 1, 2, 3), torch.zeros(1, 1, 2, 3, dtype=torch.uint8), 1.0,
                                  backend="triton")


# ---------------------------------------------------------------------------------------------------------
# bytes moved
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mask_kind", [None, "bcast_heads"])
@pytest.mark.parametrize("chunked", [False, True])
def test_bytes_moved(dtype, mask_kind, chunked, monkeypatch):
    """Loaded/stored bytes of each launch equal the formulas of the module docstring.

    R = b*nh*sq rows, e = element size, mask 1 byte/element per row (broadcast over heads: nh times fewer
    distinct bytes). Single tile: forward reads R*sk*(e+1), writes R*sk*e; backward reads scores, dp and mask,
    R*sk*(2e+1), writes R*sk*e (the minimum: every input once). Chunked: both read their inputs twice.
    """
    if chunked:
        monkeypatch.setattr(K, "MAX_FUSED_BLOCK", 32)
        monkeypatch.setattr(K, "CHUNK", 16)
    b, nh, sq, sk = 2, 3, 4, 40
    R, e = b * nh * sq, torch.finfo(dtype).bits // 8
    has_mask = mask_kind is not None
    mask = (torch.rand(b, 1, sq, sk) < 0.3) if has_mask else None
    scores = torch.randn(b, nh, sq, sk).to(dtype).requires_grad_()
    grad = torch.randn(b, nh, sq, sk).to(dtype)
    with count_traffic() as fwd:
        out = ops.scaled_masked_softmax(scores, mask, 5.0, backend="triton")
    with count_traffic() as bwd:
        out.backward(grad)
    fname, bname = (FWD_CHUNKED, BWD_CHUNKED) if chunked else (FWD, BWD)
    assert set(fwd) == {fname} and set(bwd) == {bname}
    f, g = fwd[fname], bwd[bname]
    assert f.launches == 1 and g.launches == 1
    m = R * sk if has_mask else 0
    reads = 2 if chunked else 1
    # forward
    assert f.loaded == reads * (R * sk * e + m)
    assert f.stored == R * sk * e
    assert f.loaded_unique == R * sk * e + m // nh  # the mask rows are shared by the nh heads
    assert f.stored_unique == R * sk * e
    # backward: scores, dp and mask (twice when chunked)
    assert g.loaded == reads * (2 * R * sk * e + m)
    assert g.stored == R * sk * e
    assert g.loaded_unique == 2 * R * sk * e + m // nh
    # the documented formula functions state the same numbers
    assert K.forward_bytes(R, sk, e, has_mask, chunked) == (f.loaded, f.stored)
    assert K.backward_bytes(R, sk, e, has_mask, chunked) == (g.loaded, g.stored)
    # single tile is the minimum; the chunked path's 2x reads are explained in the module docstring
    if not chunked:
        assert f.loaded + f.stored == f.loaded_unique + f.stored_unique + (m - m // nh)
        assert g.loaded + g.stored == g.loaded_unique + g.stored_unique + (m - m // nh)


# ---------------------------------------------------------------------------------------------------------
# launch configurations and compile specs
# ---------------------------------------------------------------------------------------------------------
def test_every_launch_config_has_compile_specs():
    """Every configuration launch_config returns for sk in 1..9000 is compiled by compile_specs, for fp16, bf16, fp32,
    with and without mask, forward and backward; rows up to 4096 fit one tile, longer rows are chunked."""
    specs = K.compile_specs()
    covered = {}
    for s in specs:
        key = (tuple(sorted(s.extra["config"].items())), s.extra["dtype"], s.extra["has_mask"])
        covered.setdefault(key, set()).add(s.name)
    seen = set()
    for sk in range(1, 9001):
        cfg = K.launch_config(sk)
        assert cfg["chunked"] == (sk > 4096)
        if not cfg["chunked"]:
            assert sk <= cfg["BLOCK"] <= max(16, 2 * sk - 1)
        assert cfg["BLOCK_R"] * cfg["BLOCK"] <= 4096 and 4 <= cfg["num_warps"] <= 16
        seen.add(tuple(sorted(cfg.items())))
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for has_mask in (True, False):
                kernels = covered.get((tuple(sorted(cfg.items())), dtype, has_mask), set())
                want = {FWD_CHUNKED, BWD_CHUNKED} if cfg["chunked"] else {FWD, BWD}
                assert kernels == want, (sk, cfg, dtype, has_mask)
    assert len(specs) == len(seen) * 3 * 2 * 2  # configs x dtypes x mask x (fwd, bwd): nothing unreachable
