"""Triton weight-only INT8/INT4 linear (glm_kernels/kernels/quant_linear.py) under the interpreter.

The oracle is written here from the layout definition of the contract (issue 9), not from the kernels: weights are
quantized per output row (scale = max|w| / (2^(bits-1) - 1) in fp16, q = round(w / scale)), 4-bit values packed
as byte j = (q[2j] << 4) | (q[2j+1] & 0xF), and dequantized with plain torch (W = q * scale in fp32).
Tolerances (GLM_SPEC.md, "Weight-only INT8/INT4"): against the same dequantized weights in an ordinary matmul;
fp32: max abs error <= 1e-5 * max|ref| (the kernels sum exact products q*x in fp32 and scale once: ~4e-7 seen);
fp16/bf16: error vs the fp32 reference <= 2x the low-precision reference's own error + 1e-3 * scale, the
low-precision reference being x @ W^T in that dtype with W = (q * scale) rounded to it. Gradients the same way.
"""
import re

import pytest
import torch

from glm_kernels import backend
from glm_kernels.backend import TARGETS, assume_device
from glm_kernels.kernels import quant_linear as ql
from glm_kernels.kernels.common import specialization_key
from glm_kernels.tools import bytes_table as bt
from glm_kernels.tools.traffic import count_traffic
from helpers import assert_fp32_close, assert_lowp_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- the oracle (layout definition)


