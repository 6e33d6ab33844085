"""Next tokens of a batch of rows, each with its own temperature, top-p and random generator.

The same rules as `generate()` with the original `chat()` settings, per row:
- the original's guard (`InvalidScoreLogitsProcessor`): a row with a NaN or inf score puts all
  its probability on token 5;
- temperature 0: greedy (argmax);
- else transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper` (keep the smallest set of
  most likely tokens whose probability reaches `top_p`, at least one), then one draw from the
  row's own `torch.Generator` (a request's `seed` makes its answer reproducible in any batch).
"""
from __future__ import annotations

import torch


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Row-wise probabilities after the temperature and top-p filter: `[n, vocab]` from fp32 `logits [n, vocab]`
    and per-row `temperature [n]` (> 0), `top_p [n]` in (0, 1]."""
    rows = logits / temperature[:, None]
    ascending, order = torch.sort(rows, dim=1)
    cumulative = ascending.softmax(dim=1).cumsum(dim=1)
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False  # the most likely token always stays
    return rows.masked_fill(remove.scatter(1, order, remove), float("-inf")).softmax(dim=1)


def sample_rows(logits: torch.Tensor, params, generators) -> torch.Tensor:
    """`[n]` int64 next tokens from fp32 `logits [n, vocab]`; `params[i]`: `SamplingParams` of row i,
    `generators[i]`: its CPU `torch.Generator` (unused for greedy rows)."""
    logits = logits.float().clone()
    invalid = ~torch.isfinite(logits).all(dim=1)
    if bool(invalid.any()):
        logits[invalid] = 0.0
        logits[invalid, 5] = 5e4
    tokens = logits.argmax(dim=1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    probs = filtered_probs(logits[sampled],
                           torch.tensor([params[i].temperature for i in sampled], device=logits.device),
                           torch.tensor([params[i].top_p for i in sampled], device=logits.device))
    for j, i in enumerate(sampled):
        tokens[i] = torch.multinomial(probs[j].cpu(), 1, generator=generators[i])[0]
    return tokens
