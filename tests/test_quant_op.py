"""ops.quant_linear ("torch" backend): every CPU path (with and without the C++ extension) against an ordinary
matmul with the dequantized weights (GLM_SPEC: the reference for weight-only INT8/INT4), gradients, errors, the
registry."""
import contextlib
import importlib

import numpy as np
import pytest
import torch

from glm_kernels import backend, ops
from glm_kernels import cpu_ext
from glm_kernels.quant import cpu_pack
from glm_kernels.quant.cpu_pack import PackedInt4
from glm_kernels.quant.layout import quantize_weight
from conftest import EXTENSION_MISSING, supported_isas
from helpers import assert_fp32_close, assert_lowp_close
from test_quant_layout import oracle_decode4


ql_module = importlib.import_module("glm_kernels.ops.quant_linear")
BUILT = cpu_ext.extension() is not None


def test_the_extension_is_built_here():
    # this machine has a compiler: the build must have produced it (elsewhere the package works without it)
    assert BUILT, EXTENSION_MISSING


def oracle_weight(q, scale, bits) -> torch.Tensor:
    """W = q * scale from THUDM's bytes, decoded by the test's own reader, in float64."""
    values = q.numpy() if bits == 8 else oracle_decode4(q.numpy())
    return torch.from_numpy(values.astype(np.float64)) * scale.double()[:, None]


