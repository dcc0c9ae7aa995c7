"""Learning-curve extrapolation and the pruner built on it, on synthetic curves with a known crossing point:
a model worse early and better late must win."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from lmforge.search.curves import predict, predict_curve
from lmforge.search.pruning import CurvePruner

T0 = 10_000
"""Trials report every T0 tokens up to 9 * T0 (rungs at T0 and 3 * T0, eta 3)."""
TARGET = 4 * 9 * T0
"""The final length: FINAL_HORIZON times the trial length, as the search's pruner predicts."""


def fast(t: np.ndarray) -> np.ndarray:
    """Converges fast to a high loss (a small model)."""
    return 1.9 + 1.5 * (t / T0) ** -1.0


def slow(t: np.ndarray) -> np.ndarray:
    """Worse early, better late (a large model): crosses ``fast`` between 9e4 and 3.6e5 tokens."""
    return 1.3 + 2.5 * (t / T0) ** -0.5


def noisy(f, t: np.ndarray, seed: int) -> np.ndarray:
    return f(t) + np.random.default_rng(seed).normal(0.0, 0.005, len(t))


def test_the_crossing_is_where_the_test_says():
    t = np.array([3 * T0, 9 * T0, TARGET], dtype=float)
    assert fast(t)[0] < slow(t)[0] and fast(t)[1] < slow(t)[1] and fast(t)[2] > slow(t)[2] + 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("points", [3, 9])
def test_prediction_ranks_the_late_winner_first(seed, points):
    t = np.arange(1, points + 1, dtype=float) * T0
    yf, ys = noisy(fast, t, seed), noisy(slow, t, seed + 10)
    assert yf[-1] < ys[-1]  # the raw loss at the rung prefers the fast model
    pf, ps = predict(t, yf, TARGET), predict(t, ys, TARGET)
    assert ps.mean < pf.mean  # the prediction prefers the slow one
    for p, f in ((pf, fast), (ps, slow)):  # and is close to the truth, within its stated uncertainty
        truth = float(f(np.array([TARGET], dtype=float))[0])
        assert abs(p.mean - truth) < max(0.1, 3 * p.std)
        assert p.fitted and p.std > 0


def test_noise_free_power_law_is_recovered():
    t = np.geomspace(1e3, 1e5, 12)
    y = 0.7 + 1.5 * (t / 1e5) ** -0.3
    p = predict(t, y, 1e7)
    assert p.mean == pytest.approx(0.7 + 1.5 * 100**-0.3, abs=0.01)
    assert p.a == pytest.approx(0.7, abs=0.05) and p.c == pytest.approx(0.3, abs=0.03)


def test_few_points_fall_back_to_the_last_loss():
    one = predict([100], [3.0], 1e6)
    assert not one.fitted and one.mean == 3.0 and one.std > 0
    two = predict_curve({100: 3.0, 200: 2.5}, 1e6)
    assert not two.fitted and two.mean == 2.5 and two.std == pytest.approx(0.5)
    assert predict_curve({100: 3.0, 200: 2.5, 300: 2.0}, 1e6, up_to=200).mean == 2.5
    assert predict([], [], 10).mean == float("inf")


def test_a_rising_curve_is_predicted_flat_not_falling():
    t = np.arange(1, 8, dtype=float) * 100
    p = predict(t, 2.0 + 0.01 * np.arange(7), 1e5)
    assert p.mean >= 2.0


def _run(study: optuna.Study, curve: np.ndarray, steps: np.ndarray) -> str:
    trial = study.ask()
    for s, v in zip(steps, curve, strict=True):
        trial.report(float(v), step=int(s))
        if int(s) < steps[-1] and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return "pruned"
    study.tell(trial, float(curve[-1]))
    return "complete"


def _search(pruner: optuna.pruners.BasePruner) -> dict[str, str]:
    """Asynchronous order: the fast model finishes, two bad ones run, then the slow model."""
    steps = np.arange(1, 10) * T0
    study = optuna.create_study(pruner=pruner)
    out = {"fast": _run(study, noisy(fast, steps.astype(float), 0), steps)}
    for i in range(2):
        out[f"bad{i}"] = _run(study, 5.0 + 0.1 * i + 0.0 * steps, steps)
    out["slow"] = _run(study, noisy(slow, steps.astype(float), 3), steps)
    return out


def test_curve_pruner_keeps_the_late_winner_that_raw_halving_stops():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = _search(optuna.pruners.SuccessiveHalvingPruner(min_resource=T0, reduction_factor=3))
    assert raw["slow"] == "pruned"
    curve = _search(CurvePruner(T0, 9 * T0, 3, horizon=TARGET))
    assert curve["slow"] == "complete"
    assert curve["bad0"] == "pruned" and curve["bad1"] == "pruned"  # the cut still happens


def test_curve_pruner_stops_a_late_loser():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps = np.arange(1, 10) * T0
    study = optuna.create_study(pruner=CurvePruner(T0, 9 * T0, 3, horizon=TARGET))
    assert _run(study, noisy(slow, steps.astype(float), 0), steps) == "complete"
    _run(study, 6.0 + 0.0 * steps, steps)
    # worse early and worse late (the fast curve shifted up): stopped at the second rung by its prediction
    assert _run(study, noisy(fast, steps.astype(float), 1) + 0.3, steps) == "pruned"
