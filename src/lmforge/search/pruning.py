"""The search's default pruner: asynchronous successive halving on *predicted* final losses.

Optuna's successive halving compares the losses trials report at a rung; a trial that converges slowly but
to a lower loss (often a larger model) loses there even when it would win the final training, which runs
several times longer. :class:`CurvePruner` keeps the rungs (``min_tokens * eta**k`` trained tokens) and the
promotion rule of asynchronous successive halving (a trial goes on past rung ``k`` when it is among the best
``1/eta`` of the trials that reached that rung so far; the first one always does), but ranks trials by their
loss predicted at ``horizon`` tokens from their validation curve up to the rung
(:func:`lmforge.search.curves.predict_curve`): every trial is judged with the same information, the part
of its curve below its first report at or past the rung.

One point cannot be extrapolated: at a rung where a trial's curve has fewer than ``MIN_POINTS`` reports
(the first rung, as trials evaluate once per ``min_tokens``) the raw losses decide, and only the worse half
stops there (a cheap cut of diverged or hopeless trials, gentler than ``1/eta``); from the next rung on,
the predictions decide with ``1/eta``.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmforge.search.curves import MIN_POINTS, predict_curve


class CurvePruner(optuna.pruners.BasePruner):
    """Successive halving on the loss each trial's curve predicts at ``horizon`` tokens (see the module)."""

    def __init__(self, min_tokens: int, max_tokens: int, eta: int, horizon: float) -> None:
        self.min_tokens = max(1, int(min_tokens))
        self.max_tokens = int(max_tokens)
        self.eta = max(2, int(eta))
        self.horizon = float(horizon)

    def rungs(self) -> list[int]:
        """The rung lengths below the longest trial (a trial reaching ``max_tokens`` is finished)."""
        out, r = [], self.min_tokens
        while r < self.max_tokens:
            out.append(r)
            r *= self.eta
        return out

    def crossing(self, curve: dict[int, float], rung: int) -> int | None:
        """The first reported length at or past ``rung`` (None: not reached)."""
        past = [s for s in curve if s >= rung]
        return min(past) if past else None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        curve = dict(trial.intermediate_values)
        if not math.isfinite(curve.get(step, math.nan)):
            return True
        for rung in self.rungs():
            at = self.crossing(curve, rung)
            if at != step:  # decide once per rung, at the first report past it
                continue
            enough = sum(1 for s in curve if s <= at) >= MIN_POINTS
            mine = predict_curve(curve, self.horizon, up_to=at).mean if enough else curve[at]
            others = []
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            ):
                if t.number == trial.number:
                    continue
                their = self.crossing(dict(t.intermediate_values), rung)
                if their is None:
                    continue
                if enough:
                    others.append(predict_curve(t.intermediate_values, self.horizon, up_to=their).mean)
                else:
                    others.append(float(t.intermediate_values[their]))
            ranked = sorted(v if math.isfinite(v) else math.inf for v in [*others, mine])
            keep = max(0, len(ranked) // (self.eta if enough else 2) - 1)
            if mine > ranked[keep]:
                return True
        return False
