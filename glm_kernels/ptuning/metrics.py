"""BLEU-4 and ROUGE-1/2/L as THUDM's `ptuning/main.py` computes them, plus exact match.

Per (prediction, reference) pair of decoded strings:

- ROUGE: `rouge_chinese.Rouge().get_scores(" ".join(jieba.cut(pred)), " ".join(jieba.cut(ref)))`,
  the F value of rouge-1, rouge-2 and rouge-l, times 100, rounded to 4 decimals;
- BLEU-4: `nltk.translate.bleu_score.sentence_bleu([list(ref)], list(pred),
  smoothing_function=SmoothingFunction().method3)` (over characters), times 100,
  rounded to 4 decimals;
- exact match (not in the original): 100 if the stripped strings are equal.

The scores are averaged over the pairs. One difference: `rouge_chinese` raises
on an empty prediction or reference (a model that answers nothing would crash
THUDM's evaluation); such a pair scores 0 here.
"""
from __future__ import annotations

import logging

import numpy as np

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _segment(text: str) -> str:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at INFO on first use
    return " ".join(jieba.cut(text))


def pair_scores(prediction: str, reference: str) -> dict[str, float]:
    """Scores of one pair, each in [0, 100] (see the module docstring)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    scores = {}
    hypothesis, target = _segment(prediction), _segment(reference)
    if hypothesis.strip() and target.strip():
        result = Rouge().get_scores(hypothesis, target)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key] = round(result[key]["f"] * 100, 4)
    else:
        scores.update({key: 0.0 for key in ("rouge-1", "rouge-2", "rouge-l")})
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    scores["exact_match"] = 100.0 if prediction.strip() == reference.strip() else 0.0
    return scores


def corpus_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of `pair_scores` over the pairs: `rouge-1`, `rouge-2`, `rouge-l`, `bleu-4`, `exact_match`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    per_pair = [pair_scores(p, r) for p, r in zip(predictions, references)]
    return {key: float(np.mean([s[key] for s in per_pair])) for key in per_pair[0]}


def decode_for_metrics(tokenizer, ids) -> list[str]:
    """Decode generated or label ids (`-100` and padding dropped, special tokens skipped), stripped."""
    ids = np.asarray(ids)
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]


def make_compute_metrics(tokenizer):
    """`compute_metrics` for the Trainer: decodes `EvalPrediction(predictions, label_ids)` and scores it."""

    def compute_metrics(eval_preds):
        preds, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        return corpus_scores(decode_for_metrics(tokenizer, preds), decode_for_metrics(tokenizer, labels))

    return compute_metrics
