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
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    text = table()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0
