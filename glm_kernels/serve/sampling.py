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


TOP_K = 256  # candidates sorted first; a row whose nucleus is wider falls back to sorting the vocabulary


def nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor):
    """Per row, the tokens top-p keeps and their probabilities (not renormalised): a list of `(ids, probs)`.

    The same set as transformers' `TopPLogitsWarper` after `TemperatureLogitsWarper`: a token stays while the
    tokens more likely than it hold less than `top_p` of the probability. Sorting all 130528 scores of a row
    costs ~9 ms on a CPU core, ~140 ms for 16 rows a step; the nucleus of a language model is usually a few
    tokens, so the `TOP_K` most likely are sorted first and the whole row only when they hold less than top_p.
    """
    probs = (logits / temperature[:, None]).softmax(dim=1)
    top, ids = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
    groups = [(list(range(probs.shape[0])), top, ids)]
    wide = (top.sum(dim=1) < top_p).nonzero().flatten().tolist()  # nucleus wider than TOP_K
    if wide:  # those rows sorted whole, together
        groups.append((wide, *probs[wide].sort(dim=1, descending=True)))
    out = {}
    for rows, values, order in groups:
        before = values.cumsum(dim=1) - values  # probability of the tokens ranked above each one
        keep = (before < top_p[rows][:, None]).sum(dim=1).clamp(min=1).tolist()
        for j, row in enumerate(rows):
            out[row] = (order[j, :keep[j]], values[j, :keep[j]])  # a wide row's full sort replaces its top-K
    return [out[row] for row in range(probs.shape[0])]


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`[n, vocab]` probabilities after the temperature and top-p filter (renormalised over the kept tokens),
    from fp32 `logits [n, vocab]`, per-row `temperature [n]` (> 0) and `top_p [n]` in (0, 1]."""
    out = torch.zeros_like(logits, dtype=torch.float32)
    for row, (ids, probs) in enumerate(nucleus(logits.float(), temperature, top_p)):
        out[row, ids] = probs / probs.sum()
    return out


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
    kept = nucleus(logits[sampled], torch.tensor([params[i].temperature for i in sampled], device=logits.device),
                   torch.tensor([params[i].top_p for i in sampled], device=logits.device))
    for (ids, probs), i in zip(kept, sampled):
        tokens[i] = ids[torch.multinomial(probs.cpu(), 1, generator=generators[i])[0]]
    return tokens
