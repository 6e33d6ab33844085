"""GLM attention masks and 2D position ids from input ids (vectorised, validated).

Same results as the original's `get_masks` / `get_position_ids` loops:
- context length c of a row = index of the first bos (`<sop>`);
- mask `[b, 1, s, s]`, True = may not attend: column j is visible from row i
  when `j < c` (bidirectional context) or `j <= i` (causal after it);
- positions `arange(s)` with `[c:]` replaced by the index of `[gMASK]` (or of
  `[MASK]` when the row has no `[gMASK]`); block positions 0 on the context and
  `1, 2, ...` from c on.
Rows without a bos or a mask token raise `ValueError` naming the row (the
original fails with "130004 is not in list").
"""
from __future__ import annotations

import torch


def _first_index(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    hit = input_ids == token_id
    return hit.int().argmax(dim=1), hit.any(dim=1)


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """`[b]` int64: index of the first bos in each row."""
    index, found = _first_index(input_ids, bos_token_id)
    if not bool(found.all()):
        row = int((~found).nonzero()[0, 0])
        raise ValueError(
            f"input_ids row {row} has no bos token (id {bos_token_id}, '<sop>'): ChatGLM prompts end with "
            "[gMASK] <sop> (the tokenizer adds them); or pass attention_mask and position_ids yourself"
        )
    return index


def mask_positions(input_ids: torch.Tensor, mask_token_id: int, gmask_token_id: int) -> torch.Tensor:
    """`[b]` int64: index of the first [gMASK] of each row, or of the first [MASK] if it has none."""
    gindex, gfound = _first_index(input_ids, gmask_token_id)
    mindex, mfound = _first_index(input_ids, mask_token_id)
    if not bool((gfound | mfound).all()):
        row = int((~(gfound | mfound)).nonzero()[0, 0])
        raise ValueError(
            f"input_ids row {row} has neither [gMASK] (id {gmask_token_id}) nor [MASK] (id {mask_token_id}); "
            "ChatGLM needs one to place generated tokens, or pass position_ids yourself"
        )
    return torch.where(gfound, gindex, mindex)


def get_masks(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Bool `[b, 1, s, s]` GLM mask, True = may not attend."""
    s = input_ids.shape[1]
    c = context_lengths(input_ids, bos_token_id)
    col = torch.arange(s, device=input_ids.device)
    visible = (col[None, None, :] < c[:, None, None]) | (col[None, None, :] <= col[None, :, None])
    return (~visible).unsqueeze(1)


def get_position_ids(input_ids: torch.Tensor, bos_token_id: int, mask_token_id: int,
                     gmask_token_id: int, mask_position=None, pad=None) -> torch.Tensor:
    """int64 `[b, 2, s]`: positions and block positions.

    `mask_position` (one index per row) replaces the [gMASK]/[MASK] lookup.
    `pad` (`[b]`, left-padding lengths) makes positions count from each row's
    first token, with 0 on the padding, as the original tokenizer pads them.
    """
    s = input_ids.shape[1]
    c = context_lengths(input_ids, bos_token_id)[:, None]
    if mask_position is None:
        mask_position = mask_positions(input_ids, mask_token_id, gmask_token_id)
    mpos = torch.as_tensor(mask_position, device=input_ids.device).reshape(-1, 1)
    pos = torch.arange(s, device=input_ids.device)[None, :]
    if pad is not None:
        pad = pad.to(input_ids.device).reshape(-1, 1)
        pos, c, mpos = pos - pad, c - pad, mpos - pad
    after = pos >= c
    position = torch.where(after, mpos, pos)
    block = torch.where(after, pos - c + 1, torch.zeros_like(pos))
    if pad is not None:
        position, block = position.clamp(min=0), torch.where(pos >= 0, block, torch.zeros_like(block))
    return torch.stack((position, block), dim=1)


def left_padding(attention_mask: torch.Tensor, batch: int, length: int, check: bool = True) -> torch.Tensor:
    """`[b]` int64 left-padding lengths of a padding mask `[b, length]` (1 = token, 0 = padding).

    Raises `ValueError` when the mask has another shape or (`check`, which reads
    the mask on the host) holds zeros after a row's first token (ChatGLM pads on
    the left only).
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"a padding attention_mask must be [batch, past + seq] = [{batch}, {length}], "
                         f"got {tuple(attention_mask.shape)}")
    real = attention_mask != 0
    pad = (~real).int().cumprod(dim=1).sum(dim=1)
    if not check:
        return pad.long()
    expected = torch.arange(length, device=real.device)[None, :] >= pad[:, None]
    if not torch.equal(real, expected):
        row = int((real != expected).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} is not left padding (a 0 after the first 1): ChatGLM pads "
                         "on the left")
    return pad.long()
