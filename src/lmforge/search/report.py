"""The HTML report of a search run: ``DIR/report.html`` with PNG figures in ``DIR/figures/``.

:func:`build_report` reads what the run left, and copes with a run that is still going or was killed:

- the study, from the storage and name recorded in ``DIR/pipeline.json`` (or ``DIR/study.journal``);
- each trial's learning curve, ``metrics.jsonl`` in its run directory (``DIR/trials/NNNN``; the folds of a
  cross-validated trial; ``DIR/final`` for the final training);
- ``DIR/summary.json`` (test loss and the rest of the evaluation) when the pipeline got that far;
- the best model (``DIR/best``, else the best trial's ``best/``) for a seeded text sample.

Figures: the optimization history (objective per trial and the best so far), the learning curves of all
trials on one plot (validation loss against trained tokens; an evolution child's curve continues its
parent's), parameter importances (fANOVA through Optuna when scikit-learn is there and enough trials
finished, else the correlation ratio), the Pareto front (several objectives; with one, loss against model
size), parallel coordinates and, for ``--strategy evolution``, the lineage of the children. A figure that
cannot be drawn yet is replaced by a one-line note; nothing in the report stops the others.

Figures are drawn with matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global backend.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write, atomic_write_text
from lmforge.config import LmforgeError
from lmforge.runs import read_metrics

__all__ = ["REPORT_FILE", "ReportError", "build_report", "param_importances"]

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
MAX_PARALLEL_PARAMS = 12
SAMPLE_TOKENS = 200


class ReportError(LmforgeError):
    """The report cannot be built (no such run directory...)."""


# ------------------------------------------------------------------------------------------ run data
@dataclass
class _Run:
    run_dir: Path
    state: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    study: Any = None
    ctx: Any = None
    trials: list[Any] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: ["val_loss"])
    notes: list[str] = field(default_factory=list)
    steps: dict[str, Any] = field(default_factory=dict)
    """Pipeline step -> status, from ``pipeline.json`` or the newer ``summary.json``."""

    @property
    def complete(self) -> list[Any]:
        from optuna.trial import TrialState

        return [
            t
            for t in self.trials
            if t.state == TrialState.COMPLETE and t.values and all(math.isfinite(v) for v in t.values)
        ]

    def best(self) -> Any:
        done = self.complete
        return min(done, key=lambda t: (t.values[0], t.number)) if done else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _load_run(run_dir: Path) -> _Run:
    run = _Run(
        run_dir=run_dir, state=_read_json(run_dir / "pipeline.json"), summary=_read_json(run_dir / "summary.json")
    )
    run.steps = {k: (v or {}).get("status") for k, v in ((run.state or {}).get("steps") or {}).items()}
    if isinstance((run.summary or {}).get("steps"), dict) and (
        not run.steps or _mtime(run_dir / "summary.json") >= _mtime(run_dir / "pipeline.json")
    ):  # the pipeline writes the summary (and builds this report) just before it saves its state
        run.steps = dict(run.summary["steps"])
    url = (run.state or {}).get("storage")
    name = (run.state or {}).get("study_name")
    if url is None and (run_dir / "study.journal").is_file():
        url = str(run_dir / "study.journal")
    if url is None:
        run.notes.append(
            "no study found (neither pipeline.json nor study.journal): figures from trial directories only"
        )
        return run
    if "://" not in url and not Path(url).is_file():
        run.notes.append(f"the study storage {url} does not exist (yet)")
        return run
    try:
        import optuna

        from lmforge.search.study import open_storage, quiet_optuna

        quiet_optuna()
        storage = open_storage(url)
        if name is None:
            names = optuna.get_all_study_names(storage)
            if len(names) != 1:
                run.notes.append(f"{url} holds {len(names)} studies and no pipeline.json names one")
                return run
            name = names[0]
        run.study = optuna.load_study(study_name=name, storage=storage)
        run.trials = run.study.get_trials(deepcopy=False)
    except Exception as err:  # a storage that cannot be read must not stop the report
        run.notes.append(f"cannot read the study {name!r} in {url}: {type(err).__name__}: {err}")
        return run
    raw_ctx = run.study.user_attrs.get("lmforge")
    if raw_ctx:
        from lmforge.search.objective import SearchContext

        try:
            run.ctx = SearchContext.from_dict(raw_ctx)
            run.objectives = list(run.ctx.objectives)
        except Exception:  # an older or foreign context: the report still works without it
            run.ctx = None
    n_obj = len(run.study.directions)
    if len(run.objectives) != n_obj:
        run.objectives = ["val_loss", *[f"objective {i}" for i in range(1, n_obj)]][:n_obj]
    return run


# ------------------------------------------------------------------------------------------- curves
def _curve_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` that carry a finite validation loss (the run may be writing)."""
    return [
        rec
        for rec in read_metrics(run_dir, lenient=True)
        if isinstance(rec.get("tokens"), (int, float))
        and isinstance(rec.get("val_loss"), (int, float))
        and math.isfinite(rec["val_loss"])
    ]