def make(bits, out_features=96, in_features=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_weight(torch.randn(out_features, in_features, generator=g), bits)
    bias = torch.randn(out_features, generator=g) * 0.1
    return q, scale, bias


def fixed_point_oracle(x, q, bits) -> torch.Tensor:
    """One bf16 row of x as the VNNI products see it (csrc/quant_cpu.cpp, "one row of x in fixed point"), in float64:
    over the elements the 64-byte steps of a weight row cover, rint(x * 2^shift) * 2^-shift with
    shift = 15 - frexp(max|x|).exponent (ties to even); the elements of the row's last, partial step as they are."""
    covered = q.shape[1] // 64 * 64 * (2 if bits == 4 else 1)
    x = x.double()
    head = x[:, :covered]
    largest = head.abs().max().item() if covered else 0.0
    shift = 15 - (np.frexp(largest)[1] if largest > 0 else 0)
    head = torch.round(head * 2.0 ** shift) * 2.0 ** -shift  # exact in float64; torch.round: half to even
    return torch.cat([head, x[:, covered:]], dim=1)


def forms(q, scale, bits):
    """The weight as the op takes it: THUDM's bytes, and for 4 bits also the CPU-packed form."""
    yield "thudm", q
    if bits == 4 and cpu_pack.packable(q.shape[0], q.shape[1] * 2):
        columns = q.shape[1] * 2
        yield "packed", PackedInt4(cpu_pack.pack(q), cpu_pack.unit_scales_and_zeros(q.shape[0], columns),
                                   cpu_pack.group_size(columns))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_fp32_matches_the_dequantized_matmul(bits, with_bias, rows, cpu_path):
    q, scale, bias = make(bits)
    bias = bias if with_bias else None
    x = torch.randn(rows, 256)
    w = oracle_weight(q, scale, bits)
    ref = x.double() @ w.t() + (bias.double() if with_bias else 0)
    for name, weight in forms(q, scale, bits):
        out = ops.quant_linear(x, weight, scale, bits, bias)
        assert out.dtype == torch.float32 and out.shape == (rows, 96)
        assert_fp32_close(out, ref, 1e-4, f"{name} {bits}-bit")  # fp32 rule for matmul-built ops (GLM_SPEC)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 64])  # 1, 3: the int-weight kernels; 64: dequantized blocks + bf16 matmul
def test_bf16_follows_the_low_precision_rule(bits, rows, cpu_path):
    q, scale, bias = make(bits)
    x = torch.randn(2, rows, 256).to(torch.bfloat16)
    w = oracle_weight(q, scale, bits)
    ref32 = x.double() @ w.t() + bias.double()
    # the low-precision reference: bf16 weights (q * scale rounded) in an ordinary bf16 matmul
    ref_lowp = torch.nn.functional.linear(x, w.to(torch.bfloat16), bias.to(torch.bfloat16))
    out = ops.quant_linear(x, q, scale, bits, bias.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 96)
    if cpu_path == "pytorch" and rows < ql_module.KERNEL_MAX_ROWS and bits == 8:
        # PyTorch's int8 kernel returns x @ q^T rounded to bf16 before the fp32 scale is applied: one more
        # bf16 rounding than the reference has (relative 2^-8 at most)
        assert_kernel_close(out, ref_lowp, ref32, "int8 bf16 PyTorch kernel")
    else:
        assert_lowp_close(out, ref_lowp, ref32, f"{bits}-bit bf16")  # 2 x ref error + 1e-3 x scale


def assert_kernel_close(out, ref_lowp, ref32, what):
    """The low-precision rule plus one more bf16 rounding (2^-8 x |value| at most; the reference's own error
    can be far below its bound) at max|ref|: PyTorch's int kernels round twice (reason above)."""
    err = float((out.double() - ref32).abs().max())
    scale = float(ref32.abs().max())
    bound = 2 * float((ref_lowp.double() - ref32).abs().max()) + 1e-3 * scale + 2.0 ** -7 * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_bf16_cpu_packed_int4_form(rows):
    """The repacked form (held without the extension) through PyTorch's int4 kernel."""
    q, scale, bias = make(4)
    x = torch.randn(2, rows, 256).to(torch.bfloat16)
    w = oracle_weight(q, scale, 4)
    ref32 = x.double() @ w.t() + bias.double()
    ref_lowp = torch.nn.functional.linear(x, w.to(torch.bfloat16), bias.to(torch.bfloat16))
    (_, packed), = [f for f in forms(q, scale, 4) if f[0] == "packed"]
    out = ops.quant_linear(x, packed, scale, 4, bias.to(torch.bfloat16))
    if rows < ql_module.KERNEL_MAX_ROWS:
        assert_kernel_close(out, ref_lowp, ref32, "int4 bf16 PyTorch kernel")  # the reason is in the test above
    else:
        assert_lowp_close(out, ref_lowp, ref32, "int4 bf16 dequantized blocks")


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_follows_the_low_precision_rule(bits, cpu_path):
    q, scale, bias = make(bits)
    x = torch.randn(4, 256).half()
    w = oracle_weight(q, scale, bits)
    ref32 = x.double() @ w.t()
    ref_lowp = (x.float() @ w.half().float().t()).half()  # fp16 weights, fp16 output
    out = ops.quant_linear(x, q, scale, bits)
    assert out.dtype == torch.float16
    assert_lowp_close(out, ref_lowp, ref32, f"{bits}-bit fp16")


@pytest.mark.parametrize("bits", [8, 4])
def test_blocks_of_rows_cover_the_weight(bits, monkeypatch, cpu_path):
    monkeypatch.setattr(ql_module, "CHUNK_ELEMENTS", 300)  # 1 row of 256 per block (64 rows: packed blocks)
    q, scale, bias = make(bits, out_features=240)
    x = torch.randn(3, 256, requires_grad=True)
    w = oracle_weight(q, scale, bits)
    for name, weight in forms(q, scale, bits):
        out = ops.quant_linear(x, weight, scale, bits, bias)
        assert_fp32_close(out, x.double() @ w.t() + bias.double(), 1e-4, f"{name} blocks")
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, x, g)
        assert_fp32_close(grad, g.double() @ w, 1e-4, f"{name} input gradient by blocks")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_x_and_bias_only(bits, dtype, cpu_path):
    q, scale, bias = make(bits)
    for name, weight in forms(q, scale, bits):
        x = torch.randn(2, 3, 256).to(dtype).requires_grad_()
        b = bias.to(dtype, copy=True).requires_grad_()
        out = ops.quant_linear(x, weight, scale, bits, b)
        g = torch.randn_like(out)
        out.backward(g)
        w = oracle_weight(q, scale, bits)
        ref_x = (g.double() @ w)  # dX = dY @ W
        ref_b = g.double().sum((0, 1))
        if dtype == torch.float32:
            assert_fp32_close(x.grad, ref_x, 1e-4, f"{name} dX")  # fp32 rule against the gradient's scale
            assert_fp32_close(b.grad, ref_b, 1e-5, f"{name} dbias")  # a sum: element-wise rule
        else:
            ref_x_lowp = (g.float() @ w.to(dtype).float()).to(dtype)
            assert_lowp_close(x.grad, ref_x_lowp, ref_x, f"{name} dX bf16")
            assert_lowp_close(b.grad, g.float().sum((0, 1)).to(dtype), ref_b, f"{name} dbias bf16")
    assert q.grad is None and scale.grad is None and not q.requires_grad


