"""The README's grid-search-with-cross-validation line runs as printed (with the default space, which now
carries a default grid), on a tiny corpus and budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support.search import BASE, write_docs

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_flags() -> list[str]:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"Grid search with cross-validation: `(--sampler grid[^`]*)`", text)
    assert m, "the README no longer shows the grid / CV line"
    return m.group(1).split()


@pytest.mark.slow
def test_readme_grid_cv_line_runs_as_printed(tmp_path, monkeypatch):
    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    flags = _readme_flags()
    assert flags == ["--sampler", "grid", "--cv", "5", "--n-jobs", "2"]
    docs = write_docs(tmp_path / "docs.jsonl", n=200)
    out = tmp_path / "run"
    # the README's command: lmforge tune --data PATH --out DIR --budget ..., plus the grid / CV flags;
    # tiny models (fixed on the command line: they leave the space) and trials of 8 steps keep it short
    argv = ["tune", "--data", str(docs), "--out", str(out), "--budget", "200ktok", *flags, "--trial-tokens", "512"]
    assert main([*argv, *BASE]) == 0
    state = json.loads((out / "pipeline.json").read_text())
    assert all(state["steps"][s]["status"] in ("done", "skipped") for s in state["steps"])
    assert "grid search over 4 configurations" in state["notes"]  # one per family: the default grid
    folds = sorted(p.name for p in (out / "trials" / "0000").glob("fold-*"))
    assert folds == [f"fold-{i}" for i in range(5)]
    cv = json.loads((out / "trials" / "0000" / "cv.json").read_text())
    assert len(cv["fold_losses"]) == 5
    assert (out / "best" / "COMPLETE").is_file()