def _curve_dirs(trial_dir: Path) -> list[Path]:
    folds = sorted(p for p in trial_dir.glob("fold-*") if p.is_dir())
    return folds or [trial_dir]


@dataclass
class _Curve:
    label: str
    tokens: list[float]
    loss: list[float]
    state: str
    trial: int | None = None
    start: tuple[float, float] | None = None
    """Where an evolution child's weights came from: (tokens, loss) of its parent's best checkpoint."""


def _curves(run: _Run) -> list[_Curve]:
    curves: list[_Curve] = []
    seen: set[Path] = set()
    values = {t.number: t.values[0] for t in run.complete}
    for t in sorted(run.trials, key=lambda t: t.number):
        rel = t.user_attrs.get("run_dir")
        if not rel:
            continue
        d = (run.run_dir / rel).resolve()
        if d in seen:  # retries share their first trial's directory: one curve
            continue
        seen.add(d)
        offset = float(t.user_attrs.get("tokens_offset") or 0)
        parent = values.get(t.user_attrs.get("parent"))
        for sub in _curve_dirs(d):
            recs = _curve_records(sub)
            if recs:
                curves.append(
                    _Curve(
                        f"trial {t.number}",
                        [offset + r["tokens"] for r in recs],
                        [r["val_loss"] for r in recs],
                        t.state.name.lower(),
                        t.number,
                        (offset, parent) if parent is not None else None,
                    )
                )
    trials_root = run.run_dir / "trials"
    if trials_root.is_dir():  # trial directories the study does not know (no study, or another storage)
        for d in sorted(p for p in trials_root.iterdir() if p.is_dir() and p.resolve() not in seen):
            for sub in _curve_dirs(d):
                recs = _curve_records(sub)
                if recs:
                    curves.append(_Curve(d.name, [r["tokens"] for r in recs], [r["val_loss"] for r in recs], "unknown"))
    final = _curve_records(run.run_dir / "final")
    if final:
        offset = 0.0
        plan = ((run.state or {}).get("steps", {}).get("final") or {}).get("plan") or {}
        src = next((t for t in run.trials if t.number == plan.get("trial")), None)
        if src is not None and plan.get("from"):
            offset = float(src.user_attrs.get("tokens_offset") or 0)
        curves.append(
            _Curve("final training", [offset + r["tokens"] for r in final], [r["val_loss"] for r in final], "final")
        )
    return curves


