"""``build_report``: read the run, draw every figure (one broken figure never loses the others), and write
``DIR/report.html`` atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.report.figures import (
    FIGURES_DIR,
    fig_curves,
    fig_history,
    fig_importance,
    fig_lineage,
    fig_parallel,
    fig_pareto,
)
from lmforge.report.html import render_html
from lmforge.report.importance import importances
from lmforge.report.overhead import overhead
from lmforge.report.run import ReportError, load_run
from lmforge.report.sample import sample_text
from lmforge.report.table import leaderboard_table
from lmforge.report.task import build_task_report, is_task_run

REPORT_FILE = "report.html"
SAMPLE_TOKENS = 200


def build_report(
    run_dir: str | Path, *, sample: bool = True, sample_tokens: int = SAMPLE_TOKENS, seed: int = 0
) -> Path:
    """Write ``DIR/report.html`` (figures in ``DIR/figures/``) for the search run in ``run_dir`` and return
    its path. Works on a run that is still going or was interrupted: what is missing becomes a note."""
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    if is_task_run(root):  # lmforge tune --task: its own page
        return build_task_report(root)
    run = load_run(root)
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

    draw("Optimization history", "history.png", lambda p: fig_history(run, p))
    draw("Learning curves", "learning_curves.png", lambda p: fig_curves(run, p))
    try:
        imp, method = importances(run)
    except Exception as err:
        imp, method = {}, f"failed: {type(err).__name__}: {err}"
    draw(
        "Parameter importances",
        "importances.png",
        lambda p: fig_importance(run, p, imp, method),
        caption=f"method: {method}",
    )
    title = "Pareto front" if len(run.objectives) > 1 else "Loss against model size"
    draw(title, "pareto.png", lambda p: fig_pareto(run, p))
    draw("Parallel coordinates", "parallel_coordinates.png", lambda p: fig_parallel(run, p, list(imp)))
    if any(t.user_attrs.get("parent") is not None for t in run.trials):
        draw("Evolution lineage", "lineage.png", lambda p: fig_lineage(run, p))

    try:
        columns, table = leaderboard_table(run)
    except Exception as err:
        columns, table = [], []
        run.notes.append(f"leaderboard failed: {type(err).__name__}: {err}")
    if sample:
        try:
            text = sample_text(run, sample_tokens, seed)
        except Exception as err:  # a model that cannot be loaded or decoded: say so, keep the report
            text = (None, f"sampling failed: {type(err).__name__}: {err}")
    else:
        text = (None, "sampling skipped")
    try:
        ov = overhead(run)
    except Exception as err:  # the time table is an extra: the rest of the report stands without it
        ov = None
        run.notes.append(f"time table failed: {type(err).__name__}: {err}")
    out = root / REPORT_FILE
    atomic_write_text(out, render_html(run, figures, columns, table, text, ov))
    return out
