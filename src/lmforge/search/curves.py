"""Learning-curve extrapolation: a trial's validation loss at a longer training length, with an uncertainty.

The model is a saturating power law in trained tokens ``t``::

    L(t) = a + b * (t / t_ref) ** (-c)        a >= 0, b >= 0, c in [C_MIN, C_MAX]

``a`` is the loss the curve saturates at, ``b`` how far above it the curve is at ``t_ref`` (the last observed
length) and ``c`` how fast it approaches it. For a fixed ``c`` the model is linear in ``(a, b)``, so the fit
is exact least squares on a grid of ``c`` values (no iterative optimizer that may fail to converge).

The prediction is the best fit's (the grid's best ``c``, refined between its neighbours). Uncertainty:
the residual variance ``s2`` of the best fit (at least ``EVAL_NOISE**2``) sets a likelihood ``exp(-(SSE_c - SSE_min) / (2 s2))`` for every
``c`` of the grid (a flat prior over the grid); the variance of the prediction is the likelihood-weighted
spread of the grid's predictions around it plus the linear-regression variance of ``(a, b)`` at the best
``c``. With fewer than ``MIN_POINTS`` points nothing is fitted: the prediction is
the last loss, with the drop between the first and last point (or ``FLAT_STD``) as its uncertainty.

Used by the search (:mod:`lmforge.search.study`'s ``curve`` pruner decides which trials continue at a rung by
their predicted loss at ``FINAL_HORIZON`` times the trial length) and by the final step
(:mod:`lmforge.search.final` chooses the configuration with the lowest predicted loss at the length the final
training will reach), so a model that is worse early but better late is not discarded for converging slowly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

C_MIN, C_MAX, C_GRID = 0.05, 2.0, 80
"""The exponent grid of the fit (log-spaced)."""
MIN_POINTS = 3
"""Points needed for a fit (the model has three parameters)."""
FLAT_STD = 0.5
"""Uncertainty (nats) of a prediction from a single point."""
EVAL_NOISE = 0.01
"""Floor of the residual standard deviation (nats): a loss on a fixed sample of validation blocks is noisy by
about this much, and three points fit three parameters exactly."""
FINAL_HORIZON = 4.0
"""The search's pruner predicts each trial's loss at this many times the longest trial length: about the
length the final training reaches (the final step trains about a quarter of the budget, a trial about an
eighth of the search's three quarters, on top of its own tokens)."""


@dataclass(frozen=True)
class Prediction:
    """A predicted loss ``mean`` (nats) with standard deviation ``std`` at ``tokens``; ``fitted`` is False
    when there were too few points for the power law (the mean is then the last loss)."""

    tokens: float
    mean: float
    std: float
    fitted: bool
    a: float = math.nan
    b: float = math.nan
    c: float = math.nan


def _clean(tokens: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    order = np.argsort(t)
    return t[order], y[order]


def predict(tokens: Sequence[float], losses: Sequence[float], target: float) -> Prediction:
    """The loss of the curve ``(tokens, losses)`` extrapolated to ``target`` tokens (see the module doc)."""
    t, y = _clean(tokens, losses)
    if len(t) == 0:
        return Prediction(target, math.inf, math.inf, False)
    if len(t) < MIN_POINTS:
        std = abs(float(y[0] - y[-1])) if len(t) > 1 else FLAT_STD
        return Prediction(target, float(y[-1]), max(std, 1e-3), False)
    t_ref = float(t[-1])
    x = t / t_ref
    xt = float(target) / t_ref
    cs = np.exp(np.linspace(math.log(C_MIN), math.log(C_MAX), C_GRID))
    sse = np.empty(len(cs))
    preds = np.empty(len(cs))
    params = np.empty((len(cs), 2))
    for i, c in enumerate(cs):
        a, b = _fit_linear(x ** (-c), y)
        params[i] = (a, b)
        sse[i] = float(np.sum((a + b * x ** (-c) - y) ** 2))
        preds[i] = a + b * xt ** (-c)
    best = int(np.argmin(sse))
    # refine the best exponent between its grid neighbours (the grid is too coarse for a long extrapolation)
    lo, hi = cs[max(0, best - 1)], cs[min(len(cs) - 1, best + 1)]
    c_best, sse_best, pred_best, (a, b) = cs[best], sse[best], preds[best], params[best]
    for c in np.linspace(lo, hi, 41):
        ai, bi = _fit_linear(x ** (-c), y)
        e = float(np.sum((ai + bi * x ** (-c) - y) ** 2))
        if e < sse_best:
            c_best, sse_best, pred_best, (a, b) = c, e, ai + bi * xt ** (-c), (ai, bi)
    n = len(t)
    s2 = max(float(sse_best) / (n - 3) if n > 3 else 0.0, EVAL_NOISE**2)
    w = np.exp(-(sse - float(np.min(sse))) / (2.0 * s2))
    w /= w.sum()
    spread = float(np.sum(w * (preds - pred_best) ** 2))
    # the linear-regression variance of a + b * xt^-c at the best exponent
    phi = np.stack([np.ones(n), x ** (-c_best)], axis=1)
    try:
        cov = s2 * np.linalg.inv(phi.T @ phi)
        g = np.array([1.0, xt ** (-c_best)])
        lin = float(max(0.0, g @ cov @ g))
    except np.linalg.LinAlgError:
        lin = s2
    return Prediction(
        target, max(0.0, float(pred_best)), math.sqrt(spread + lin), True, float(a), float(b), float(c_best)
    )


def _fit_linear(phi: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``y ~ a + b * phi`` with ``a >= 0`` and ``b >= 0`` (a rising curve gets ``b = 0``)."""
    pm, ym = float(phi.mean()), float(y.mean())
    var = float(np.sum((phi - pm) ** 2))
    b = float(np.sum((phi - pm) * (y - ym)) / var) if var > 0 else 0.0
    b = max(0.0, b)
    a = ym - b * pm
    if a < 0:  # saturating at a negative loss: fit through a = 0
        a = 0.0
        b = max(0.0, float(np.sum(phi * y) / max(float(np.sum(phi * phi)), 1e-30)))
    return a, b


def predict_curve(curve: Mapping[int, float], target: float, up_to: float | None = None) -> Prediction:
    """:func:`predict` for ``{tokens: loss}`` (an Optuna trial's ``intermediate_values``), using only the
    points at or below ``up_to`` tokens when given (so trials are compared with the same information)."""
    items = sorted((int(k), float(v)) for k, v in curve.items() if up_to is None or k <= up_to)
    return predict([k for k, _ in items], [v for _, v in items], target)