# ---------------------------------------------------------------------------------------- importance
def _unified_study(run: _Run) -> tuple[Any, list[str]] | None:
    """An in-memory copy of the finished trials with one distribution per parameter (the union of the
    ranges: evolution children may widen them, and Optuna's importance needs identical ones), restricted
    to the parameters every finished trial has and that vary."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

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


def _correlation_ratio(study: Any, names: list[str]) -> dict[str, float]:
    """eta^2 of the first objective per parameter: the share of its variance explained by the parameter's
    value (categorical) or quartile bin (numeric, on a log scale for log distributions)."""
    import numpy as np
    from optuna.distributions import CategoricalDistribution

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
    return _importances(_load_run(Path(run_dir).resolve()))


def _importances(run: _Run) -> tuple[dict[str, float], str]:
    if run.study is None:
        return {}, "no study"
    unified = _unified_study(run)
    if unified is None:
        return {}, f"needs at least 2 finished trials with varying parameters ({len(run.complete)} finished)"
    study, names = unified
    why = ""
    if len(study.trials) >= 4:
        try:
            import optuna

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
    return _correlation_ratio(study, names), f"correlation ratio (eta squared); {why}"


# ------------------------------------------------------------------------------------------ figures
def _figure(width: float = 7.5, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"), durable=False)


def _last_value(t: Any) -> float | None:
    if t.values:
        return float(t.values[0])
    if t.intermediate_values:
        return float(t.intermediate_values[max(t.intermediate_values)])
    v = t.user_attrs.get("val_loss")
    return float(v) if isinstance(v, (int, float)) else None


_STATE_STYLE = {
    "complete": dict(color="tab:blue", marker="o"),
    "pruned": dict(color="0.6", marker="x"),
    "running": dict(color="tab:green", marker="^"),
    "fail": dict(color="tab:red", marker="v"),
}


def _fig_history(run: _Run, path: Path) -> str | None:
    points = [(t.number, _last_value(t), t.state.name.lower()) for t in run.trials]
    points = [(n, v, s) for n, v, s in points if v is not None and math.isfinite(v)]
    if not points:
        return "no trial has reported a value yet"
    fig = _figure()
    ax = fig.add_subplot()
    for state, style in _STATE_STYLE.items():
        xs = [n for n, _, s in points if s == state]
        ys = [v for _, v, s in points if s == state]
        if xs:
            label = {"pruned": "pruned / stopped (last report)", "running": "running (last report)"}.get(state, state)
            ax.scatter(xs, ys, s=22, label=label, alpha=0.85, **style)
    done = sorted((t.number, t.values[0]) for t in run.complete)
    if done:
        xs, best, cur = [], [], math.inf
        for n, v in done:
            cur = min(cur, v)
            xs.append(n)
            best.append(cur)
        ax.step(xs, best, where="post", color="tab:orange", lw=2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(run.objectives[0])
    ax.set_title("Optimization history")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def _fig_curves(run: _Run, path: Path) -> str | None:
    curves = _curves(run)
    if not curves:
        return "no learning curve yet (no metrics.jsonl with a validation loss)"
    best = run.best()
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    colors = {
        "complete": "tab:blue",
        "pruned": "0.65",
        "fail": "tab:red",
        "running": "tab:green",
        "unknown": "tab:blue",
    }
    labelled: set[str] = set()
    for c in curves:
        if c.start is not None:  # dotted: from the parent's checkpoint to the child's first evaluation
            ax.plot([c.start[0], c.tokens[0]], [c.start[1], c.loss[0]], ls=":", lw=0.8, color="0.5")
        if c.state == "final":
            ax.plot(c.tokens, c.loss, color="black", lw=2.2, label="final training", zorder=5)
            continue
        if best is not None and c.trial == best.number:
            ax.plot(c.tokens, c.loss, color="tab:orange", lw=2.2, marker=".", label=f"best: {c.label}", zorder=4)
            continue
        label = c.state if c.state not in labelled else None
        labelled.add(c.state)
        ax.plot(
            c.tokens,
            c.loss,
            color=colors.get(c.state, "tab:blue"),
            lw=1,
            alpha=0.6,
            marker=".",
            ms=3,
            label=label,
            ls="--" if c.state == "fail" else "-",
        )
    if min(min(c.tokens) for c in curves) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("trained tokens (an evolution child continues its parent's count)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Learning curves ({len(curves)} runs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    return None


def _fig_importance(run: _Run, path: Path, imp: dict[str, float], method: str) -> str | None:
    if not imp:
        return f"not computed: {method}"
    items = list(imp.items())[::-1]  # the most important on top
    fig = _figure(7, max(2.2, 0.45 * len(items) + 1.2))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel(f"importance for {run.objectives[0]}")
    ax.set_title(f"Parameter importances: {method.split(';')[0]}")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return None


def _front(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Non-dominated points (both coordinates minimized), sorted by the first."""
    out: list[tuple[float, float, int]] = []
    best_y = math.inf
    for x, y, n in sorted(points):
        if y < best_y:
            out.append((x, y, n))
            best_y = y
    return out


