"""#14.5 in process: the time ledger in pipeline.json is saved while a step runs (not only when a trial
reports), it starts with the command, a resumed final training never gets a longer clock than the budget left,
and a resumed study's sampler does not replay the first run's proposals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest

from lmforge.search import pipeline
from lmforge.search.final import fit_plan_to_time_left, training_seconds
from lmforge.search.pipeline import LEDGER_SAVE_S, run_pipeline
from lmforge.search.study import make_sampler, sampler_seed, trials_run
from support.search import TPS, options

SPACE = """
params:
  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


def _spent(run: Path) -> float:
    return float(json.loads((run / "pipeline.json").read_text())["spent_s"]["search"])


def test_ledger_is_saved_while_a_step_runs_and_counts_the_start_up(tmp_path, monkeypatch):
    opts = options(tmp_path, SPACE, budget="3ktok", sampler="random", pruner="none", n_trials=1, trial_tokens=8 * TPS)
    opts.started = time.monotonic() - 1000.0  # as if the command had started 1000 s ago
    run = Path(opts.out)
    real = pipeline.strategy_for
    seen: list[float] = []

    def slow_strategy(backend: str, strategy: str):
        inner = real(backend, strategy)

        def run_it(job):
            # a stretch with no trial reporting (no hook): the ledger must still reach the disk
            before = _spent(run)
            deadline = time.monotonic() + 60  # only a ledger that is never saved waits this long
            while _spent(run) <= before and time.monotonic() < deadline:
                time.sleep(LEDGER_SAVE_S / 4)
            seen.append(_spent(run) - before)
            return inner(job)

        return run_it

    monkeypatch.setattr(pipeline, "strategy_for", slow_strategy)
    summary = run_pipeline(opts)
    assert seen and seen[0] > 0, "the ledger was not saved during the step"
    spent = summary["budget"]["spent_s"]
    assert sum(spent.values()) >= 1000.0  # the start-up before the pipeline is spent time


def test_resumed_final_training_gets_at_most_the_time_left(tmp_path):
    plan = {"trial": 0, "from": None, "start_step": 0, "max_steps": 100, "max_time": 50.0}
    assert fit_plan_to_time_left(plan, tmp_path / "final", allowance=80.0) == plan  # never longer
    cut = fit_plan_to_time_left(plan, tmp_path / "final", allowance=20.0)
    assert cut["max_time"] == pytest.approx(training_seconds(20.0)) and cut["max_steps"] == 100
    tokens = {**plan, "max_time": None}
    assert fit_plan_to_time_left(tokens, tmp_path / "final", allowance=1.0) == tokens


def test_a_resumed_sampler_does_not_replay_the_first_runs_proposals():
    """What a killed run resumed with the same --seed did: a fresh sampler, the same seed, the same points."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(t: optuna.Trial) -> float:
        return t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("layers", 1, 8)

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, sampler=make_sampler("random", seed=sampler_seed(0, 0, 0)))
    study.optimize(objective, n_trials=5)  # the first run, then killed
    assert trials_run(study) == 5
    resumed = optuna.load_study(
        study_name=study.study_name,
        storage=storage,
        sampler=make_sampler("random", seed=sampler_seed(0, 0, trials_run(study))),
    )
    resumed.optimize(objective, n_trials=5)
    params = [tuple(sorted(t.params.items())) for t in resumed.trials]
    assert len(set(params)) == len(params) == 10
    assert sampler_seed(0, 0, 0) == 0 and sampler_seed(3, 2, 0) == 5  # a new study keeps seed + worker id
    assert len({sampler_seed(0, w, n) for w in range(4) for n in range(1, 50)}) == 4 * 49
