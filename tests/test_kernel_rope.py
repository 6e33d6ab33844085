"""Triton `rope_qkv` (glm_kernels/kernels/rope.py) under the interpreter, against the torch path and the reference."""
import pytest
import torch

from glm_kernels import ops, reference
from glm_kernels.kernels import rope
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close

LOWP = [torch.float16, torch.bfloat16]
N_TABLE = 2048  # rows of the rotary tables (max_sequence_length of ChatGLM-6B)


def _inputs(s, b, nh, hd, dtype=torch.float32, max_pos=N_TABLE):
    mixed = torch.randn(s, b, 3 * nh * hd).to(dtype)
    pos = torch.randint(0, max_pos, (b, 2, s))
    return mixed, pos


def _tables(hd, dtype, n=N_TABLE):
    return ops.rotary_table(n, hd // 2, dtype)


def _rope(mixed, pos, nh, backend, tables_dtype=None, k_out=None, v_out=None):
    cos, sin = _tables(mixed.shape[-1] // (3 * nh), tables_dtype or mixed.dtype)
    return ops.rope_qkv(mixed, pos, cos.to(mixed.dtype), sin.to(mixed.dtype), nh, k_out, v_out, backend=backend)


@pytest.mark.parametrize("s,b,nh,hd", [(1, 1, 2, 32), (7, 3, 4, 32), (33, 1, 2, 64), (7, 3, 2, 64),
                                       (1, 3, 2, 128), (33, 3, 1, 128)])
def test_forward_fp32_matches_torch_and_reference(s, b, nh, hd):
    mixed, pos = _inputs(s, b, nh, hd)
    out = _rope(mixed, pos, nh, "triton")
    ref = _rope(mixed, pos, nh, "torch")
    q, k, v = mixed.view(s, b, nh, 3 * hd).split(hd, dim=-1)
    rq, rk = reference.rotary_2d(q, k, pos)
    for name, o, r, rr in zip("qkv", out, ref, (rq, rk, v)):
        assert o.shape == (s, b, nh, hd) and o.dtype == torch.float32 and o.is_contiguous()
        assert_fp32_close(o, r, 1e-5, f"{name} vs torch path")  # element-wise rule
        assert_fp32_close(o, rr, 1e-5, f"{name} vs reference")  # element-wise rule


def test_forward_fp32_strided_inputs():
    """mixed with non-contiguous s/b axes (a transposed batch-first tensor) and transposed position ids."""
    s, b, nh, hd = 7, 3, 2, 64
    mixed = torch.randn(b, s, 3 * nh * hd).transpose(0, 1)
    pos = torch.randint(0, N_TABLE, (s, 2, b)).permute(2, 1, 0)
    assert not mixed.is_contiguous() and not pos.is_contiguous()
    out = _rope(mixed, pos, nh, "triton")
    ref = _rope(mixed.contiguous(), pos.contiguous(), nh, "torch")
    for name, o, r in zip("qkv", out, ref):
        assert_fp32_close(o, r, 1e-5, f"strided {name}")  # element-wise rule


def _lowp_refs(mixed32, pos, nh, dtype):
    """torch path in `dtype`; torch path in fp32 with fp32 tables; torch path in fp32 with the `dtype` tables upcast.

    The last isolates the kernel's arithmetic: fp16 tables round the angle
    (spacing 1 rad at positions 1024-2047), which dominates the error against
    fp32 tables and would make that comparison loose.
    """
    lowp = _rope(mixed32.to(dtype), pos, nh, "torch")
    ref32 = _rope(mixed32, pos, nh, "torch")
    ref32_same_tables = _rope(mixed32, pos, nh, "torch", tables_dtype=dtype)
    return lowp, ref32, ref32_same_tables


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("s,b,nh,hd", [(1, 3, 2, 128), (7, 1, 4, 32), (33, 3, 2, 64)])
def test_forward_low_precision(dtype, s, b, nh, hd):
    mixed32, pos = _inputs(s, b, nh, hd)
    pos[0, :, -1] = 2000  # a large position (fp16 tables)
    mixed32 = mixed32.to(dtype).float()  # exactly representable in dtype: every path sees the same inputs
    out = _rope(mixed32.to(dtype), pos, nh, "triton")
    lowp, ref32, ref32_same = _lowp_refs(mixed32, pos, nh, dtype)
    for name, o, rl, r32, r32s in zip("qkv", out, lowp, ref32, ref32_same):
        assert o.dtype == dtype and o.shape == (s, b, nh, hd)
        assert_lowp_close(o, rl, r32, f"{dtype} {name} vs fp32 tables")  # low-precision rule
        assert_lowp_close(o, rl, r32s, f"{dtype} {name} vs fp32 math on {dtype} tables")  # low-precision rule
    assert torch.equal(out[2], mixed32.to(dtype).view(s, b, nh, 3 * hd)[..., 2 * hd:])  # v is a copy: exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_buffer_write_at_offset(dtype):
    s, b, nh, hd, total, offset = 7, 3, 2, 64, 20, 9
    mixed32, pos = _inputs(s, b, nh, hd)
    mixed32 = mixed32.to(dtype).float()
    mixed = mixed32.to(dtype)
    # k and v interleaved in one buffer [S, b, 2, nh, hd]: the views have non-trivial strides.
    kv = torch.randn(total, b, 2, nh, hd).to(dtype)
    before = kv.clone()
    k_out, v_out = kv[offset:offset + s, :, 0], kv[offset:offset + s, :, 1]
    with torch.no_grad():
        q, k, v = _rope(mixed, pos, nh, "triton", k_out=k_out, v_out=v_out)
    assert k is k_out and v is v_out
    rest = torch.ones(total, dtype=torch.bool)
    rest[offset:offset + s] = False
    assert torch.equal(kv[rest], before[rest]), "the KV buffer outside [offset, offset + s) changed"
    ref = _rope(mixed, pos, nh, "torch")
    if dtype == torch.float32:
        for name, o, r in zip("qkv", (q, kv[offset:offset + s, :, 0], kv[offset:offset + s, :, 1]), ref):
            assert_fp32_close(o, r, 1e-5, f"cache write {name}")  # element-wise rule
    else:
        _, ref32, ref32_same = _lowp_refs(mixed32, pos, nh, dtype)
        for name, o, rl, r32 in zip("qkv", (q, kv[offset:offset + s, :, 0], kv[offset:offset + s, :, 1]), ref,
                                    ref32_same):
            assert_lowp_close(o, rl, r32, f"cache write {name}")  # low-precision rule
    # And the same as writing fresh tensors then concatenating the past, as the original does.
    fresh = _rope(mixed, pos, nh, "triton")
    assert torch.equal(kv[:offset + s, :, 0], torch.cat((before[:offset, :, 0], fresh[1])))
    assert torch.equal(kv[:offset + s, :, 1], torch.cat((before[:offset, :, 1], fresh[2])))


def _grad(mixed, pos, nh, backend, used, weights, tables_dtype=None):
    m = mixed.detach().clone().requires_grad_()
    out = _rope(m, pos, nh, backend, tables_dtype=tables_dtype)
    loss = sum((out["qkv".index(n)].float() * weights["qkv".index(n)]).sum() for n in used)
    loss.backward()
    return m.grad


@pytest.mark.parametrize("used", ["qv", "k", "qkv", "v"])
@pytest.mark.parametrize("s,b,nh,hd", [(7, 3, 2, 32), (1, 1, 2, 128)])
def test_gradient_fp32(used, s, b, nh, hd):
    mixed, pos = _inputs(s, b, nh, hd)
    w = torch.randn(3, s, b, nh, hd)
    g = _grad(mixed, pos, nh, "triton", used, w)
    ref = _grad(mixed, pos, nh, "torch", used, w)
    assert g.shape == mixed.shape
    assert_fp32_close(g, ref, 1e-5, f"dmixed ({used} used)")  # element-wise rule, against the gradient's scale
    for n, part in zip("qkv", g.view(s, b, nh, 3, hd).unbind(3)):
        if n not in used:
            assert torch.count_nonzero(part) == 0, f"d{n} is absent but its slot of dmixed is not zero"


@pytest.mark.parametrize("dtype", LOWP)
def test_gradient_low_precision(dtype):
    s, b, nh, hd = 7, 3, 2, 64
    mixed32, pos = _inputs(s, b, nh, hd)
    mixed32 = mixed32.to(dtype).float()
    w = torch.randn(3, s, b, nh, hd).to(dtype).float()
    g = _grad(mixed32.to(dtype), pos, nh, "triton", "qkv", w)
    gl = _grad(mixed32.to(dtype), pos, nh, "torch", "qkv", w)
    g32 = _grad(mixed32, pos, nh, "torch", "qkv", w)
    g32_same = _grad(mixed32, pos, nh, "torch", "qkv", w, tables_dtype=dtype)
    assert g.dtype == dtype
    assert_lowp_close(g, gl, g32, f"{dtype} dmixed vs fp32 tables")  # low-precision rule
    assert_lowp_close(g, gl, g32_same, f"{dtype} dmixed vs fp32 math on {dtype} tables")  # low-precision rule


def test_cache_write_is_inference_only():
    s, b, nh, hd = 2, 1, 2, 32
    mixed, pos = _inputs(s, b, nh, hd)
    mixed.requires_grad_()
    kv = torch.zeros(2, 4, b, nh, hd)
    with pytest.raises(ValueError, match="inference-only"):
        _rope(mixed, pos, nh, "triton", k_out=kv[0, 1:3], v_out=kv[1, 1:3])
    assert torch.count_nonzero(kv) == 0
    with torch.no_grad():  # the same call without autograd is fine
        _rope(mixed, pos, nh, "triton", k_out=kv[0, 1:3], v_out=kv[1, 1:3])
    assert torch.count_nonzero(kv[:, 1:3]) > 0


@pytest.mark.parametrize("hd", [8, 48, 512])
def test_rejects_unsupported_head_dim(hd):
    mixed, pos = _inputs(2, 1, 2, hd)
    cos, sin = ops.rotary_table(16, max(hd // 2, 2), torch.float32)
    with pytest.raises(ValueError, match=f"hd={hd}"):
        ops.rope_qkv(mixed, pos % 16, cos, sin, 2, backend="triton")


def test_rejects_positions_outside_the_table():
    mixed, pos = _inputs(3, 1, 2, 32, max_pos=16)
    pos[0, 1, 2] = 16
    cos, sin = ops.rotary_table(16, 16, torch.float32)
    with pytest.raises(IndexError, match="16 rows"):
        ops.rope_qkv(mixed, pos, cos, sin, 2, backend="triton")


def test_bytes_moved_match_formula():
    """hd 128, nh 20: BLOCK_H 16, so G = 2 programs per token (table rows and position ids read twice)."""
    s, b, nh, hd, e = 3, 2, 20, 128, 2
    blk = rope.launch_config(hd)["BLOCK_H"]
    groups = -(-nh // blk)
    assert groups == 2
    mixed, pos = _inputs(s, b, nh, hd, torch.float16)
    tables = 16 + 2 * hd * e  # per program: two int64 position ids, four table rows of hd/2
    qkv = s * b * nh * hd * e  # one of q, k, v
    unique_rows = torch.unique(pos).numel()  # rows of cos (and of sin) any token selects

    m = mixed.clone().requires_grad_()
    with count_traffic() as fwd:
        q, k, v = _rope(m, pos, nh, "triton")
    t = fwd["_rope_qkv_kernel"]
    assert t.launches == 1
    assert t.loaded == 3 * qkv + s * b * groups * tables
    assert t.stored == t.stored_unique == 3 * qkv
    assert t.loaded_unique == 3 * qkv + s * b * 16 + unique_rows * hd * e  # every input byte is read

    with count_traffic() as bwd:  # loss uses q and v only: dk is None
        (q.float().sum() + v.float().sum()).backward()
    t = bwd["_rope_qkv_kernel"]
    assert t.launches == 1
    assert t.loaded == 2 * qkv + s * b * groups * tables
    assert t.stored == t.stored_unique == 3 * qkv

    m = mixed.clone().requires_grad_()
    with count_traffic() as bwd_v:  # dv only: no rotation, so no position ids or table rows are read
        _rope(m, pos, nh, "triton")[2].float().sum().backward()
    t = bwd_v["_rope_qkv_kernel"]
    assert t.launches == 2  # forward and backward
    assert t.loaded == (3 * qkv + s * b * groups * tables) + qkv
    assert t.stored == 3 * qkv + 3 * qkv


def test_compile_specs_cover_every_launch_config():
    specs = rope.compile_specs()
    seen = {(sp.extra["dtype"], sp.constexprs["HEAD_DIM"], sp.constexprs["BLOCK_H"], sp.constexprs["INVERSE"],
             sp.num_warps) for sp in specs}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hd in (16, 32, 64, 128, 256):
            cfg = rope.launch_config(hd)
            for inverse in (False, True):
                assert (dtype, hd, cfg["BLOCK_H"], inverse, cfg["num_warps"]) in seen
    assert len(seen) == len(specs) == 30


@pytest.mark.parametrize("used", ["qk", "q"])
def test_arbitrary_tables_forward_and_transpose(used):
    """Random cos/sin rows whose two halves differ: checks the rotation and its exact transpose (the backward
    uses sin halves swapped and negated; for `cat(freqs, freqs)` tables that is simply sin negated)."""
    s, b, nh, hd, n = 7, 3, 2, 32, 50
    mixed, pos = _inputs(s, b, nh, hd, max_pos=n)
    cos, sin = torch.randn(2, n, hd // 2).unbind(0)
    w = torch.randn(3, s, b, nh, hd)
    grads, outs = [], []
    for backend in ("triton", "torch"):
        m = mixed.clone().requires_grad_()
        out = ops.rope_qkv(m, pos, cos, sin, nh, backend=backend)
        sum((out["qkv".index(c)] * w["qkv".index(c)]).sum() for c in used).backward()
        outs.append(out)
        grads.append(m.grad)
    for name, o, r in zip("qkv", *outs):
        assert_fp32_close(o, r, 1e-5, f"random tables {name}")  # element-wise rule
    assert_fp32_close(grads[0], grads[1], 1e-5, f"random tables dmixed ({used} used)")  # element-wise rule
