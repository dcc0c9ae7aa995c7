"""A killed ``lmforge tune`` continues where it stopped: finished trials are not rerun, the trial that was
running is failed as interrupted and its retry resumes from the trial's checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lmforge.runs import list_checkpoints, read_metrics
from lmforge.search.study import create_or_load, open_storage
from support.search import BASE, TPS, write_docs

SPACE = """
params:
  model.family: [transformer, gru]
  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}
"""


def _study(run: Path):
    state = json.loads((run / "pipeline.json").read_text())
    return create_or_load(open_storage(state["storage"]), state["study_name"], 1)


def _wait_for(cond, proc, timeout: float) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"lmforge tune ended (rc {proc.returncode}) before the kill point:\n{out[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    data = write_docs(tmp_path / "docs.jsonl")
    (tmp_path / "space.yaml").write_text(SPACE)
    run = tmp_path / "run"
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "tune",
        "--data",
        str(data),
        "--out",
        str(run),
        "--budget",
        "6ktok",
        "--space",
        str(tmp_path / "space.yaml"),
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--n-trials",
        "4",
        "--trial-tokens",
        str(12 * TPS),
        "--quiet",
        *BASE,
    ]
    for _attempt in range(5):
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # kill point: trial 0 finished and trial 1 has saved a checkpoint part-way, then a random moment later
        _wait_for(lambda: bool(list_checkpoints(run / "trials" / "0001")), proc, timeout=240)
        time.sleep(random.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()

        study = _study(run)
        finished = {
            t.number: (t.value, read_metrics(run / t.user_attrs["run_dir"]))
            for t in study.trials
            if t.state == TrialState.COMPLETE
        }
        # a trial killed right after it was asked has no run directory yet
        running = {t.number: t.user_attrs.get("run_dir") for t in study.trials if t.state == TrialState.RUNNING}
        saved = {n: d is not None and list_checkpoints(run / d) for n, d in running.items()}
        # the random moment may fall after trial 1 ended and before the next trial saved anything: try again
        if running and all(saved.values()):
            break
    assert 0 in finished
    assert running and all(saved.values())  # the kill hit a trial with saved progress

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["steps"]["evaluate"] == "done"

    study = _study(run)
    trials = {t.number: t for t in study.trials}
    for n, (value, metrics) in finished.items():  # never rerun
        assert trials[n].state == TrialState.COMPLETE and trials[n].value == value
        assert read_metrics(run / trials[n].user_attrs["run_dir"]) == metrics
    for n, rel in running.items():
        t = trials[n]
        assert t.state == TrialState.FAIL and "interrupted" in t.user_attrs["fail_reason"]
        (retry,) = [r for r in study.trials if r.system_attrs.get("failed_trial") == n]
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["run_dir"] == rel
        assert retry.params == t.params
        # resumed from its checkpoint, not retrained: one continuous metrics history
        assert retry.user_attrs["resumed_from_tokens"] > 0
        steps = [r["step"] for r in read_metrics(run / rel)]
        assert steps == sorted(set(steps))
    # four trials were asked for: the retries continue trials, they are not new ones
    originals = {t.system_attrs.get("failed_trial", t.number) for t in study.trials}
    assert len(originals) == 4


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_keeps_the_budget_and_proposes_new_configurations(tmp_path):
    """#14.5: a time-budgeted run killed with SIGKILL mid-search and resumed. The ledger in pipeline.json
    kept the killed run's time (saved every LEDGER_SAVE_S, start-up included), so both runs together stay
    within the budget by that ledger, and the resumed sampler (same --seed) does not re-propose the first
    run's configurations."""
    data = write_docs(tmp_path / "docs.jsonl")
    (tmp_path / "space.yaml").write_text(SPACE)
    run = tmp_path / "run"
    budget = 90.0
    env = {
        **os.environ,
        "LMFORGE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "LMFORGE_NATIVE_DECODE": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    cmd = [
        sys.executable, "-m", "lmforge", "tune", "--data", str(data), "--out", str(run), "--budget", f"{budget:.0f}s",
        "--space", str(tmp_path / "space.yaml"), "--sampler", "random", "--pruner", "none", "--seed", "0",
        "--trial-tokens", str(12 * TPS), "--quiet", *BASE,
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill point: mid-search, two trials finished (trials run one at a time: the third has started)
    _wait_for(lambda: (run / "trials" / "0002").is_dir(), proc, timeout=300)
    proc.kill()
    proc.wait()
    first_wall = time.monotonic() - t0
    at_kill = json.loads((run / "pipeline.json").read_text())
    assert at_kill["steps"]["search"]["status"] == "running"
    first_numbers = {t.number for t in _study(run).trials if t.state != TrialState.WAITING}

    t1 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    second_wall = time.monotonic() - t1
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = json.loads((run / "pipeline.json").read_text())
    spent = sum(state["spent_s"].values())

    # the killed run's time counted: the ledger lost at most a save interval (before: its start-up and up to
    # the last trial's end, half of the wall time in a probe); a bound only a lost stretch of time breaks
    assert sum(at_kill["spent_s"].values()) >= first_wall - 10, (at_kill["spent_s"], first_wall)
    assert spent >= first_wall + second_wall - 20, (state["spent_s"], first_wall, second_wall)
    # both runs together within the budget (the evaluation's fixed costs may run a little over its share)
    assert spent <= budget * 1.1, state["spent_s"]

    study = _study(run)
    by_params: dict[str, set[int]] = {}
    for t in study.trials:
        if t.state == TrialState.WAITING or t.user_attrs.get("discarded"):
            continue
        key = json.dumps(t.params, sort_keys=True)
        by_params.setdefault(key, set()).add(t.system_attrs.get("failed_trial", t.number))
    repeated = {k: v for k, v in by_params.items() if len(v) > 1}
    assert not repeated, repeated  # a retry continues its trial; a new trial never repeats a configuration
    new = [
        t for t in study.trials
        if t.number not in first_numbers and "failed_trial" not in t.system_attrs and t.state != TrialState.WAITING
    ]  # fmt: skip
    assert new, "the resumed run proposed no new trial: nothing to compare"