def quantize(w: torch.Tensor, bits: int):
    """THUDM layout of an fp32 `[out, in]` weight: (int8 weight storage, fp16 scale)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / qmax).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int16)
    if bits == 8:
        return q.to(torch.int8), scale
    byte = (q[:, 0::2] * 16 + (q[:, 1::2] & 0xF)) & 0xFF  # high nibble: element 2j; low nibble: element 2j + 1
    return byte.to(torch.uint8).view(torch.int8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """W = q * scale[:, None] in fp32, unpacking 4-bit values as sign-extended nibbles, high first."""
    if bits == 8:
        q = weight.to(torch.float32)
    else:
        u = weight.view(torch.uint8).to(torch.int16)
        nibbles = torch.stack((u >> 4, u & 0xF), dim=-1).reshape(weight.shape[0], -1)
        q = torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.float32)
    return q * scale.to(torch.float32)[:, None]


def case(rows, n_in, n_out, bits, dtype, scale_dtype=torch.float16, has_bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    weight, scale = quantize(torch.randn(n_out, n_in, generator=g), bits)
    x = torch.randn(*lead, rows, n_in, generator=g).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype) if has_bias else None
    dy = torch.randn(*lead, rows, n_out, generator=g).to(dtype)
    return x, weight, scale.to(scale_dtype), bias, dy


def run(fn, x, bias, dy, grads=("x", "bias")):
    """fn(x, bias) forward and backward with dy; {"y", "dx", "dbias"} for what requires grad."""
    xl = x.detach().clone().requires_grad_("x" in grads)
    bl = bias.detach().clone().requires_grad_("bias" in grads) if bias is not None else None
    y = fn(xl, bl)
    out = {"y": y.detach()}
    if xl.requires_grad or (bl is not None and bl.requires_grad):
        y.backward(dy)
        if xl.requires_grad:
            out["dx"] = xl.grad
        if bl is not None and bl.requires_grad:
            out["dbias"] = bl.grad
    return out


def triton_fn(weight, scale, bits):
    return lambda x, b: backend.call("quant_linear", x.device, "triton", x, weight, scale, bits, b)


def reference_fn(weight, scale, bits, dtype):
    """x @ W^T + bias with W dequantized in fp32 and then cast to `dtype` (an ordinary matmul in that dtype)."""
    w = dequantize(weight, scale, bits).to(dtype)
    return lambda x, b: torch.nn.functional.linear(x.to(dtype), w, None if b is None else b.to(dtype))


def compare(x, weight, scale, bias, dy, bits, grads=("x", "bias")):
    dtype = x.dtype
    out = run(triton_fn(weight, scale, bits), x, bias, dy, grads)
    assert out["y"].dtype == dtype and out["y"].shape == (*x.shape[:-1], weight.shape[0])
    ref32 = run(reference_fn(weight, scale, bits, torch.float32), x.float(), None if bias is None else bias.float(),
                dy.float(), grads)
    assert set(out) == set(ref32)
    what = f"bits={bits} {dtype} x{tuple(x.shape)} out={weight.shape[0]}"
    if dtype == torch.float32:
        for k in ref32:
            assert_fp32_close(out[k], ref32[k], 1e-5, f"{k} {what}")  # GLM_SPEC fp32 rule (1e-5: matmul, one rounding)
    else:
        ref_low = run(reference_fn(weight, scale, bits, dtype), x, bias, dy, grads)
        for k in ref32:
            assert out[k].dtype == dtype
            assert_lowp_close(out[k], ref_low[k], ref32[k], f"{k} {what}")  # GLM_SPEC fp16/bf16 rule
    return out


def recorded(monkeypatch):
    """Names of the kernels launched (the launches still run)."""
    seen = []
    real = ql.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append(kernel.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ql, "launch", record)
    return seen


# ----------------------------------------------------------------------------- the layout, by hand


def test_oracle_packs_high_nibble_first():
    q = torch.tensor([[7, -1, -8, 0, -1, 1, 0, -8]], dtype=torch.float32)
    byte = torch.tensor([[0x7F, 0x80, 0xF1, 0x08]], dtype=torch.uint8).view(torch.int8)
    assert torch.equal(dequantize(byte, torch.ones(1, dtype=torch.float16), 4), q)
    w = torch.tensor([[3.0, -2.0, 7.0, -7.0]])
    weight, scale = quantize(w, 4)
    assert float(scale) == 1.0 and weight.view(torch.uint8).tolist() == [[0x3E, 0x79]]


@pytest.mark.parametrize("rows", [8, 33])  # the GEMV (8 rows) and the GEMM (33)
def test_nibble_order_and_sign_extension(rows):
    """Bytes 0x7F, 0x80, 0xF1, 0x08 hold (7, -1), (-8, 0), (-1, 1), (0, -8): y = x @ W^T with x the identity reads
    the unpacked weights back; dX = dY @ W with dY one-hot does too. The kernels take 16-divisible sizes, so the two
    hand-written rows are repeated to a [16 out, 32 in] weight."""
    row_a, row_b = [0x7F, 0x80, 0xF1, 0x08] * 4, [0x08, 0xF1, 0x80, 0x7F] * 4
    byte = torch.tensor([row_a, row_b] * 8, dtype=torch.uint8).view(torch.int8)
    expected = torch.tensor([[7, -1, -8, 0, -1, 1, 0, -8] * 4, [0, -8, -1, 1, -8, 0, 7, -1] * 4] * 8,
                            dtype=torch.float32)
    scale = torch.tensor([1.0, 0.5] * 8, dtype=torch.float16)
    weights = expected * scale.float()[:, None]
    n = min(rows, 32)
    x = torch.zeros(rows, 32)
    x[:n] = torch.eye(32)[:n]
    x.requires_grad_()
    y = backend.call("quant_linear", "cpu", "triton", x, byte, scale, 4, None)
    assert torch.equal(y[:n].t(), weights[:, :n]) and torch.equal(y[n:], torch.zeros(rows - n, 16))
    dy = torch.zeros(rows, 16)
    dy[0, 0] = dy[1, 1] = 1.0
    y.backward(dy)
    assert torch.equal(x.grad[:2], weights[:2]) and torch.equal(x.grad[2:], torch.zeros(rows - 2, 32))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("rows", [1, 3, 8, 33, 70])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_and_input_gradient(bits, dtype, rows, monkeypatch):
    # in = 352, out = 48: 16-divisible (what the kernels take) but multiples of no K block above 32 (352 = 2*128 + 96
    # = 5*64 + 32) and of no N block above 16 (48 < 64, = 32 + 16)
    seen = recorded(monkeypatch)
    compare(*case(rows, 352, 48, bits, dtype), bits)
    forward = [name for name in seen if name != "_qgemm_dx_kernel"]
    if rows <= ql.GEMV_MAX_ROWS:
        assert forward == ["_qgemv_kernel", "_qgemv_reduce"]  # in = 352 spans 3 or 6 K tiles: split
    else:
        assert forward == ["_qgemm_kernel"]
    assert seen[-1] == "_qgemm_dx_kernel"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_scale_in_the_models_dtype_and_no_bias(bits, dtype):
    """A model converted with .to(dtype) converts weight_scale too; and linears without a bias."""
    for rows in (2, 20):
        compare(*case(rows, 96, 48, bits, dtype, scale_dtype=dtype, has_bias=False, seed=rows), bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_sequence_first_input_and_gradient_subsets(bits):
    """x `[s, b, in]` as the model passes it; only dx, only dbias."""
    x, w, s, b, dy = case(5, 96, 32, bits, torch.float16, lead=(7,))  # 35 rows
    compare(x, w, s, b, dy, bits)
    assert set(compare(x, w, s, b, dy, bits, grads=("x",))) == {"y", "dx"}
    assert set(compare(x, w, s, b, dy, bits, grads=("bias",))) == {"y", "dbias"}


def test_no_gradient_for_weight_and_scale():
    x, w, s, b, dy = case(12, 64, 32, 4, torch.float32)
    s = s.float().requires_grad_()  # a scale registered as a trainable parameter still gets none
    x.requires_grad_()
    y = backend.call("quant_linear", "cpu", "triton", x, w, s, 4, b)
    y.backward(dy)
    assert x.grad is not None and s.grad is None


def test_strided_rows_and_broadcast_gradient():
    """x rows read in place from a wider buffer; dY of y.sum() is an expanded (stride 0) tensor."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(20, 400, generator=g)
    x = base[:, 16:16 + 160]
    w, s = quantize(torch.randn(32, 160, generator=g), 4)
    for rows in (1, 20):
        xs = x[:rows].detach().requires_grad_()
        y = backend.call("quant_linear", "cpu", "triton", xs, w, s, 4, None)
        y.sum().backward()
        xr = x[:rows].detach().requires_grad_()
        ref = xr @ dequantize(w, s, 4).t()
        ref.sum().backward()
        assert_fp32_close(y, ref, 1e-5, f"strided rows={rows}")
        assert_fp32_close(xs.grad, xr.grad, 1e-5, f"strided dx rows={rows}")


