"""#14 (PostgreSQL, 4 workers under heavy load): a worker whose beat is late but whose process is alive is
never declared lost, a killed one (even a zombie its parent has not reaped) is; and ``--n-trials`` counts
finished trials (COMPLETE/PRUNED), not trials that failed for good."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from lmforge.search.context import SearchContext
from lmforge.search.study import (
    HEARTBEAT_ATTR,
    StaleWatch,
    create_or_load,
    fail_stale,
    open_storage,
    process_identity,
)
from lmforge.search.worker import failed_for_good, over_cap, search_done
from support.search import FakeClock


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def _running_trial(study, storage, ident: dict) -> optuna.Trial:
    t = study.ask()
    t.suggest_float("x", 0, 1)
    for k, v in ident.items():
        t.set_user_attr(k, v)
    storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, {"beat": 1.0, "grace": 4})
    return t


def test_a_late_beat_of_a_live_process_is_not_a_lost_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HEARTBEAT_S", "1")
    monkeypatch.setenv("LMFORGE_GRACE_S", "4")
    storage = open_storage(str(tmp_path / "j"))
    study = create_or_load(storage, "s", 1)
    # a worker starved of CPU: alive (this very process), its beat stopped for far longer than the grace period
    slow = _running_trial(study, storage, process_identity())
    # a killed worker, not yet reaped by its parent (a zombie: its pid still exists)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = int(open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[19])
    dead = _running_trial(study, storage, {"host": socket.gethostname(), "pid": child.pid, "pid_start": start})
    # a worker of another machine: nothing to ask but its heartbeat
    remote = _running_trial(study, storage, {"host": "elsewhere", "pid": os.getpid(), "pid_start": None})
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # the kill is delivered asynchronously; only a hang waits this long
    while _state(child.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        clock = FakeClock()
        watch = StaleWatch(clock)
        assert fail_stale(study, watch) == []
        clock.t += 1000
        failed = fail_stale(study, watch)
    finally:
        child.wait()
    assert sorted(failed) == sorted([dead.number, remote.number])
    states = {t.number: t.state for t in study.get_trials()}
    assert states[slow.number] == TrialState.RUNNING
    study.tell(slow, 0.5)  # the slow worker finishes its own trial: no UpdateFinishedTrialError


def test_trial_cap_counts_finished_trials_not_failed_ones(tmp_path):
    study = create_or_load(open_storage(str(tmp_path / "j")), "s", 1)
    ctx = SearchContext(run_dir=str(tmp_path), base_config={}, space={}, fidelity={}, n_trials=3)
    first = [study.ask() for _ in range(3)]
    study.tell(first[0], 1.0)
    study.tell(first[1], state=TrialState.FAIL)  # failed for good (e.g. diverged), no retry
    study.tell(first[2], 2.0)
    assert failed_for_good(study.get_trials()) == {first[1].number}
    assert search_done(study, ctx) is None  # two finished of three: one more trial
    extra = study.ask()
    assert not over_cap(study, extra, 3)
    study.tell(extra, 3.0)
    assert search_done(study, ctx) == "3 trials run"
    assert over_cap(study, study.ask(), 3)
    # a trial that keeps failing does not keep the search going forever: N failures end it
    many = create_or_load(open_storage(str(tmp_path / "k")), "s", 1)
    for _ in range(3):
        many.tell(many.ask(), state=TrialState.FAIL)
    assert "3 trials failed" in (search_done(many, ctx) or "")
