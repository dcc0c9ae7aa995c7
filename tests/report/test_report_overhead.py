"""The report's time table: the trials' wall time by phase, as the trials recorded it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lmforge.report.html import render_html
from lmforge.report.overhead import overhead, overhead_text
from lmforge.report.run import ReportRun


def _trial(number: int, duration: float, phases: dict[str, float] | None, **attrs) -> optuna.trial.FrozenTrial:
    user = {"duration_s": duration, **attrs}
    if phases is not None:
        user["phases"] = phases
    t = optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0, user_attrs=user)
    t.number = number
    return t


PH = {"build_s": 0.5, "train_s": 8.0, "compile_s": 0.0, "eval_s": 1.0, "checkpoint_s": 0.3}


def test_single_process_rows_add_up_to_the_search_time(tmp_path: Path) -> None:
    run = ReportRun(run_dir=tmp_path, state={"spent_s": {"search": 25.0, "final": 4.0}},
                    trials=[_trial(0, 10.0, PH), _trial(1, 10.0, PH), _trial(2, 3.0, None)])
    ov = overhead(run)
    assert ov is not None and ov.trials == 2 and ov.trial_s == 20.0
    rows = dict(ov.rows)
    assert rows["training: optimizer steps"] == 16.0
    assert rows["evaluation"] == 2.0
    assert rows["trial set-up and study writes (duration less phases)"] == pytest.approx(20.0 - 2 * 9.8)
    # between trials: the search step less every trial's duration (the untimed one included)
    assert rows["search step outside trials (data, plan, study, sampler)"] == pytest.approx(25.0 - 23.0)
    assert rows["pipeline step: final"] == 4.0
    assert ov.train_share == pytest.approx(0.8)
    assert "80.0% of the wall time of 2 trials" in overhead_text(ov)


def test_worker_processes_add_their_start_up(tmp_path: Path) -> None:
    start = {"process_s": 2.5, "data_s": 1.5}
    run = ReportRun(run_dir=tmp_path, state={"spent_s": {"search": 12.0}},
                    trials=[_trial(0, 10.0, PH, worker_startup=start), _trial(1, 10.0, PH, worker_startup=start)])
    ov = overhead(run)
    assert ov is not None
    rows = dict(ov.rows)
    assert rows["worker process start and imports"] == 5.0 and rows["worker data preparation"] == 3.0
    assert "search step outside trials (data, plan, study, sampler)" not in rows  # not defined with several processes


def test_no_phases_no_table_and_the_page_says_so(tmp_path: Path) -> None:
    run = ReportRun(run_dir=tmp_path, trials=[_trial(0, 3.0, None)])
    assert overhead(run) is None
    page = render_html(run, [], [], [], (None, "sampling skipped"), None)
    assert "no trial recorded its phase timings" in page
    run2 = ReportRun(run_dir=tmp_path, trials=[_trial(0, 10.0, PH)])
    page2 = render_html(run2, [], [], [], (None, "sampling skipped"), overhead(run2))
    assert "Where the time went" in page2 and "training: optimizer steps" in page2 and "80.0%" in page2
