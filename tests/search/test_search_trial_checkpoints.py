"""What a search trial spends around its training: checkpoints at the evaluations that report the pruner's
rungs, and evaluations sized to the training between them."""

from __future__ import annotations

from lmforge.search.budget import Fidelity
from lmforge.search.objective import MIN_EVAL_BLOCKS, rung_steps, trial_eval_blocks


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


def test_trial_eval_blocks_follow_the_training_between_evaluations() -> None:
    big = Fidelity(min_tokens=1_000_000, max_tokens=9_000_000, eta=3, rungs=2, tokens_per_step=1000)
    assert trial_eval_blocks(big, 64, 128) == 64  # long evaluation intervals: the search's eval_blocks
    small = Fidelity(min_tokens=24_576, max_tokens=24_576, eta=3, rungs=0, tokens_per_step=1536)
    assert trial_eval_blocks(small, 64, 128) == 17  # 3% of 3 x 24,576 tokens: 17 blocks of 128
    assert trial_eval_blocks(small, 64, 256) == MIN_EVAL_BLOCKS  # 8 blocks would do: never fewer than one batch
    assert trial_eval_blocks(small, 64, 32) == 64  # 69 blocks of 32: the search's 64
    mid = Fidelity(min_tokens=100_000, max_tokens=900_000, eta=3, rungs=2, tokens_per_step=1000)
    assert trial_eval_blocks(mid, 64, 256) == 35  # 0.03 x 3 x 100,000 / 256
    assert trial_eval_blocks(mid, 8, 256) == 8  # never more than the search asks for
