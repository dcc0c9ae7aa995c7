"""Stop a trial as soon as its own speed says it cannot finish within its time share.

Without this, a configuration too large for the budget trains until its share runs out (a third of the
search at short budgets) for a curve it cannot finish: in a 90-second benchmark run one such trial took 14 of
the search's 36 seconds. :class:`SpeedGuard` measures the trial's tokens per second from the step after the
first (which carries allocations and any compile) and, when that window reaches 2, 4, 8, ... steps (a passing
stall is averaged out), projects the time to the trial's length; a projection beyond ``SLOW_MARGIN`` times
the share stops the trial (reason ``callback``), which the caller records as failed with ``TOO_SLOW``. Such a trial is
not a candidate for the final step (at its speed the final would train it too few tokens); one that only ran
over its share (``SLOW_FAIL``: its projection was within the margin) still is.
"""

from __future__ import annotations

from lmforge.train.callbacks import Callback, LoopState

SPEED_STEPS = 2
"""Optimizer steps a trial's speed is measured over before it may be stopped for being too slow."""
SLOW_MARGIN = 1.25
"""A trial is stopped when its speed says it needs more than this many times its time share to finish."""
SLOW_FAIL = "exceeded its time share"
"""How a trial stopped for running (or being projected to run) over its time share is worded; the final
step still counts such a trial as a candidate when it has a curve and a checkpoint."""
def overran(max_time: float | None, tokens: int, max_tokens: int) -> str:
    """The failure reason of a trial whose clock (``train.max_time``) stopped it short of its length."""
    return f"{SLOW_FAIL} of {max_time or 0:.0f}s at {tokens:,} of {max_tokens:,} tokens"


TOO_SLOW = "too slow for its time share"
"""How a trial stopped by :class:`SpeedGuard` is worded."""


class SpeedGuard(Callback):
    """Stops training once the measured speed projects past ``share_s`` x ``SLOW_MARGIN`` seconds to reach
    ``max_tokens``; ``too_slow`` then says why. Decides from the loop's state only (the same on every rank)."""

    def __init__(self, share_s: float | None, max_tokens: int) -> None:
        self.share_s = share_s
        self.max_tokens = int(max_tokens)
        self.too_slow: str | None = None
        self._from: tuple[int, int, float] | None = None

    def on_step(self, state: LoopState) -> bool:
        if self.share_s is None or self.too_slow is not None:
            return False
        if self._from is None:
            self._from = (state.step, state.tokens, state.elapsed_s)
            return False
        step0, tokens0, t0 = self._from
        steps = state.step - step0
        if steps < SPEED_STEPS or steps & (steps - 1):  # at 2, 4, 8, ... steps
            return False
        seconds = state.elapsed_s - t0
        if seconds <= 0:
            return False
        rate = (state.tokens - tokens0) / seconds
        need = state.elapsed_s + (self.max_tokens - state.tokens) / max(rate, 1e-9)
        if need <= self.share_s * SLOW_MARGIN:
            return False
        self.too_slow = (
            f"{TOO_SLOW} of {self.share_s:.0f}s: at {rate:,.0f} tokens/s it would need {need:.0f}s for "
            f"{self.max_tokens:,} tokens (stopped at {state.tokens:,})"
        )
        return True
