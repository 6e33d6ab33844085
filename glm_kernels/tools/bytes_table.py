"""Bytes moved per op at the ChatGLM-6B shapes: each fused Triton kernel next to the unfused reference.

    glm-kernels bytes-table [--markdown docs/bytes.md]

Fused kernels: the formulas of the kernel docstrings, as functions of the
shape (`tests/test_bytes.py` checks each against the bytes the interpreter
counts on small shapes). "loaded" sums every load of every program (an upper
bound of DRAM reads: re-reads of weights, tables or key tiles by several
programs are L2 hits on a GPU); "minimum" is each input read once and each
output written once.

Unfused reference: the same work done by `glm_kernels.reference` (the
original's op sequence), run on meta tensors under a dispatch mode that adds
up, for every aten op that is not a view, the bytes of its inputs (each
distinct element once) and of its outputs. That assumes every op reads its
inputs and writes its outputs exactly once, which is a lower bound for ops
like softmax.

Shapes: hidden 4096, 32 heads of 128, MLP 16384, fp16, batch 1; prefill =
1024 tokens after a P-Tuning prefix of 128; decode = one token over 128 +
1024 cached keys.

A second table (`quant_linear_table`) holds the weight-only INT8/INT4 linear
layers at one decode token: the GEMV's formula against the minimum (packed
weights, scales, bias, x and the output once each) and against THUDM's
quantized linear (`extract_weight_to_half` writes the whole fp16 weight,
`mm` reads it back, then the bias add), counted the same way.
"""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..fileio import atomic_write_text

SIX_B = dict(h=4096, nh=32, hd=128, inner=16384, prefix=128, tokens=1024, e=2)


# ----------------------------------------------------------------------------- fused kernels (formulas)


def rope_bytes(s, b, nh, hd, e):
    """(loaded, stored, minimum) of one `_rope_qkv_kernel` forward launch."""
    from ..kernels.rope import launch_config

    groups = math.ceil(nh / launch_config(hd)["BLOCK_H"])
    tables = 16 + 2 * hd * e  # two int64 position ids, four table rows of hd/2
    qkv = 3 * s * b * nh * hd * e
    return qkv + s * b * groups * tables, qkv, qkv + s * b * tables + qkv


DTYPE_OF_SIZE = {2: torch.float16, 4: torch.float32}


def attention_fwd_bytes(sq, b, nh, hd, La, Lb, e):
    """(loaded, stored, minimum) of `_attn_fwd` without a mask (no key block skipped; every program reads its
    row's pad and context, 8 bytes, of the GLM mask that stands for no mask)."""
    from ..kernels.attention import MASK_GLM, fwd_config

    H, L = b * nh, La + Lb
    q_blocks = math.ceil(sq / fwd_config(sq, hd, DTYPE_OF_SIZE[e], MASK_GLM)["BLOCK_M"])
    q = sq * H * hd * e
    kv = 2 * L * H * hd * e
    stored = q + sq * H * 4  # output + fp32 log-sum-exp per row
    return q + q_blocks * (kv + 8 * H), stored, q + kv + 8 * b + stored


def attention_decode_bytes(b, nh, hd, L, e):
    """(loaded, stored, minimum) of one decode step: split-K partials + combine, both launches."""
    from ..kernels.attention import decode_config

    H = b * nh
    splits, _ = decode_config(H, L, hd)
    partials = splits * H * (hd + 2) * 4
    loaded = H * hd * e + 2 * L * H * hd * e + 8 * splits * H + partials  # 8: the row's pad and context
    stored = partials + H * hd * e
    return loaded, stored, H * hd * e + 2 * L * H * hd * e + 8 * b + H * hd * e


def softmax_bytes(rows, sk, e, has_mask=True):
    """(loaded, stored, minimum) of one `_softmax_fwd_kernel` launch."""
    from ..kernels.softmax import forward_bytes, launch_config

    loaded, stored = forward_bytes(rows, sk, e, has_mask, launch_config(sk)["chunked"])
    return loaded, stored, rows * sk * (e + (1 if has_mask else 0)) + stored


def layernorm_bytes(N, h, e, residual=True):
    """(loaded, stored, minimum) of one `_ln_fwd_kernel` launch (inference: no statistics stored)."""
    from ..kernels.layernorm import rows_per_program

    P = math.ceil(N / rows_per_program(N))
    loaded = N * h * e * (1 + residual) + P * h * 2 * e
    stored = N * h * e
    return loaded, stored, N * h * e * (1 + residual) + 2 * h * e + stored


