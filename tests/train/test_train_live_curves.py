"""LiveCurves: every evaluation of a run, at step = trained tokens, in TensorBoard event files that
TensorBoard's own reader returns equal to the run's metrics.jsonl."""

from __future__ import annotations

import pytest

from lmforge.config import apply_overrides, build_config
from lmforge.runs import read_metrics
from lmforge.search.options import TuneOptions
from lmforge.search.study import SearchError
from lmforge.train.callbacks import LiveCurves
from lmforge.train.loop import train
from support.search import BASE, write_docs


def test_tensorboard_curves_match_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    docs = write_docs(tmp_path / "docs.jsonl")
    raw = apply_overrides({}, ["--data.path", str(docs), *BASE, "--model.family", "gru", "--train.max_steps", "9",
                               "--train.eval_interval", "3", "--train.progress", "false"])  # fmt: skip
    train(build_config(raw), tmp_path / "run", callbacks=[LiveCurves(["tensorboard"], tmp_path / "tb", "trial-0")],
          verbose=False)  # fmt: skip
    acc = EventAccumulator(str(tmp_path / "tb" / "trial-0"))
    acc.Reload()
    recs = read_metrics(tmp_path / "run")
    for key in ("val_loss", "train_loss", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["tokens"] for r in recs]
        assert [e.value for e in events] == pytest.approx([r[key] for r in recs], rel=1e-6)


def test_report_targets_are_checked():
    with pytest.raises(SearchError, match="--report-to"):
        TuneOptions(out="x", report_to=["wandb"])
    with pytest.raises(ValueError, match="--report-to"):
        LiveCurves(["nope"], "x", "y")
    assert TuneOptions(out="x", report_to=["tensorboard", "mlflow"]).report_to == ["tensorboard", "mlflow"]
