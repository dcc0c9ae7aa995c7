"""The report's figures, drawn with matplotlib's object API (``Figure`` + Agg canvas: no pyplot, no global
backend) into PNG files. Each ``fig_*`` draws one figure and returns None, or a one-line note saying why it
cannot be drawn yet. matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import CategoricalDistribution

from lmforge.atomic import atomic_write
from lmforge.report.curves import trial_curves
from lmforge.report.run import ReportRun

FIGURES_DIR = "figures"
MAX_PARALLEL_PARAMS = 12


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


def fig_history(run: ReportRun, path: Path) -> str | None:
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


def fig_curves(run: ReportRun, path: Path) -> str | None:
    curves = trial_curves(run)
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


def fig_importance(run: ReportRun, path: Path, imp: dict[str, float], method: str) -> str | None:
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


def _category_axis(pos: dict[str, float]) -> Callable[[Any], float]:
    """Position of a categorical value on a parallel-coordinates axis."""
    return lambda v: pos[repr(v)]


def _scaled_axis(tf: Callable[[Any], float], lo: float, span: float) -> Callable[[Any], float]:
    """Position of a numeric value on a parallel-coordinates axis: ``tf`` (identity or log10) scaled to 0..1."""
    return lambda v: (tf(v) - lo) / span


def front(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Non-dominated points (both coordinates minimized), sorted by the first."""
    out: list[tuple[float, float, int]] = []
    best_y = math.inf
    for x, y, n in sorted(points):
        if y < best_y:
            out.append((x, y, n))
            best_y = y
    return out


def fig_pareto(run: ReportRun, path: Path) -> str | None:
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
    size_front = front(pts)
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=20, color="0.6", label="finished trials")
    ax.plot([p[0] for p in size_front], [p[1] for p in size_front], "o-", color="tab:red", label="non-dominated")
    for x, y, n in size_front:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(run.objectives[0])
    ax.set_title("Loss against model size (not an objective of this search)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def fig_parallel(run: ReportRun, path: Path, order: list[str]) -> str | None:
    from matplotlib import colormaps  # matplotlib loads only when a report is drawn
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
            axes_pos.append((n, _category_axis(pos), [(p, c.strip("'")) for c, p in pos.items()]))
            continue
        log = bool(getattr(dist, "log", False)) and min(vals) > 0
        tf: Callable[[Any], float] = math.log10 if log else float
        lo, hi = min(tf(v) for v in vals), max(tf(v) for v in vals)
        span = hi - lo or 1.0
        ticks = [(0.0, f"{min(vals):.3g}"), (1.0, f"{max(vals):.3g}")]
        axes_pos.append((n, _scaled_axis(tf, lo, span), ticks))
    ys = [t.values[0] for t in done]
    lo, hi = min(ys), max(ys)
    axes_pos.append(
        (
            run.objectives[0],
            _scaled_axis(float, lo, (hi - lo) or 1.0),
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
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=run.objectives[0])
    _save(fig, path)
    return None


def fig_lineage(run: ReportRun, path: Path) -> str | None:
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
