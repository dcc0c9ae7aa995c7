"""Where a search trial writes checkpoints: at the evaluations that report the pruner's rungs."""

from __future__ import annotations

from lmforge.search.budget import Fidelity
from lmforge.search.objective import rung_steps


def test_rung_steps_are_the_evaluations_at_or_past_each_rung() -> None:
    fid = Fidelity(min_tokens=1000, max_tokens=9000, eta=3, rungs=2, tokens_per_step=100)
    # the search's own step size: evaluations every 10 steps, rungs at 1,000 / 3,000 / 9,000 tokens
    assert rung_steps(fid, 10, 100, 90) == {10, 30, 90}
    # a trial with a larger batch (128 tokens a step, evaluating every 7 steps = 896 tokens): the first
    # evaluation at or past each rung is at 1,792 / 3,584 / 9,856 tokens, the last capped at max_steps
    assert rung_steps(fid, 7, 128, 71) == {14, 28, 71}
    # rungs past the trial's length are left out
    short = Fidelity(min_tokens=1000, max_tokens=2000, eta=3, rungs=2, tokens_per_step=100)
    assert rung_steps(short, 10, 100, 20) == {10}