def test_no_autograd_graph_without_gradients():
    q, scale, _ = make(8)
    out = ops.quant_linear(torch.randn(2, 256), q, scale, 8)
    assert out.grad_fn is None


def test_empty_rows():
    q, scale, bias = make(4)
    out = ops.quant_linear(torch.randn(0, 256), q, scale, 4, bias)
    assert out.shape == (0, 96)


def test_bad_inputs_are_named():
    q, scale, bias = make(8)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ops.quant_linear(x, q, scale, 3)
    with pytest.raises(ValueError, match=r"x is \[\.\.\., 128\] but the 8-bit weight .* in_features=256"):
        ops.quant_linear(torch.randn(2, 128), q, scale, 8)
    with pytest.raises(ValueError, match=r"holds in_features=512"):
        ops.quant_linear(x, q, scale, 4)  # 8-bit bytes read as 4 bits: twice as wide
    with pytest.raises(ValueError, match="weight must be THUDM's int8"):
        ops.quant_linear(x, q.float(), scale, 8)
    with pytest.raises(ValueError, match=r"scale must be a floating \[out\] = \[96\]"):
        ops.quant_linear(x, q, scale[:5], 8)
    with pytest.raises(ValueError, match=r"bias must be None or a floating \[out\] = \[96\]"):
        ops.quant_linear(x, q, scale, 8, bias[:3])
    with pytest.raises(ValueError, match="x must be a fp32/fp16/bf16"):
        ops.quant_linear(x.long(), q, scale, 8)
    q4, scale4, _ = make(4)
    packed = PackedInt4(cpu_pack.pack(q4), cpu_pack.unit_scales_and_zeros(96, 256), 256)
    with pytest.raises(ValueError, match="CPU-packed int4 .* but bits=8"):
        ops.quant_linear(x, packed, scale4, 8)


def test_registered_with_the_backend_switch():
    assert "torch" in backend.available("quant_linear")
    assert backend.resolve("quant_linear", "cpu", None) == "torch"
    q, scale, _ = make(8)
    x = torch.randn(2, 256)
    assert torch.equal(ops.quant_linear(x, q, scale, 8, backend="torch"), ops.quant_linear(x, q, scale, 8))



def test_this_cpu_runs_every_build():
    # The CI machines seen (AMD EPYC Zen 4, Intel Xeon Emerald Rapids) have AVX512-BF16 and AVX512-VNNI: every
    # build of the loops is exercised here.
    assert BUILT, EXTENSION_MISSING
    assert supported_isas() == ["scalar", "avx2", "avx512f", "avx512bf16", "avx512vnni"]
    with pytest.raises(RuntimeError, match="unknown instruction set sse9"):
        cpu_ext.module().set_isa("sse9")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_features", [100, 4200])  # vector tails; several column blocks per row
