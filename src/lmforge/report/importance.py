"""Parameter importances of a search run for its first objective: fANOVA through Optuna when enough trials
finished (and scikit-learn is there), else the correlation ratio."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lmforge.report.run import ReportRun, load_run


def unified_study(run: ReportRun) -> tuple[Any, list[str]] | None:
    """An in-memory copy of the finished trials with one distribution per parameter (the union of the
    ranges: evolution children may widen them, and Optuna's importance needs identical ones), restricted
    to the parameters every finished trial has and that vary."""
    done = run.complete
    if len(done) < 2:
        return None
    names = sorted(set.intersection(*[set(t.params) for t in done]))
    dists: dict[str, Any] = {}
    for name in names:
        ds = [t.distributions[name] for t in done]
        if len({type(d) for d in ds}) != 1 or len({t.params[name] for t in done}) < 2:
            continue
        if isinstance(ds[0], CategoricalDistribution):
            choices: list[Any] = []
            for d in ds:
                choices += [c for c in d.choices if c not in choices]
            dists[name] = CategoricalDistribution(choices)
        elif len({d.log for d in ds}) == 1:
            low, high = min(d.low for d in ds), max(d.high for d in ds)
            if isinstance(ds[0], IntDistribution):
                dists[name] = IntDistribution(int(low), int(high), log=ds[0].log)
            else:
                dists[name] = FloatDistribution(float(low), float(high), log=ds[0].log)
    if not dists:
        return None
    copy = optuna.create_study(directions=run.study.directions)
    copy.add_trials(
        [
            optuna.trial.create_trial(params={n: t.params[n] for n in dists}, distributions=dists, values=t.values)
            for t in done
        ]
    )
    return copy, list(dists)


def correlation_ratio(study: Any, names: list[str]) -> dict[str, float]:
    """eta^2 of the first objective per parameter: the share of its variance explained by the parameter's
    value (categorical) or quartile bin (numeric, on a log scale for log distributions)."""
    trials = study.get_trials(deepcopy=False)
    y = np.array([t.values[0] for t in trials], dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    out = {}
    for name in names:
        dist = trials[0].distributions[name]
        raw = [t.params[name] for t in trials]
        if isinstance(dist, CategoricalDistribution):
            groups = [str(v) for v in raw]
        else:
            x = np.array(raw, dtype=float)
            x = np.log(x) if dist.log else x
            edges = np.unique(np.quantile(x, [0.25, 0.5, 0.75]))
            groups = [str(int(np.searchsorted(edges, v, side="right"))) for v in x]
        between = 0.0
        for g in set(groups):
            members = y[[i for i, gi in enumerate(groups) if gi == g]]
            between += len(members) * float((members.mean() - y.mean()) ** 2)
        out[name] = between / total if total > 0 else 0.0
    s = sum(out.values())
    return {k: v / s for k, v in sorted(out.items(), key=lambda kv: -kv[1])} if s > 0 else out


def param_importances(run_dir: str | Path) -> tuple[dict[str, float], str]:
    """(parameter -> importance for the first objective, method) of a run's finished trials; ``({}, why)``
    when they cannot be computed."""
    return importances(load_run(Path(run_dir).resolve()))


def importances(run: ReportRun) -> tuple[dict[str, float], str]:
    if run.study is None:
        return {}, "no study"
    unified = unified_study(run)
    if unified is None:
        return {}, f"needs at least 2 finished trials with varying parameters ({len(run.complete)} finished)"
    study, names = unified
    why = ""
    if len(study.trials) >= 4:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=names, target=lambda t: t.values[0]
            )
            if imp and all(math.isfinite(v) for v in imp.values()) and sum(imp.values()) > 0:
                return dict(imp), "fANOVA (Optuna)"
            why = "fANOVA gave no finite importances"
        except ImportError as err:
            why = f"fANOVA unavailable ({err})"
        except Exception as err:  # fANOVA on a handful of trials can fail in many ways
            why = f"fANOVA failed ({type(err).__name__}: {err})"
    else:
        why = f"fANOVA needs at least 4 finished trials, {len(study.trials)} so far"
    return correlation_ratio(study, names), f"correlation ratio (eta squared); {why}"
