"""Evolution's tournament compares members at matched training tokens: a child continues its parent's
weights (its curve is reported at lineage tokens), so its raw loss is not comparable with a fresh member's."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution

from lmforge.search.curves import predict_curve
from lmforge.search.evolution import matched_best, matched_loss


def _member(curve: dict[int, float], number: int) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(
        params={"x": 0.0},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        value=curve[max(curve)],
        intermediate_values=curve,
    )
    t.number = number
    return t


def test_a_fresh_member_that_would_be_better_at_the_childs_tokens_wins():
    steps = np.arange(1, 7) * 1000
    # fresh: 6k tokens, still falling fast; child: 12k-24k lineage tokens, flat and higher than fresh's trend
    fresh = _member({int(s): float(1.5 + 2.0 * (s / 1000) ** -0.7) for s in steps}, 0)
    child = _member({int(12000 + s * 2): 2.0 - 0.01 * i for i, s in enumerate(steps)}, 1)
    assert child.value < fresh.value  # raw: the child looks better
    reach = 24000
    assert matched_loss(child, reach) == pytest.approx(child.intermediate_values[reach])
    assert matched_loss(fresh, reach) == pytest.approx(predict_curve(fresh.intermediate_values, reach).mean)
    assert matched_loss(fresh, reach) < matched_loss(child, reach)
    assert matched_best([child, fresh]) is fresh


def test_equal_lengths_compare_raw_losses():
    a = _member({1000: 3.0, 2000: 2.5}, 0)
    b = _member({1000: 2.9, 2000: 2.6}, 1)
    assert matched_best([a, b]) is a
    assert matched_best([]) is None
