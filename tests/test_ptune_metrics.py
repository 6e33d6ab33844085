"""BLEU-4 / ROUGE as THUDM computes them, against values worked out by hand in the comments."""
import jieba
import numpy as np
import pytest

from glm_kernels.ptuning.metrics import corpus_scores, decode_for_metrics, pair_scores


def test_segmentation_the_cases_below_assume():
    assert list(jieba.cut("红色上衣")) == ["红色", "上衣"]
    assert list(jieba.cut("红色裙子")) == ["红色", "裙子"]
    assert list(jieba.cut("红色的裙子很好看")) == ["红色", "的", "裙子", "很", "好看"]


def test_identical_pair_scores_100():
    assert pair_scores("红色裙子", "红色裙子") == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                                  "bleu-4": 100.0, "exact_match": 100.0}


def test_partial_overlap_by_hand():
    s = pair_scores("红色上衣", "红色裙子")
    # words [红色, 上衣] vs [红色, 裙子]: 1 of 2 unigrams -> P = R = 1/2, F = 50; no common bigram; LCS 1 -> 50
    assert s["rouge-1"] == pytest.approx(50.0, abs=1e-4)
    assert s["rouge-2"] == 0.0
    assert s["rouge-l"] == pytest.approx(50.0, abs=1e-4)
    # characters: 1-gram 2/4, 2-gram 1/3, no 3-/4-gram: method3 gives 1/(2*2) and 1/(4*1); brevity penalty 1
    assert s["bleu-4"] == pytest.approx(round(100 * (0.5 * (1 / 3) * (1 / 4) * (1 / 4)) ** 0.25, 4), abs=1e-4)
    assert s["exact_match"] == 0.0


def test_longer_prediction_by_hand():
    s = pair_scores("红色的裙子很好看", "红色裙子")
    # rouge-1: 2 common words, P = 2/5, R = 2/2, F = 2PR/(P+R) = 0.8/1.4
    assert s["rouge-1"] == pytest.approx(100 * 0.8 / 1.4, abs=1e-4)
    assert s["rouge-2"] == 0.0
    # BLEU: 1-gram 4/8, 2-gram 2/7, 3-gram 0/6 -> 1/(2*6), 4-gram 0/5 -> 1/(4*5); prediction longer: BP = 1
    assert s["bleu-4"] == pytest.approx(100 * (0.5 * (2 / 7) * (1 / 12) * (1 / 20)) ** 0.25, abs=1e-4)


def test_empty_prediction_scores_zero_instead_of_crashing():
    s = pair_scores("", "红色裙子")
    assert s["rouge-1"] == s["rouge-2"] == s["rouge-l"] == s["bleu-4"] == 0.0


def test_corpus_scores_are_means_of_pairs():
    scores = corpus_scores(["红色裙子", "红色上衣"], ["红色裙子", "红色裙子"])
    assert scores["rouge-1"] == pytest.approx((100 + 50) / 2, abs=1e-4)
    assert scores["exact_match"] == 50.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        corpus_scores(["a", "b"], ["a"])


class _Decoder:
    pad_token_id = 3

    def batch_decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
        return [" ".join(str(i) for i in row if i != 3) + " " for row in ids]


def test_decode_replaces_minus_100_padding_and_strips():
    assert decode_for_metrics(_Decoder(), np.array([[5, 6, -100], [7, -100, -100]])) == ["5 6", "7"]
