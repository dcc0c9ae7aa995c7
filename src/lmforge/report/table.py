"""The report's leaderboard: the search's trial table (with the lineage of evolution children and every
objective), or ``DIR/leaderboard.csv`` when the study cannot be read."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lmforge.report.run import ReportRun
from lmforge.search.leaderboard import rows


def leaderboard_table(run: ReportRun) -> tuple[list[str], list[dict[str, Any]]]:
    if run.study is None:
        return csv_table(run.run_dir / "leaderboard.csv")
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


def csv_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        table = list(reader)
        return list(reader.fieldnames or []), table