@pytest.mark.parametrize("rows", [1, 2, 7, 9, 17])  # register blocks of 1..8 rows of x, and more than one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the vdpbf16ps loops where the CPU has them
@pytest.mark.parametrize("out_features", [40, 43])  # one row of x: passes of 4 weight rows, then single rows
def test_extension_gemv_shapes(bits, in_features, rows, dtype, out_features, isa):
    ext = cpu_ext.extension()
    q, scale, _ = make(bits, out_features=out_features, in_features=in_features)
    x = torch.randn(rows, in_features).to(dtype)
    out = ext.gemv(x, q, scale, bits)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    # products of bf16 x and q are exact in fp32 on every path: one fp32 dot product per output either way, except
    # one bf16 row with VNNI, which is exact on x in 16-bit fixed point (its own oracle, below)
    fixed = isa == "avx512vnni" and dtype == torch.bfloat16 and rows == 1
    x_seen = fixed_point_oracle(x, q, bits) if fixed else x.double()
    assert_fp32_close(out, x_seen @ oracle_weight(q, scale, bits).t(), 1e-5, f"gemv {isa}")
    w = ext.dequantize(q, scale, bits, 3, 29)
    assert torch.equal(w.double(), oracle_weight(q, scale, bits)[3:29])  # q x fp16 scale is exact in fp32


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_linear_adds_the_bias_and_rounds_once(bits, dtype, isa):
    """`linear` = gemv + bias in fp32, then one rounding to x's dtype: equal to rounding the fp32 result."""
    ext = cpu_ext.extension()
    q, scale, bias = make(bits, out_features=40, in_features=4200)
    x = torch.randn(3, 4200).to(dtype)
    fp32 = ext.gemv(x, q, scale, bits) + bias
    out = ext.linear(x, q, scale, bits, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 40)
    ref = x.double() @ oracle_weight(q, scale, bits).t() + bias.to(dtype).double()
    assert_fp32_close(fp32, ref, 1e-5, "gemv + bias")
    # the same fp32 sums up to summation order, then one rounding: at most one unit of the dtype apart
    unit = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    assert (out.double() - ref).abs().max() <= unit * ref.abs().max() + 1e-5 * ref.abs().max()
    assert torch.equal(ext.linear(x, q, scale, bits, None).float(),
                       ext.gemv(x, q, scale, bits).to(dtype).float())  # without bias: the gemv result, rounded


def test_extension_errors_are_named():
    assert BUILT, EXTENSION_MISSING
    ext = cpu_ext.extension()
    q, scale, bias = make(8, out_features=40, in_features=64)
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64"):
        ext.linear(torch.randn(1, 32), q, scale, 8, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[40\]"):
        ext.linear(torch.randn(1, 64), q, scale, 8, bias[:3])
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ext.gemv(torch.randn(1, 64), q, scale, 3)
    with pytest.raises(RuntimeError, match="stream_read takes contiguous CPU tensors"):
        ext.stream_read([torch.zeros(8, 8).t()])


def test_stream_read_sums_every_word():
    """The floor probe really reads every byte: its sum of 8-byte words equals numpy's, tails included."""
    assert BUILT, EXTENSION_MISSING
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randint(-2**62, 2**62, (n,), generator=g, dtype=torch.int64) for n in (1, 7, 8, 4099, 70000)]
    tensors.append(torch.randint(-100, 100, (1000, 37), generator=g, dtype=torch.int8))  # 37000 bytes: a byte tail
    expected = 0
    for t in tensors:
        raw = t.numpy().tobytes()
        whole = len(raw) // 64 * 64
        words = np.frombuffer(raw[:whole], dtype=np.int64).astype(object).sum() if whole else 0
        expected += int(words) + sum(raw[whole:])  # the tail past the last 64-byte line, byte by byte
    expected = (expected + 2**63) % 2**64 - 2**63  # int64 wrap-around, as the C++ sum
    assert cpu_ext.extension().stream_read(tensors) == expected


