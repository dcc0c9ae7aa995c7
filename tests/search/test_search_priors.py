"""Start points across corpora: mean rank, the pick, and leave-one-corpus-out (search/priors.py); the shipped
space's start points (one per family, written by benchmarks/derive_priors.py)."""

from __future__ import annotations

import math

import pytest

from lmforge.search.priors import leave_one_out, mean_ranks, pick, ranks
from lmforge.search.space import load_space


def test_ranks_ties_and_failures():
    r = ranks({"a": 2.0, "b": 1.0, "c": 2.0, "d": math.inf, "e": math.nan})
    assert r == {"b": 1.0, "a": 2.5, "c": 2.5, "d": 4.5, "e": 4.5}


def test_pick_uses_ranks_not_mean_losses():
    # x wins two of three corpora by a little and loses the hardest one by a lot: the best mean rank, not
    # the best mean loss (which y has, because the hard corpus dominates the sum)
    losses = {
        "easy1": {"x": 1.00, "y": 1.05, "z": 1.10},
        "easy2": {"x": 1.50, "y": 1.55, "z": 1.60},
        "hard": {"x": 4.00, "y": 3.00, "z": 3.50},
    }
    assert mean_ranks(losses) == {"x": pytest.approx(5 / 3), "y": pytest.approx(5 / 3), "z": pytest.approx(8 / 3)}
    # a tie in mean rank goes to the lower mean loss
    assert pick(losses) == "y"
    assert pick(losses, ["easy1", "easy2"]) == "x"
    with pytest.raises(ValueError, match="other candidates"):
        mean_ranks({"a": {"x": 1.0}, "b": {"y": 1.0}})


def test_leave_one_out_never_sees_the_held_out_corpus():
    # the candidate best on the held-out corpus is the worst on the others: a pick that peeked would take it
    losses = {
        "c1": {"hand": 2.0, "r0": 1.0, "r1": 3.0},
        "c2": {"hand": 2.0, "r0": 1.0, "r1": 3.0},
        "c3": {"hand": 2.0, "r0": 3.0, "r1": 1.0},
        "c4": {"hand": 2.0, "r0": 1.0, "r1": 3.0},
    }
    rows = {r.corpus: r for r in leave_one_out(losses, "hand")}
    assert rows["c3"].picked == "r0" and rows["c3"].picked_loss == 3.0 and rows["c3"].picked_rank == 3.0
    assert rows["c1"].picked == "r0" and rows["c1"].picked_rank == 1.0  # r0: ranks 1, 3, 1 on c2, c3, c4
    assert rows["c3"].hand_set_loss == 2.0 and rows["c3"].hand_set_rank == 2.0
    assert rows["c3"].random_mean == 2.0 and rows["c3"].random_median == 2.0
    with pytest.raises(ValueError):
        leave_one_out({"c1": losses["c1"]}, "hand")


def test_the_shipped_space_starts_every_family_once():
    space = load_space()
    fams = [p.get("model.family") for p in space.start_params()]
    assert sorted(fams) == ["gru", "lstm", "rcnn", "transformer"]
