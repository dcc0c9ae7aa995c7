"""``lmforge tune --strategy evolution`` end to end: children are mutated copies of trained parents."""

from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState

from lmforge.search.pipeline import TuneOptions, run_pipeline
from lmforge.search.study import SearchError
from support.search import load_study, options

SPACE = """
params:
  model.family: [gru, lstm]
  model.d_model: [16, 24]
  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}
fixed:
  model.residual: true
  model.n_layer: 2
"""


def test_evolution_strategy_runs_through_the_pipeline(tmp_path):
    opts = options(tmp_path, SPACE, budget="60ktok", strategy="evolution", population=3, sample=2,
                   overrides=["--data.block_size", "16", "--train.batch_size", "4"])
    summary = run_pipeline(opts)
    study = load_study(tmp_path / "run")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    children = [t for t in study.get_trials(deepcopy=False) if "mutation" in t.user_attrs]
    assert len(done) >= 3 and children, "the population was never mutated"
    parents = {t.number for t in study.get_trials(deepcopy=False)}
    assert all(c.user_attrs["parent"] in parents for c in children)
    assert summary["steps"]["final"] == "done" and (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["options"]["strategy"] == "evolution"


def test_evolution_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(SearchError, match="evolution"):
        run_pipeline(TuneOptions(out=str(tmp_path / "r"), data="demo", budget="10s", strategy="evolution", cv=2,
                                 verbose=False))


def test_tune_sample_is_a_deprecated_alias_of_tournament(tmp_path, capsys):
    from lmforge.cli import main

    # no --data: the command stops before any work, after reading its options
    assert main(["tune", "--out", str(tmp_path / "r"), "--sample", "2"]) != 0
    err = capsys.readouterr().err
    assert "--sample is deprecated; use --tournament" in err and "no data" in err
    assert main(["tune", "--out", str(tmp_path / "r"), "--tournament", "2"]) != 0
    assert "deprecated" not in capsys.readouterr().err