@contextlib.contextmanager
def num_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def two_threads():
    with num_threads(2):
        yield


@pytest.mark.parametrize("chunks", [1, 2, 3, 17, 1000])
def test_parallel_chunks_runs_every_chunk_once(chunks, two_threads):
    """The products' and the floor's split (csrc/chunks_cpu.h): every chunk runs exactly once."""
    assert BUILT, EXTENSION_MISSING
    runs = cpu_ext.module().chunk_runs(chunks)
    assert runs[:, 0].tolist() == [1] * chunks


def test_parallel_chunks_moves_the_slow_threads_last_chunks(two_threads):
    """With thread 0 slowed down (1 ms a chunk), thread 1 runs its own half and then the end of thread 0's
    half, from the far end: what thread 0 ran (if anything: the other thread may be faster to start) is a prefix
    of its share, each chunk once."""
    assert BUILT, EXTENSION_MISSING
    runs = cpu_ext.module().chunk_runs(64, slow_us=1000.0)
    assert runs[:, 0].tolist() == [1] * 64
    threads = runs[:, 1].tolist()
    assert threads[32:] == [1] * 32  # thread 1's own share
    taken = threads[:32].count(1)
    assert taken > 0  # thread 0 needs 32 ms for its share: thread 1 took part of it
    assert threads[:32] == [0] * (32 - taken) + [1] * taken  # from the far end


def test_parallel_chunks_on_one_thread_runs_everything_in_order():
    assert BUILT, EXTENSION_MISSING
    with num_threads(1):
        runs = cpu_ext.module().chunk_runs(10, slow_us=10.0)
    assert runs.tolist() == [[1, 0]] * 10


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features, in_features", [(4101, 256), (1030, 2048), (70, 8192)])
def test_one_row_products_do_not_depend_on_the_split(bits, out_features, in_features):
    """A decode product shares its weight's chunks between the threads (whoever is faster takes more): each output
    is one row's sum, so the result is bitwise the same on one thread and on two, and follows the bf16 rule."""
    assert BUILT, EXTENSION_MISSING
    q, scale, bias = make(bits, out_features, in_features, seed=3)
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ext = cpu_ext.extension()
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            results.append(ext.linear(x, q, scale, bits, bias))
    assert torch.equal(results[0], results[1])
    w = oracle_weight(q, scale, bits)
    ref = x.double() @ w.T + bias.double()
    ref_low = (x @ w.to(torch.bfloat16).T + bias.to(torch.bfloat16)).double()
    assert_lowp_close(results[1].double(), ref_low, ref, "one-row product")  # GLM_SPEC low-precision rule


@contextlib.contextmanager
def instruction_set(name):
    module = cpu_ext.module()
    previous = module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(previous)


def one_row(in_features, seed=5, outlier=None):
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(seed))
    if outlier is not None:
        x[0, 7] = outlier  # an activation far above the others, as ChatGLM's hidden states have
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_features", [2048, 4200])  # whole 64-byte steps; a partial last step
@pytest.mark.parametrize("outlier", [None, 300.0])
def test_one_bf16_row_in_fixed_point(bits, in_features, outlier):
    """One bf16 row of x with VNNI: the integer sums are exact, so the result is the fixed-point oracle's up to the
    final fp32 roundings, and within the documented bound of the exact product: |x - x_fixed| <= max|x| * 2^-16
    per element, so |y - y_exact| <= max|x| * 2^-16 * sum|w| per output (plus fp32 rounding)."""
    assert BUILT, EXTENSION_MISSING
    q, scale, bias = make(bits, out_features=43, in_features=in_features, seed=2)
    x = one_row(in_features, outlier=outlier)
    w = oracle_weight(q, scale, bits)
    with instruction_set("avx512vnni"):
        out = cpu_ext.extension().gemv(x, q, scale, bits).double()
        low = cpu_ext.extension().linear(x, q, scale, bits, bias.to(torch.bfloat16))
    assert_fp32_close(out, fixed_point_oracle(x, q, bits) @ w.t(), 1e-6, "fixed point")
    exact = x.double() @ w.t()
    bound = x.double().abs().max() * 2.0 ** -16 * w.abs().sum(1) + 1e-6 * exact.abs().max()
    assert ((out - exact).abs() <= bound).all()
    # and the GLM_SPEC low-precision rule against the exact product, as every bf16 path
    ref = exact + bias.to(torch.bfloat16).double()
    ref_low = (x @ w.to(torch.bfloat16).T + bias.to(torch.bfloat16)).double()
    assert_lowp_close(low.double(), ref_low, ref, "one bf16 row, fixed point")