def test_split_k_uneven_and_single_split(monkeypatch):
    """Split K with a shorter last split (3 K tiles in 2 splits), and one split (no partials, no reduction)."""
    monkeypatch.setattr(ql, "GEMV_TARGET_PROGRAMS", 2)
    cfg = ql.gemv_config(1, 48, 352)
    assert (cfg["blocks"], cfg["splits"], cfg["tiles_per_split"]) == (1, 2, 2)
    seen = recorded(monkeypatch)
    for bits in (8, 4):
        compare(*case(1, 352, 48, bits, torch.float32), bits, grads=())
        compare(*case(1, 352, 48, bits, torch.float16), bits, grads=())
    assert seen.count("_qgemv_reduce") == 4
    seen.clear()
    assert ql.gemv_config(3, 48, 96)["splits"] == 1
    compare(*case(3, 96, 48, 4, torch.bfloat16), 4, grads=())
    assert seen == ["_qgemv_kernel"]


@pytest.mark.parametrize("sm", [75, 86, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gemm_configs_of_other_gpus(sm, dtype, monkeypatch):
    """The tiles the launchers choose on a T4 (fp32 FMA dots, fp16 tiles cast to fp32), an RTX 30xx and an H100."""
    seen = []
    real = ql.launch

    def record(kernel, grid, *args, **kwargs):
        seen.append((kernel.__name__, kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(ql, "launch", record)
    with assume_device(TARGETS[sm]):
        for bits in (8, 4):
            compare(*case(70, 160, 80, bits, dtype), bits)
    for name, kw in seen:
        cfg = ql.gemm_config(dtype, TARGETS[sm], "dx" if "dx" in name else "fwd")
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"]) == \
            (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"])
        assert kw["UPCAST"] == (sm == 75 and dtype != torch.float32)


# ----------------------------------------------------------------------------- what the kernels take


def test_supports_names_what_is_wrong():
    x, w, s, b, _ = case(2, 64, 16, 4, torch.float16)
    assert ql._supports(x, w, s, 4, b) is None
    w8, s8 = quantize(torch.randn(16, 64), 8)
    cases = [
        ((x, w, s, 3, b), "bits must be 4 or 8"),
        ((x.to(torch.float64), w, s, 4, None), "x must be fp16, bf16 or fp32"),
        ((x, w.view(torch.uint8), s, 4, b), "2-D int8"),
        ((x, torch.empty(32, 16, dtype=torch.int8).t(), s, 4, b), "weight must be contiguous"),
        ((torch.randn(2, 63).half(), w, s, 4, b), "in must be even"),
        ((x, w8, s8, 4, b), r"4-bit weight must be \[16, 32\]"),
        ((x[:, :32], w8, s8, 8, b), r"8-bit weight must be \[16, 32\]"),
        ((x, w, s.bfloat16(), 4, b), "scale must be \\[16\\] fp16 or fp16"),
        ((x.bfloat16(), w, s.float(), 4, None), "scale must be \\[16\\] fp16 or bf16"),
        ((x, w, s[:8], 4, b), "scale must be"),
        ((x, w, s, 4, b.float()), "bias must be \\[16\\] torch.float16"),
        ((x, w, s, 4, b[:4]), "bias must be"),
        ((x, object(), s, 4, b), "tensors in THUDM's layout, got a object weight"),  # e.g. a CPU-only packed form
        ((x[:, :48], w[:, :24].contiguous(), s, 4, b), r"multiples of 16, got out=16, in=48"),  # 24-byte rows
        ((x[:, :40], w8[:, :40].contiguous(), s8, 8, b), r"multiples of 16, got out=16, in=40"),
        ((x, w[:8], s[:8], 4, b[:8]), r"multiples of 16, got out=8, in=64"),
    ]
    for args, message in cases:
        reason = ql._supports(*args)
        assert reason is not None and reason.startswith("quant_linear: "), args
        assert re.search(message, reason), (message, reason)
        with pytest.raises(ValueError, match="does not support this call"):  # an explicit request is strict
            backend.call("quant_linear", "cpu", "triton", *args)
        with pytest.raises(ValueError, match="quant_linear: "):  # and the kernel's entry point checks too
            ql._quant_linear_triton(*args)


def test_registered_for_every_gpu_target():
    assert backend.dispatch("quant_linear", "cpu", "triton") is ql._quant_linear_triton
    for info in TARGETS.values():
        assert backend.capability_choice("quant_linear", info) == ("triton", "")


def test_empty_inputs():
    x, w, s, b, _ = case(0, 64, 16, 8, torch.float16)
    assert backend.call("quant_linear", "cpu", "triton", x, w, s, 8, b).shape == (0, 16)


# ----------------------------------------------------------------------------- launches and compiles


def test_compile_specs_cover_every_launch_config():
    """Every configuration the launchers choose on each target (rows 1-8 and more, both directions) is listed."""
    for sm, info in TARGETS.items():
        specs = {(s.name, s.extra["dtype"], s.extra["scale"], tuple(sorted(s.constexprs.items())), s.num_warps,
                  s.num_stages) for s in ql.compile_specs(info)}
        for dtype in DTYPES:
            upcast, precision = ql._upcast(dtype, info), ql._precision(dtype)
            for scale_dtype in {torch.float16, dtype}:
                for bits in ql.BITS:
                    for rows in range(1, ql.GEMV_MAX_ROWS + 1):
                        c = ql.gemv_config(rows, 12288, 4096)
                        consts = dict(BITS=bits, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"])
                        assert ("_qgemv_kernel", dtype, scale_dtype, tuple(sorted(consts.items())), c["num_warps"],
                                c["num_stages"]) in specs, (sm, dtype, bits, rows)
                    for direction, name in (("fwd", "_qgemm_kernel"), ("dx", "_qgemm_dx_kernel")):
                        c = ql.gemm_config(dtype, info, direction)
                        consts = dict(BITS=bits, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                                      UPCAST=upcast, PRECISION=precision)
                        assert (name, dtype, scale_dtype, tuple(sorted(consts.items())), c["num_warps"],
                                c["num_stages"]) in specs, (sm, dtype, bits, direction)
                consts = (("BLOCK", ql.REDUCE_BLOCK),)
                assert ("_qgemv_reduce", dtype, scale_dtype, consts, 4, 1) in specs


def test_decode_and_prefill_lengths_compile_once(monkeypatch):
    """The JIT's specialisation key is the same for every row count of one launch configuration (rows 5-8 of a
    batched decode; prefills of 9 to 2048 tokens), and for every split count of the GEMV."""
    keys = {}

    def record(kernel, grid, *args, **kwargs):
        key = (kernel.__name__, kwargs.get("BLOCK_M"))
        keys.setdefault(key, set()).add(specialization_key(kernel, args, kwargs))

    monkeypatch.setattr(ql, "launch", record)  # record only: the keys, not the interpreted run
    w, s = quantize(torch.randn(48, 256), 4)
    b = torch.zeros(48, dtype=torch.float16)
    for rows in (5, 6, 7, 8, 9, 16, 17, 64, 100, 1024, 2048):
        x = torch.zeros(rows, 256, dtype=torch.float16, requires_grad=True)
        y = ql._quant_linear_triton(x, w, s, 4, b)
        y.backward(torch.zeros_like(y))
    for target in (1, 2):  # one split (no partials: a stand-in fp32 pointer) and two of the 2 K tiles
        monkeypatch.setattr(ql, "GEMV_TARGET_PROGRAMS", target)
        ql._quant_linear_triton(torch.zeros(1, 256, dtype=torch.float16), w, s, 4, b)
    assert {name for name, _ in keys} == {"_qgemv_kernel", "_qgemv_reduce", "_qgemm_kernel", "_qgemm_dx_kernel"}
    assert all(len(k) == 1 for k in keys.values()), {name: len(k) for name, k in keys.items()}


# ----------------------------------------------------------------------------- bytes moved


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 352, 48), (1, 96, 144), (3, 640, 96)])
def test_decode_bytes_formula(rows, n_in, n_out, bits):
    """The GEMV's loads and stores equal `bytes_table.quant_linear_decode_bytes`; the weights, x, scale and bias are
    each loaded once per distinct address, and nothing but the output (and fp32 partials) is stored."""
    x, w, s, b, _ = case(rows, n_in, n_out, bits, torch.float16)
    with torch.no_grad(), count_traffic() as counts:
        backend.call("quant_linear", "cpu", "triton", x, w, s, bits, b)
    loaded, stored, minimum = bt.quant_linear_decode_bytes(rows, n_out, n_in, bits, 2, 2)
    names = {"_qgemv_kernel"} | ({"_qgemv_reduce"} if ql.gemv_config(rows, n_out, n_in)["splits"] > 1 else set())
    assert set(counts) == names
    assert sum(counts[k].loaded for k in names) == loaded
    assert sum(counts[k].stored for k in names) == stored
    gemv = counts["_qgemv_kernel"]
    direct = names == {"_qgemv_kernel"}
    assert gemv.loaded_unique == n_out * n_in * bits // 8 + rows * n_in * 2 + direct * n_out * 4  # weights, x (+ s, b)
    if direct:
        assert loaded + stored - minimum == (ql.gemv_config(rows, n_out, n_in)["blocks"] - 1) * rows * n_in * 2


def test_bytes_table_at_6b_shapes():
    """Decode at the 6B shapes: within 10% of the minimum, and several times less than THUDM's dequantize + mm."""
    for bits in (8, 4):
        for _, k, n in bt.QUANT_LAYERS:
            loaded, stored, minimum = bt.quant_linear_decode_bytes(1, n, k, bits, 2)
            assert minimum == n * k * bits // 8 + n * 2 * 2 + k * 2 + n * 2  # weights, scale + bias, x, out
            assert loaded + stored <= 1.1 * minimum, (bits, k, n)
            assert sum(bt.quant_linear_unfused_bytes(1, n, k, bits)) > 4 * (loaded + stored)
    assert "| all four | 4 |" in bt.quant_linear_table()
