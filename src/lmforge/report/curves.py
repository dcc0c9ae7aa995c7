"""The learning curves of a search run: validation loss against trained tokens, read from each trial's
``metrics.jsonl`` (the folds of a cross-validated trial, ``DIR/final`` for the final training). An
evolution child's curve continues its parent's token count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.report.run import ReportRun
from lmforge.runs import read_metrics


def curve_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` that carry a finite validation loss (the run may be writing)."""
    return [
        rec
        for rec in read_metrics(run_dir, lenient=True)
        if isinstance(rec.get("tokens"), (int, float))
        and isinstance(rec.get("val_loss"), (int, float))
        and math.isfinite(rec["val_loss"])
    ]


def curve_dirs(trial_dir: Path) -> list[Path]:
    folds = sorted(p for p in trial_dir.glob("fold-*") if p.is_dir())
    return folds or [trial_dir]


@dataclass
class Curve:
    label: str
    tokens: list[float]
    loss: list[float]
    state: str
    trial: int | None = None
    start: tuple[float, float] | None = None
    """Where an evolution child's weights came from: (tokens, loss) of its parent's best checkpoint."""


def trial_curves(run: ReportRun) -> list[Curve]:
    curves: list[Curve] = []
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
        for sub in curve_dirs(d):
            recs = curve_records(sub)
            if recs:
                curves.append(
                    Curve(
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
            for sub in curve_dirs(d):
                recs = curve_records(sub)
                if recs:
                    curves.append(Curve(d.name, [r["tokens"] for r in recs], [r["val_loss"] for r in recs], "unknown"))
    final = curve_records(run.run_dir / "final")
    if final:
        offset = 0.0
        plan = ((run.state or {}).get("steps", {}).get("final") or {}).get("plan") or {}
        src = next((t for t in run.trials if t.number == plan.get("trial")), None)
        if src is not None and plan.get("from"):
            offset = float(src.user_attrs.get("tokens_offset") or 0)
        curves.append(
            Curve("final training", [offset + r["tokens"] for r in final], [r["val_loss"] for r in final], "final")
        )
    return curves
