"""Freeze-thaw: a trial stopped at a rung keeps its checkpoint (within the disk cap) and may be thawed later,
continuing in its own directory exactly where it stopped, when its expected gain per second beats starting
a new trial (Swersky et al. 2014, "Freeze-Thaw Bayesian Optimization", in a simple form).

After every trial, :func:`maybe_thaw` compares (with the losses the trials' curves predict at the final
length, :mod:`lmforge.search.curves`):

- a stopped trial ``p``: expected improvement over the best prediction so far, ``EI(mu_p, sigma_p)``, per
  second it needs to reach the trial length at its own speed;
- a new trial: the expected improvement of a draw from the normal fitted to all trials' predictions, per
  second of an average trial.

The best stopped trial whose rate beats the new trial's is enqueued again with its parameters and run
directory (a retry chain, as an interrupted trial's: :func:`lmforge.search.study.original_number` maps it to
the same ``DIR/trials/NNNN``, and ``train.resume auto`` continues its checkpoint bit for bit). Each trial is
thawed at most ``MAX_THAWS`` times; a trial stopped because the search budget ran out is not thawed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmforge.runs import list_checkpoints
from lmforge.search.curves import FINAL_HORIZON, MIN_POINTS, predict_curve
from lmforge.search.disk import MARKER
from lmforge.search.study import original_number

MAX_THAWS = 1
THAW_ATTR = "thawed_from"


def expected_improvement(best: float, mu: float, sigma: float) -> float:
    """``E[max(0, best - L)]`` for ``L ~ N(mu, sigma)``."""
    if sigma <= 0:
        return max(0.0, best - mu)
    z = (best - mu) / sigma
    cdf = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return (best - mu) * cdf + sigma * pdf


def _thaws(trials: list[FrozenTrial], origin: int) -> int:
    return sum(1 for t in trials if t.user_attrs.get(THAW_ATTR) == origin)


def thaw_choice(
    trials: list[FrozenTrial], run_dir: Path, max_tokens: int, horizon: float | None = None
) -> tuple[FrozenTrial | None, dict[str, Any]]:
    """The stopped trial worth thawing (None: start a new one instead) and the numbers behind the choice."""
    target = horizon if horizon is not None else FINAL_HORIZON * max_tokens
    scored = []
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or len(t.intermediate_values) < MIN_POINTS:
            continue
        p = predict_curve(t.intermediate_values, target)
        if math.isfinite(p.mean):
            scored.append((t, p))
    if len(scored) < 2:
        return None, {}
    means = [p.mean for _, p in scored]
    best = min(means)
    m = sum(means) / len(means)
    s = math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1))
    durations = [float(t.user_attrs.get("duration_s") or 0.0) for t, _ in scored]
    cost_new = max(1e-3, sum(durations) / len(durations))
    rate_new = expected_improvement(best, m, s) / cost_new
    pending = {original_number(t) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
    choice: tuple[float, FrozenTrial] | None = None
    for t, p in scored:
        origin = original_number(t)
        if t.state != TrialState.PRUNED or "budget" in str(t.user_attrs.get("stopped", "")):
            continue
        if origin in pending or _thaws(trials, origin) >= MAX_THAWS:
            continue
        rel = t.user_attrs.get("run_dir")
        if not rel or (run_dir / rel / MARKER).exists() or not list_checkpoints(run_dir / rel):
            continue
        tokens = max(t.intermediate_values)
        duration = float(t.user_attrs.get("duration_s") or 0.0)
        if tokens <= 0 or duration <= 0 or tokens >= max_tokens:
            continue
        cost = (max_tokens - tokens) * duration / tokens
        rate = expected_improvement(best, p.mean, p.std) / max(1e-3, cost)
        if rate > rate_new and (choice is None or rate > choice[0]):
            choice = (rate, t)
    info = {"rate_new": rate_new, "best_predicted": best}
    if choice is None:
        return None, info
    return choice[1], {**info, "rate": choice[0]}


def enqueue_thaw(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue ``trial`` again in its own run directory (a retry chain: the same ``DIR/trials/NNNN``)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={"run_dir": trial.user_attrs["run_dir"], THAW_ATTR: original_number(trial)},
            system_attrs={"retry_history": history},
        )
    )


def maybe_thaw(study: optuna.Study, run_dir: Path, max_tokens: int) -> FrozenTrial | None:
    """Enqueue the stopped trial worth thawing, if any (see the module doc); the trial thawed, or None."""
    trials = study.get_trials(deepcopy=False)
    chosen, _ = thaw_choice(trials, run_dir, max_tokens)
    if chosen is not None:
        enqueue_thaw(study, chosen)
    return chosen
