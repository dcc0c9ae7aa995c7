"""Task metrics against hand-computed values and independent implementations (scikit-learn)."""

from __future__ import annotations

import math
import random

import pytest

from lmforge.evaluate import metrics as M

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")


def test_rouge_hand_computed():
    # ref: the cat was on the mat | pred: the cat sat on the mat
    # unigrams: 5 of 6 shared (the x2, cat, on, mat); bigrams: the-cat, on-the, the-mat = 3 of 5;
    # LCS "the cat on the mat" = 5 of 6
    agg, per = M.rouge(["the cat sat on the mat"], ["the cat was on the mat"], use_stemmer=False)
    assert per[0]["rouge1"] == pytest.approx(100 * 5 / 6)
    assert per[0]["rouge2"] == pytest.approx(100 * 3 / 5)
    assert per[0]["rougeL"] == pytest.approx(100 * 5 / 6)
    # unequal lengths: pred "a b c" vs ref "a b c d e": P=1, R=3/5 -> F=0.75; bigrams P=1, R=2/4 -> F=2/3
    agg, per = M.rouge(["a b c", "the cat sat on the mat"], ["a b c d e", "the cat was on the mat"], use_stemmer=False)
    assert per[0] == pytest.approx({"rouge1": 75.0, "rouge2": 100 * 2 / 3, "rougeL": 75.0})
    assert agg["rouge1"] == pytest.approx((75.0 + 100 * 5 / 6) / 2)  # mean over examples
    assert agg["rouge2"] == pytest.approx((100 * 2 / 3 + 60.0) / 2)


def test_rouge_stemming_and_case():
    pred, ref = ["Police kill the gunman"], ["police killed the gunman"]
    # without stemming: kill != killed -> 3/4 unigrams, 1/3 bigrams (the-gunman), LCS 3/4
    _, plain = M.rouge(pred, ref, use_stemmer=False)
    assert plain[0] == pytest.approx({"rouge1": 75.0, "rouge2": 100 / 3, "rougeL": 75.0})
    _, stemmed = M.rouge(pred, ref, use_stemmer=True)
    assert stemmed[0] == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    _, none = M.rouge(["xyz"], ["abc"])
    assert none[0] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_bleu_chrf_known_values():
    agg, per = M.bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert agg["bleu"] == pytest.approx(100.0) and agg["chrf"] == pytest.approx(100.0)
    assert per[0]["bleu"] == pytest.approx(100.0) and per[0]["chrf"] == pytest.approx(100.0)
    # hand: n-gram precisions 5/6, 3/5, 1/4, 0/3; sacrebleu's default 'exp' smoothing turns the k-th zero
    # precision into 1 / (2^k * total) = 1/6; brevity penalty 1 (equal lengths)
    agg, _ = M.bleu_chrf(["the cat sat on the mat"], ["the cat was on the mat"])
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert agg["bleu"] == pytest.approx(expected, abs=1e-6)
    assert 0 < agg["chrf"] < 100
    agg, _ = M.bleu_chrf(["abc"], ["xyz"])
    assert agg["bleu"] == pytest.approx(0.0) and agg["chrf"] == pytest.approx(0.0)


def test_macro_f1_and_accuracy_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for trial in range(20):
        labels = ["pos", "neg", "neu", "other"][: 2 + trial % 3]
        refs = [rng.choice(labels) for _ in range(30)]
        preds = [rng.choice(labels + ["stray"]) if rng.random() < 0.5 else r for r in refs]
        assert M.macro_f1(preds, refs) == pytest.approx(
            100 * sk.f1_score(refs, preds, average="macro", zero_division=0)
        )
        assert M.accuracy(preds, refs) == pytest.approx(100 * sk.accuracy_score(refs, preds))
        agg, per = M.classification(preds, refs, labels)
        assert agg["macro_f1"] == pytest.approx(
            100 * sk.f1_score(refs, preds, labels=labels, average="macro", zero_division=0)
        )
        assert [p["correct"] for p in per] == [100.0 * (a == b) for a, b in zip(preds, refs, strict=True)]


def test_exact_match_normalization():
    assert M.normalize_structured(" ( add  3\n4 ) ") == "( add 3 4 )"
    preds = ["(add 3 4)", "( add 3 4 )", "(add 34)", "(ADD 3 4)", "(sub 3 4)"]
    agg, per = M.exact_match(preds, ["(add 3 4)"] * 5)
    assert [p["exact_match"] for p in per] == [100.0, 100.0, 0.0, 0.0, 0.0]
    assert agg["exact_match"] == pytest.approx(40.0)
    agg, _ = M.exact_match(preds, ["(add 3 4)"] * 5, ignore_case=True)
    assert agg["exact_match"] == pytest.approx(60.0)


def test_perplexity_and_bits_per_byte():
    assert M.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert M.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(M.MetricError):
        M.perplexity(1.0, 0)


def test_errors_are_one_line():
    with pytest.raises(M.MetricError, match="2 predictions but 1 references"):
        M.rouge(["a", "b"], ["a"])
    with pytest.raises(M.MetricError, match="unknown metric"):
        M.score("nope", ["a"], ["a"])