def _fig_pareto(run: _Run, path: Path) -> str | None:
    done = run.complete
    if len(run.objectives) > 1:
        if not done:
            return "Pareto front: no finished trial yet"
        front_ids = {t.number for t in run.study.best_trials}
        pairs = [(0, k) for k in range(1, len(run.objectives))]
        fig = _figure(5.5 * len(pairs), 4.5)
        for i, (a, b) in enumerate(pairs, start=1):
            ax = fig.add_subplot(1, len(pairs), i)
            ax.scatter([t.values[b] for t in done], [t.values[a] for t in done], s=20, color="0.6", label="trials")
            fr = sorted((t.values[b], t.values[a]) for t in done if t.number in front_ids)
            ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", color="tab:red", label="Pareto front")
            ax.set_xlabel(run.objectives[b])
            ax.set_ylabel(run.objectives[a])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Pareto front")
        _save(fig, path)
        return None
    pts = [
        (float(t.user_attrs["params"]), t.values[0], t.number)
        for t in done
        if isinstance(t.user_attrs.get("params"), (int, float))
    ]
    if len(pts) < 2:
        return "loss against size: needs at least 2 finished trials with a parameter count"
    fr = _front(pts)
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=20, color="0.6", label="finished trials")
    ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", color="tab:red", label="non-dominated")
    for x, y, n in fr:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(run.objectives[0])
    ax.set_title("Loss against model size (not an objective of this search)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def _fig_parallel(run: _Run, path: Path, order: list[str]) -> str | None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from optuna.distributions import CategoricalDistribution

    done = run.complete
    if len(done) < 2:
        return "parallel coordinates: needs at least 2 finished trials"
    names = [n for n in order if any(n in t.params for t in done)]
    names += sorted({n for t in done for n in t.params} - set(names))
    names = [n for n in names if len({repr(t.params.get(n)) for t in done}) > 1][:MAX_PARALLEL_PARAMS]
    if not names:
        return "parallel coordinates: no parameter varies among the finished trials"
    axes_pos: list[tuple[str, Callable[[Any], float], list[tuple[float, str]]]] = []
    for n in names:
        vals = [t.params[n] for t in done if n in t.params]
        dist = next(t.distributions[n] for t in done if n in t.params)
        if isinstance(dist, CategoricalDistribution) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
        ):
            cats = sorted({repr(v) for v in vals})
            pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
            axes_pos.append((n, lambda v, pos=pos: pos[repr(v)], [(p, c.strip("'")) for c, p in pos.items()]))
            continue
        log = bool(getattr(dist, "log", False)) and min(vals) > 0
        tf = (lambda v: math.log10(v)) if log else float
        lo, hi = min(tf(v) for v in vals), max(tf(v) for v in vals)
        span = hi - lo or 1.0
        ticks = [(0.0, f"{min(vals):.3g}"), (1.0, f"{max(vals):.3g}")]
        axes_pos.append((n, lambda v, tf=tf, lo=lo, span=span: (tf(v) - lo) / span, ticks))
    ys = [t.values[0] for t in done]
    lo, hi = min(ys), max(ys)
    axes_pos.append(
        (
            run.objectives[0],
            lambda v, lo=lo, hi=hi: (v - lo) / ((hi - lo) or 1.0),
            [(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")],
        )
    )
    fig = _figure(max(6.0, 1.3 * len(axes_pos)), 4.8)
    ax = fig.add_subplot()
    cmap = colormaps["viridis_r"]
    norm = Normalize(lo, hi if hi > lo else lo + 1)
    x = np.arange(len(axes_pos))
    for t in sorted(done, key=lambda t: -t.values[0]):  # the best drawn last, on top
        row = []
        for n, f, _ in axes_pos[:-1]:
            row.append(f(t.params[n]) if n in t.params else np.nan)
        row.append(axes_pos[-1][1](t.values[0]))
        ax.plot(x, row, color=cmap(norm(t.values[0])), alpha=0.75, lw=1.2)
    for i, (_, _, ticks) in enumerate(axes_pos):
        ax.axvline(i, color="0.3", lw=0.8)
        for p, text in ticks:
            ax.annotate(text, (i, p), textcoords="offset points", xytext=(3, 0), fontsize=7, va="center")
    ax.set_xticks(x, [n for n, _, _ in axes_pos], rotation=30, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Parallel coordinates (colour: objective, yellow = best)")
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=run.objectives[0])
    _save(fig, path)
    return None


def _fig_lineage(run: _Run, path: Path) -> str | None:
    children = [t for t in run.trials if t.user_attrs.get("parent") is not None]
    if not children:
        return None
    value = {t.number: _last_value(t) for t in run.trials}
    fig = _figure(8, 4.8)
    ax = fig.add_subplot()
    ops = sorted({str(t.user_attrs.get("mutation", "?")).split("(")[0] for t in children})
    cmap = {op: f"C{i}" for i, op in enumerate(ops)}
    labelled: set[str] = set()
    for t in children:
        p = int(t.user_attrs["parent"])
        if value.get(p) is None or value.get(t.number) is None:
            continue
        op = str(t.user_attrs.get("mutation", "?")).split("(")[0]
        ax.annotate(
            "",
            xy=(t.number, value[t.number]),
            xytext=(p, value[p]),
            arrowprops=dict(arrowstyle="->", color=cmap[op], alpha=0.7),
        )
        ax.scatter([t.number], [value[t.number]], color=cmap[op], s=18, label=op if op not in labelled else None)
        labelled.add(op)
    roots = [t for t in run.trials if t.user_attrs.get("parent") is None and value.get(t.number) is not None]
    ax.scatter(
        [t.number for t in roots],
        [value[t.number] for t in roots],
        color="black",
        marker="s",
        s=18,
        label="initial population",
    )
    ax.set_xlabel("trial (birth order)")
    ax.set_ylabel(run.objectives[0])
    ax.set_title("Evolution: parent -> child, coloured by mutation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


# -------------------------------------------------------------------------------------- leaderboard
def _table(run: _Run) -> tuple[list[str], list[dict[str, Any]]]:
    if run.study is None:
        return _csv_table(run.run_dir / "leaderboard.csv")
    from lmforge.search.leaderboard import rows

    table = rows(run.study, run.objectives, run.ctx.fid if run.ctx is not None else None)
    by_number = {t.number: t for t in run.trials}
    for r in table:
        t = by_number.get(r["trial"])
        if t is not None and t.user_attrs.get("parent") is not None:
            r["origin"] = f"{t.user_attrs.get('mutation', '?')} of {t.user_attrs['parent']}"
        if t is not None and len(run.objectives) > 1 and t.values:
            for name, v in zip(run.objectives[1:], t.values[1:], strict=False):
                r[name] = round(float(v), 6)
    first = ["rank", "trial", "state", "val_loss", *run.objectives[1:], "params", "tokens", "family"]
    if len(run.objectives) > 1:
        first.insert(3, "pareto")
    params = sorted({k for t in run.trials for k in t.params})
    cols = [c for c in first if any(c in r for r in table)] + params
    cols += [c for c in ("origin", "note") if any(r.get(c) for r in table)]
    return list(dict.fromkeys(cols)), table


def _csv_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import csv

    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        table = list(reader)
        return list(reader.fieldnames or []), table


# ------------------------------------------------------------------------------------------- sample
def _model_dir(run: _Run) -> Path | None:
    if (run.run_dir / "best" / "COMPLETE").is_file():
        return run.run_dir / "best"
    for t in sorted(run.complete, key=lambda t: t.values[0]):
        rel = t.user_attrs.get("run_dir")
        for d in [run.run_dir / rel / "best", run.run_dir / rel / "fold-0" / "best"] if rel else []:
            if (d / "COMPLETE").is_file():
                return d
    return None


def _sample(run: _Run, max_new_tokens: int, seed: int) -> tuple[str | None, str]:
    """(generated text, where it came from / why there is none)."""
    model_dir = _model_dir(run)
    if model_dir is None:
        return None, "no trained model yet (no best checkpoint)"
    import torch

    from lmforge.predict import GenerationConfig, generate_text
    from lmforge.runs import load_model

    model, tokenizer, _ = load_model(model_dir, map_location="cpu")
    n = max_new_tokens
    if getattr(model, "max_seq_len", None):
        n = max(1, min(n, model.max_seq_len - 1))
    gen = GenerationConfig(max_new_tokens=n, do_sample=True, temperature=0.8, top_k=50, seed=seed, eos_token_id=[])
    with torch.inference_mode():
        text = generate_text(model, tokenizer, [tokenizer.eot_token], gen)[0][0]
    rel = model_dir.relative_to(run.run_dir) if model_dir.is_relative_to(run.run_dir) else model_dir
    return text, (
        f"{rel}: {n} tokens sampled after the end-of-text token (temperature 0.8, top-k 50, "
        f"seed {seed}; end-of-text tokens kept)"
    )


# --------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.82em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4;position:sticky;top:0}tr.best td{background:#fff3d6}tr.pareto td{font-weight:600}
.note{color:#777;font-style:italic}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f8f8f8;padding:1em;white-space:pre-wrap;border:1px solid #eee}
.kv td{text-align:left}.scroll{overflow:auto;max-height:640px}
"""


def _esc(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return html.escape(f"{v:.6g}")
    return html.escape(str(v))


def _overview(run: _Run) -> list[tuple[str, Any]]:
    from collections import Counter

    items: list[tuple[str, Any]] = [("run directory", run.run_dir)]
    if run.study is not None:
        storage = (run.state or {}).get("storage") or str(run.run_dir / "study.journal")
        items.append(("study", f"{run.study.study_name} in {storage}"))
        counts = Counter(t.state.name.lower() for t in run.trials)
        items.append(("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"))
        items.append(("objectives", ", ".join(run.objectives)))
    if run.ctx is not None:
        items.append(("sampler / pruner", f"{run.ctx.sampler} / {run.ctx.pruner}"))
    if run.steps:
        items.append(("pipeline steps", ", ".join(f"{k}: {v}" for k, v in run.steps.items())))
    if run.state is not None:
        if (run.state.get("options") or {}).get("strategy"):
            items.append(("strategy", run.state["options"]["strategy"]))
    best = run.best()
    if best is not None:
        items.append(
            (
                "best trial",
                f"{best.number}: {run.objectives[0]} = {best.values[0]:.5g}"
                + (
                    f", {best.user_attrs['params']:,} parameters"
                    if isinstance(best.user_attrs.get("params"), int)
                    else ""
                ),
            )
        )
        items.append(("best parameters", ", ".join(f"{k}={_fmt_param(v)}" for k, v in best.params.items())))
    ev = (run.summary or {}).get("best") or {}
    for key in ("test_loss", "test_ppl", "val_loss", "latency_ms_per_token"):
        if isinstance(ev.get(key), (int, float)):
            items.append((f"final model {key}", f"{ev[key]:.5g}"))
    return items


def _fmt_param(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _html(
    run: _Run,
    figures: list[tuple[str, str | None, str | None]],
    columns: list[str],
    table: list[dict[str, Any]],
    sample: tuple[str | None, str],
) -> str:
    best = run.best()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lmforge report: {_esc(run.run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lmforge search report: {_esc(run.run_dir.name)}</h1>",
        f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with "
        f"<code>lmforge report {_esc(run.run_dir)}</code></p>",
        "<h2>Overview</h2><table class='kv'>",
    ]
    parts += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _overview(run)]
    parts.append("</table>")
    parts += [f"<p class='note'>{_esc(n)}</p>" for n in run.notes]
    parts.append("<h2>Figures</h2>")
    for title, file, note in figures:
        parts.append(f"<h3>{_esc(title)}</h3>")
        if file:
            parts.append(f"<img src='{FIGURES_DIR}/{_esc(file)}' alt='{_esc(title)}'>")
        if note:
            parts.append(f"<p class='note'>{_esc(note)}</p>")
    parts.append(f"<h2>Leaderboard ({len(table)} trials)</h2>")
    if table:
        parts.append("<div class='scroll'><table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>")
        for r in table:
            cls = []
            if best is not None and str(r.get("trial")) == str(best.number):
                cls.append("best")
            if r.get("pareto") in (True, "True"):
                cls.append("pareto")
            attr = f" class='{' '.join(cls)}'" if cls else ""
            parts.append(f"<tr{attr}>" + "".join(f"<td>{_esc(r.get(c))}</td>" for c in columns) + "</tr>")
        parts.append("</table></div>")
    else:
        parts.append("<p class='note'>no trials yet</p>")
    text, where = sample
    parts.append("<h2>Sample from the best model</h2>")
    parts.append(f"<p class='note'>{_esc(where)}</p>")
    if text is not None:
        parts.append(f"<pre>{_esc(text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------- entry
def build_report(
    run_dir: str | Path, *, sample: bool = True, sample_tokens: int = SAMPLE_TOKENS, seed: int = 0
) -> Path:
    """Write ``DIR/report.html`` (figures in ``DIR/figures/``) for the search run in ``run_dir`` and return
    its path. Works on a run that is still going or was interrupted: what is missing becomes a note."""
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    run = _load_run(root)
    fig_dir = root / FIGURES_DIR
    fig_dir.mkdir(exist_ok=True)

    figures: list[tuple[str, str | None, str | None]] = []

    def draw(title: str, file: str, fn: Callable[[Path], str | None], caption: str | None = None) -> None:
        path = fig_dir / file
        path.unlink(missing_ok=True)  # a stale figure of an earlier report would contradict a note
        try:
            note = fn(path)
        except Exception as err:  # one broken figure must not lose the rest of the report
            note = f"could not draw: {type(err).__name__}: {err}"
        drawn = note is None and path.is_file()
        figures.append((title, file if drawn else None, caption if drawn else note))

    draw("Optimization history", "history.png", lambda p: _fig_history(run, p))
    draw("Learning curves", "learning_curves.png", lambda p: _fig_curves(run, p))
    try:
        imp, method = _importances(run)
    except Exception as err:
        imp, method = {}, f"failed: {type(err).__name__}: {err}"
    draw(
        "Parameter importances",
        "importances.png",
        lambda p: _fig_importance(run, p, imp, method),
        caption=f"method: {method}",
    )
    title = "Pareto front" if len(run.objectives) > 1 else "Loss against model size"
    draw(title, "pareto.png", lambda p: _fig_pareto(run, p))
    draw("Parallel coordinates", "parallel_coordinates.png", lambda p: _fig_parallel(run, p, list(imp)))
    if any(t.user_attrs.get("parent") is not None for t in run.trials):
        draw("Evolution lineage", "lineage.png", lambda p: _fig_lineage(run, p))

    try:
        columns, table = _table(run)
    except Exception as err:
        columns, table = [], []
        run.notes.append(f"leaderboard failed: {type(err).__name__}: {err}")
    if sample:
        try:
            text = _sample(run, sample_tokens, seed)
        except Exception as err:  # a model that cannot be loaded or decoded: say so, keep the report
            text = (None, f"sampling failed: {type(err).__name__}: {err}")
    else:
        text = (None, "sampling skipped")
    out = root / REPORT_FILE
    atomic_write_text(out, _html(run, figures, columns, table, text))
    return out