def gelu_bytes(N, n, e):
    """(loaded, stored, minimum) of one `_gelu_fwd_kernel` launch with a bias."""
    from ..kernels.gelu import rows_per_program

    P = math.ceil(N / rows_per_program(N))
    return N * n * e + P * n * e, N * n * e, N * n * e + n * e + N * n * e


QUANT_LAYERS = (("query_key_value", 4096, 12288), ("dense", 4096, 4096), ("dense_h_to_4h", 4096, 16384),
                ("dense_4h_to_h", 16384, 4096))  # (name, in, out) of the quantized linears of one 6B layer


def quant_linear_decode_bytes(M, N, K, bits, e, e_s=2, bias=True):
    """(loaded, stored, minimum) of one `quant_linear` call on M <= 8 rows (`_qgemv_kernel`, plus `_qgemv_reduce`
    when K is split): N outputs, K inputs, element sizes e of x, e_s of the scale."""
    from ..kernels.quant_linear import gemv_config

    cfg = gemv_config(M, N, K)
    blocks, splits = cfg["blocks"], cfg["splits"]
    weights, x, out = N * K * bits // 8, M * K * e, M * N * e
    epilogue = N * (e_s + e * bias)  # the scale and bias of each output, read once per row of x it finishes
    loaded = weights + blocks * x  # every output block reads all of x (over its K splits)
    stored = out
    if splits == 1:
        loaded += epilogue
    else:
        partials = splits * M * N * 4
        loaded += partials + M * epilogue
        stored += partials
    return loaded, stored, weights + x + epilogue + out


def quant_linear_unfused_bytes(M, N, K, bits, e=2, e_s=2, bias=True):
    """(read, written) of THUDM's quantized linear: `extract_weight_to_half` (packed weights and scales in, the fp16
    weight out), `inp.mm(weight.t())`, then `output + bias`; each op reading its inputs and writing its output once."""
    w16 = N * K * 2
    read = N * K * bits // 8 + N * e_s + (w16 + M * K * e) + (M * N * e + N * e) * bias
    written = w16 + M * N * e + M * N * e * bias
    return read, written


def quant_linear_table(rows: int = 1) -> str:
    """Markdown: bytes of each quantized linear of one ChatGLM-6B layer at a decode step of `rows` tokens (fp16 x,
    fp16 scales, with bias), INT8 and INT4, and the sum over the four."""
    mb = 1e-6
    lines = ["| layer (in -> out) | bits | fused loaded (MB) | fused stored (MB) | minimum (MB) | fused / minimum | "
             "unfused read (MB) | unfused written (MB) | unfused / fused |", "|---|---|---|---|---|---|---|---|---|"]
    for bits in (8, 4):
        totals = [0, 0, 0, 0, 0]
        for name, k, n in QUANT_LAYERS:
            loaded, stored, minimum = quant_linear_decode_bytes(rows, n, k, bits, 2)
            read, written = quant_linear_unfused_bytes(rows, n, k, bits)
            for i, v in enumerate((loaded, stored, minimum, read, written)):
                totals[i] += v
            lines.append(_quant_row(f"{name} ({k} -> {n})", bits, loaded, stored, minimum, read, written, mb))
        lines.append(_quant_row("all four", bits, *totals, mb))
    return "\n".join(lines)


def _quant_row(name, bits, loaded, stored, minimum, read, written, mb) -> str:
    return (f"| {name} | {bits} | {loaded * mb:.2f} | {stored * mb:.2f} | {minimum * mb:.2f} | "
            f"{(loaded + stored) / minimum:.2f}x | {read * mb:.2f} | {written * mb:.2f} | "
            f"{(read + written) / (loaded + stored):.1f}x |")


# ----------------------------------------------------------------------------- unfused reference (measured)

_VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
             "split", "split_with_sizes", "chunk", "slice", "select", "as_strided", "unbind", "alias", "detach",
             "lift_fresh", "_to_copy_noop", "unflatten", "flatten", "narrow", "view_as"}


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (broadcast dims counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


class _ByteCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _VIEW_OPS or func._schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                                              for r in func._schema.returns):
            return out
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        r = sum(_distinct_bytes(t) for t in inputs)
        w = sum(o.numel() * o.element_size() for o in outputs)
        self.read += r
        self.written += w
        self.ops.append((name, r, w))
        return out