@pytest.mark.parametrize("bits", [8, 4])
def test_fixed_point_sums_never_overflow(bits):
    """The largest fixed-point x (every element 1.9921875 -> 32640) against the largest weights, over rows long
    enough to cross the int32 blocks several times (8 bits: 128 steps a block; 4 bits: 512): the sums stay exact."""
    assert BUILT, EXTENSION_MISSING
    ldw = 64 * 1100  # bytes per row: 1100 steps
    k = ldw if bits == 8 else 2 * ldw
    # row 0 all positive products at the largest |q| (4 bits: 0x77, every nibble 7), row 1 all negative (-128 /
    # 0x88, every nibble -8), row 2 mixed
    q = torch.full((3, ldw), 127 if bits == 8 else 0x77, dtype=torch.int8)
    q[1] = -128 if bits == 8 else 0x88 - 256
    q[2, ::2] = q[1, ::2]
    scale = torch.full((3,), 1.0, dtype=torch.float16)
    x = torch.full((1, k), 1.9921875, dtype=torch.bfloat16)
    with instruction_set("avx512vnni"):
        out = cpu_ext.extension().gemv(x, q, scale, bits).double()
    expected = x.double() @ oracle_weight(q, scale, bits).t()
    assert torch.equal(out, expected.float().double())  # integers below 2^24 per element: exact


@pytest.mark.parametrize("bits", [8, 4])
def test_fixed_point_rows_far_from_one_and_zero(bits):
    """A row of tiny values (the scale 2^shift is huge) and a row of zeros."""
    assert BUILT, EXTENSION_MISSING
    q, scale, bias = make(bits, out_features=40, in_features=2048, seed=4)
    w = oracle_weight(q, scale, bits)
    tiny = (one_row(2048).float() * 1e-30).to(torch.bfloat16)
    with instruction_set("avx512vnni"):
        out = cpu_ext.extension().gemv(tiny, q, scale, bits).double()
        zero = cpu_ext.extension().linear(torch.zeros(1, 2048, dtype=torch.bfloat16), q, scale, bits, bias)
    assert_fp32_close(out, fixed_point_oracle(tiny, q, bits) @ w.t(), 1e-6, "tiny x")
    assert out.abs().max() > 0
    assert torch.equal(zero, bias[None].to(torch.bfloat16))  # 0 + bias, rounded once


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_fixed_point_leaves_inf_and_nan_to_the_exact_loops(bits, special):
    """inf / NaN have no fixed-point value: such a row takes the exact bf16 loops and gets their IEEE result."""
    assert BUILT, EXTENSION_MISSING
    q, scale, _ = make(bits, out_features=40, in_features=2048, seed=6)
    x = one_row(2048)
    x[0, 100] = special
    ext = cpu_ext.extension()
    with instruction_set("avx512vnni"):
        out = ext.gemv(x, q, scale, bits)
    with instruction_set("avx512bf16"):
        exact = ext.gemv(x, q, scale, bits)
    assert out.isnan().any() or out.isinf().any()
    assert torch.equal(out.isnan(), exact.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(exact))
