"""`GLMMask`: the compact description of GLM's attention mask, and its conversion to/from boolean masks.

Keys are laid out as `[prefix (P columns) | tokens 0 .. T-1]`; the queries are
the last `sq` tokens, so query row i is token `t_q = T - sq + i`. A row's
tokens before `pad` are left padding; tokens before `context` form the
bidirectional context (the original's `context_length`, counted from the
start of the padded row). Query token `t_q` may attend:
- every prefix column;
- token `t_k` iff `t_q >= pad`, `t_k >= pad` and (`t_k < context` or
  (`causal` and `t_k <= t_q`)); without `causal`, every non-padding token.
This is exactly the boolean mask the original builds with `get_masks` (and
its tokenizer pads with True on the left), prefix columns prepended.

A `GLMMask` is built once per forward (or, for the steps of a generation, once
per `GLMKVCache`) and handed unchanged to every layer: `pad` and `context` are
stored as contiguous int32 on their device, the form the attention kernels
read, so no layer converts or copies them, and `to(device)` returns the same
mask when it is already there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GLMMask:
    prefix_len: int
    pad: torch.Tensor  # int32/int64 [b]
    context: torch.Tensor  # int32/int64 [b]
    causal: bool = True
    _dense: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name in ("pad", "context"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or not t.is_contiguous():
                object.__setattr__(self, name, t.to(torch.int32).contiguous())
        if self.pad.device != self.context.device:
            raise ValueError(f"GLMMask: pad is on {self.pad.device}, context on {self.context.device}")

    @property
    def batch(self) -> int:
        return self.pad.shape[0]

    def materialize(self, sq: int, sk: int) -> torch.Tensor:
        """Bool `[b, 1, sq, sk]`, True = may not attend (`sk` = prefix + tokens)."""
        T = sk - self.prefix_len
        device = self.pad.device
        tq = torch.arange(T - sq, T, device=device)[None, :, None]
        tk = torch.arange(T, device=device)[None, None, :]
        pad, ctx = self.pad[:, None, None], self.context[:, None, None]
        allowed = (tk < ctx) | (tk <= tq) if self.causal else torch.ones_like(tk, dtype=torch.bool)
        visible = (tq >= pad) & (tk >= pad) & allowed
        prefix = torch.ones(self.batch, sq, self.prefix_len, dtype=torch.bool, device=device)
        return ~torch.cat((prefix, visible.expand(self.batch, sq, T)), dim=2)[:, None]

    def dense(self, sq: int, sk: int) -> torch.Tensor:
        """`materialize(sq, sk)`, built once per forward: every layer shares it (only the last size is kept,
        so a mask reused over the steps of a generation holds one dense mask, not one per step)."""
        if (sq, sk) not in self._dense:
            self._dense.clear()
            self._dense[(sq, sk)] = self.materialize(sq, sk)
        return self._dense[(sq, sk)]

    @staticmethod
    def from_bool(mask: torch.Tensor, prefix_len: int, batch: int) -> GLMMask | None:
        """The `GLMMask` equal to a boolean token mask `[b|1, 1, sq, T]` (no prefix columns), or None."""
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return None
        mask = mask.expand(batch, 1, *mask.shape[2:])
        sq, T = mask.shape[2], mask.shape[3]
        last = mask[:, 0, -1]  # query token T-1: visible exactly [pad, T)
        pad = (~last).int().argmax(dim=1).long()
        first_row = pad - (T - sq)  # query row of token `pad`, if it is among the queries
        in_rows = (first_row >= 0) & (first_row < sq)
        row = mask[torch.arange(batch, device=mask.device), 0, first_row.clamp(0, sq - 1)]
        context = torch.where(in_rows, pad + (~row).sum(dim=1), pad)
        candidate = GLMMask(prefix_len, pad, context, causal=True)
        rebuilt = candidate.materialize(sq, prefix_len + T)[..., prefix_len:]
        return candidate if torch.equal(rebuilt, mask) else None

    @property
    def device(self) -> torch.device:
        return self.pad.device

    def to(self, device, non_blocking: bool = False) -> GLMMask:
        """This mask on `device` (itself when it is already there, keeping its dense form)."""
        if self.pad.device == torch.device(device):
            return self
        return GLMMask(self.prefix_len, self.pad.to(device, non_blocking=non_blocking),
                       self.context.to(device, non_blocking=non_blocking), self.causal)