def count_aten_bytes(fn, *args):
    """(bytes read, bytes written, ops) of `fn(*args)`, counting every non-view aten op once."""
    with _ByteCounter() as counter:
        fn(*args)
    return counter.read, counter.written, counter.ops


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def reference_costs(tokens, cached):
    """Unfused reference bytes (read, written) per op for `tokens` new tokens over `cached` cached tokens."""
    from .. import reference

    c = SIX_B
    nh, hd, h, P = c["nh"], c["hd"], c["h"], c["prefix"]
    b = 1
    mixed = _meta(tokens, b, 3 * h)
    pos = torch.zeros(b, 2, tokens, dtype=torch.long, device="meta")
    past_k, past_v = _meta(P + cached, b, nh, hd), _meta(P + cached, b, nh, hd)

    def rope():
        q, k, v = mixed.view(tokens, b, nh, 3 * hd).split(hd, dim=-1)
        q, k = _rotary_on_meta(q, k, pos)
        return q, torch.cat((past_k, k)), torch.cat((past_v, v))

    def _rotary_on_meta(q, k, positions):
        cos = _meta(2048, hd // 2)
        sin = _meta(2048, hd // 2)
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q1, k1 = reference.apply_rotary(q1, k1, cos, sin, positions[:, 0, :].t())
        q2, k2 = reference.apply_rotary(q2, k2, cos, sin, positions[:, 1, :].t())
        return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)

    L = P + cached + tokens
    q, k, v = _meta(tokens, b, nh, hd), _meta(L, b, nh, hd), _meta(L, b, nh, hd)
    # the original fills masked scores in prefill; a decode step passes no mask
    mask = torch.zeros(b, 1, tokens, L, dtype=torch.bool, device="meta") if tokens > 1 else None
    scores = _meta(b, nh, tokens, L)
    x, r = _meta(tokens, b, h), _meta(tokens, b, h)
    w, bias = _meta(h), _meta(h)
    inner, inner_bias = _meta(tokens, b, c["inner"]), _meta(c["inner"])

    fill_mask = torch.zeros(b, 1, tokens, L, dtype=torch.bool, device="meta")

    def softmax():
        s = scores.masked_fill(fill_mask, -10000.0)
        return torch.softmax(s.float() * 28.0, dim=-1).to(torch.float16)

    costs = {
        "rope + KV concatenation": count_aten_bytes(rope),
        "attention": count_aten_bytes(lambda: reference.attention_core(q, k, v, mask, 27)),
        "scaled masked softmax (output_attentions)": count_aten_bytes(softmax),
        "alpha-residual layernorm": count_aten_bytes(
            lambda: torch.nn.functional.layer_norm(x * reference.ALPHA + r, (h,), w, bias, 1e-5)),
        "bias + gelu": count_aten_bytes(lambda: reference.gelu(inner + inner_bias)),
    }
    return {name: (rd, wr) for name, (rd, wr, _) in costs.items()}


def fused_costs(tokens, cached):
    """(loaded, stored, minimum) per op for the fused kernels, same work as `reference_costs`."""
    c = SIX_B
    nh, hd, h, P, e = c["nh"], c["hd"], c["h"], c["prefix"], c["e"]
    L = P + cached + tokens
    attention = attention_fwd_bytes(tokens, 1, nh, hd, P + cached, tokens, e) if tokens > 1 else \
        attention_decode_bytes(1, nh, hd, L, e)
    return {
        "rope + KV concatenation": rope_bytes(tokens, 1, nh, hd, e),
        "attention": attention,
        "scaled masked softmax (output_attentions)": softmax_bytes(nh * tokens, L, e),
        "alpha-residual layernorm": layernorm_bytes(tokens, h, e),
        "bias + gelu": gelu_bytes(tokens, c["inner"], e),
    }


def table() -> str:
    mb = 1e-6
    lines = ["| op | case | fused loaded (MB) | fused stored (MB) | fused / minimum | unfused read (MB) | "
             "unfused written (MB) | unfused / fused |",
             "|---|---|---|---|---|---|---|---|"]
    cases = [("prefill 1024 + prefix 128", 1024, 0), ("decode 1 at 1024 + prefix 128", 1, 1023)]
    for label, tokens, cached in cases:
        fused, ref = fused_costs(tokens, cached), reference_costs(tokens, cached)
        for op, (loaded, stored, minimum) in fused.items():
            rd, wr = ref[op]
            lines.append(f"| {op} | {label} | {loaded * mb:.2f} | {stored * mb:.2f} | "
                         f"{(loaded + stored) / minimum:.2f}x | {rd * mb:.2f} | {wr * mb:.2f} | "
                         f"{(rd + wr) / (loaded + stored):.1f}x |")
    return "\n".join(lines)


def main(args) -> int:
    quant = "Weight-only quantized linears, decode (1 token, fp16 x and scales, with bias), per layer:"
    text = f"{table()}\n\n{quant}\n\n{quant_linear_table()}"
    print(text)
    if args.markdown:  # atomically: a reader never sees half a table
        atomic_write_text(args.markdown, text + "\n")
    return 0
