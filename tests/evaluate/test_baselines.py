"""Trivial task baselines, checked against hand-computed predictions and scores."""

from __future__ import annotations

import pytest

from lmforge.data.tasks import get_task
from lmforge.evaluate import metrics as M
from lmforge.evaluate.baselines import baselines, choose_lead_k, lead


def test_majority_label_is_most_frequent_fit_label() -> None:
    fit = [{"text": "x", "label": lab} for lab in ["b", "a", "b", "c", "a", "b"]]
    test = [{"text": "y", "label": lab} for lab in ["b", "a", "a", "c"]]
    (only,) = baselines("classification", fit, test, labels=["a", "b", "c"])
    assert only.name == "majority-label" and only.predictions == ["b"] * 4
    assert only.metrics["accuracy"] == pytest.approx(25.0)
    assert only.metrics["macro_f1"] == pytest.approx(M.macro_f1(["b"] * 4, ["b", "a", "a", "c"], ["a", "b", "c"]))


def test_majority_tie_takes_first_sorted_label() -> None:
    fit = [{"text": "x", "label": lab} for lab in ["z", "y"]]
    (only,) = baselines("classification", fit, fit)
    assert only.predictions == ["y", "y"]


def test_lead_k_chosen_on_fit_records() -> None:
    # the summary is always the first 5 words: lead-5 is exact, longer leads lose precision
    docs = [" ".join(f"w{i}{j}" for j in range(40)) for i in range(6)]
    fit = [{"document": d, "summary": lead(d, 5)} for d in docs]
    assert choose_lead_k(get_task("summarization"), fit) == 5
    out = {b.name: b for b in baselines("summarization", fit, fit)}
    assert set(out) == {"lead-k", "copy-source", "most-frequent-output"}
    assert out["lead-k"].detail == {"k": 5} and out["lead-k"].metrics["rouge1"] == pytest.approx(100.0)
    assert out["copy-source"].predictions == docs


def test_most_frequent_parse_and_copy_source() -> None:
    fit = [{"text": "t1", "parse": "(a)"}, {"text": "t2", "parse": "(b)"}, {"text": "t3", "parse": "(a)"}]
    test = [{"text": "(a)", "parse": "(a)"}, {"text": "q", "parse": "(c)"}]
    out = {b.name: b for b in baselines("semantic-parsing", fit, test)}
    assert out["most-frequent-output"].predictions == ["(a)", "(a)"]
    assert out["most-frequent-output"].metrics["exact_match"] == pytest.approx(50.0)
    assert out["copy-source"].predictions == ["(a)", "q"]
    assert out["copy-source"].metrics["exact_match"] == pytest.approx(50.0)
