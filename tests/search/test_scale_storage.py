"""Scale-out without servers: journal heartbeats and the stale-trial watch, racing workers that fail the
same lost trial, the trial-count cap under racing asks, storage URLs, and the ``lmforge worker`` command.
The helpers here (a study with a search context, worker processes) are shared by the other scale tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from lmforge.search.study import (
    HEARTBEAT_ATTR,
    FlockLock,
    Heartbeat,
    SearchError,
    StaleWatch,
    create_or_load,
    fail_stale,
    heartbeat_settings,
    open_storage,
    redis_url_and_prefix,
)
from lmforge.search.worker import over_cap
from support.search import (
    FakeClock,
    check_exactly_n,
    make_study,
    start_workers,
    wait_all,
    worker_env,
)


# ------------------------------------------------------------------------------ heartbeats, staleness
def test_heartbeat_settings_from_environment(monkeypatch):
    monkeypatch.delenv("LMFORGE_HEARTBEAT_S", raising=False)
    monkeypatch.delenv("LMFORGE_GRACE_S", raising=False)
    assert heartbeat_settings() == (30, 120)
    monkeypatch.setenv("LMFORGE_HEARTBEAT_S", "2")
    assert heartbeat_settings() == (2, 8)
    monkeypatch.setenv("LMFORGE_GRACE_S", "5")
    assert heartbeat_settings() == (2, 5)
    monkeypatch.setenv("LMFORGE_GRACE_S", "2")
    with pytest.raises(SearchError, match="LMFORGE_GRACE_S"):
        heartbeat_settings()
    monkeypatch.setenv("LMFORGE_HEARTBEAT_S", "soon")
    with pytest.raises(SearchError, match="LMFORGE_HEARTBEAT_S='soon'"):
        heartbeat_settings()


def test_journal_heartbeat_is_written_and_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HEARTBEAT_S", "1")
    study = create_or_load(open_storage(str(tmp_path / "j")), "s", 1)
    trial = study.ask()
    with Heartbeat(study._storage, trial._trial_id):
        first = study._storage.get_trial(trial._trial_id).system_attrs[HEARTBEAT_ATTR]
        time.sleep(1.6)
        second = study._storage.get_trial(trial._trial_id).system_attrs[HEARTBEAT_ATTR]
    assert second["beat"] > first["beat"] and second["pid"] == os.getpid()
    assert (first["interval"], first["grace"]) == (1, 4)
    study.tell(trial, 1.0)




def test_stale_watch_judges_by_its_own_clock(tmp_path, monkeypatch):
    """A beat that keeps changing is alive however old its timestamp (clock skew between machines); one
    that stops changing is stale after the grace period its worker declared."""
    monkeypatch.setenv("LMFORGE_HEARTBEAT_S", "1")
    monkeypatch.setenv("LMFORGE_GRACE_S", "10")
    storage = open_storage(str(tmp_path / "j"))
    study = create_or_load(storage, "s", 1)
    alive, dead, silent = study.ask(), study.ask(), study.ask()
    for t in (alive, dead):
        t.suggest_float("x", 0, 1)
        storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, {"beat": 1.0, "grace": 5})
    clock = FakeClock()
    watch = StaleWatch(clock)
    assert watch.stale(study) == []
    for beat in (2.0, 3.0, 4.0):  # the live worker beats (with an ancient clock); the dead one does not
        clock.t += 3
        storage.set_trial_system_attr(alive._trial_id, HEARTBEAT_ATTR, {"beat": beat, "grace": 5})
        stale = [t.number for t in watch.stale(study)]
        assert stale == ([dead.number] if clock.t - 1000 > 5 else []), clock.t
    clock.t += 2  # 11 s without a beat from the trial that never beat: past the default grace (10 s)
    assert sorted(t.number for t in watch.stale(study)) == [dead.number, silent.number]
    assert StaleWatch(clock).stale(study) == []  # a new watch has seen nothing yet: it fails nothing


def test_racing_watchers_fail_a_lost_trial_once_and_retry_it_once(tmp_path):
    url = str(tmp_path / "j")
    study = create_or_load(open_storage(url), "s", 1)
    lost = study.ask()
    x = lost.suggest_float("x", 0, 1)
    lost.set_user_attr("run_dir", "trials/0000")
    lost.set_user_attr("tokens_trained", 640)
    # three workers, each with its own storage connection, watch the same journal
    studies = [create_or_load(open_storage(url), "s", 1) for _ in range(3)]
    clocks = [FakeClock() for _ in studies]
    watches = [StaleWatch(c) for c in clocks]
    for s, w in zip(studies, watches, strict=True):
        assert fail_stale(s, w) == []
    for c in clocks:
        c.t += 1000
    results = [fail_stale(s, w) for s, w in zip(studies, watches, strict=True)]
    assert sorted(n for r in results for n in r) == [lost.number]  # exactly one worker won
    trials = create_or_load(open_storage(url), "s", 1).get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("worker lost")
    (retry,) = trials[1:]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == lost.number
    assert retry.user_attrs == {"run_dir": "trials/0000"}  # progress attributes of the dead attempt stay behind
    assert studies[1].ask().suggest_float("x", 0, 1) == x


def test_cap_admits_exactly_the_first_n_new_trials(tmp_path):
    """Asks that raced past the cap: whatever order the workers check in, the admitted trials are the first
    n new ones by number; retries and discarded trials do not count."""
    study = create_or_load(open_storage(str(tmp_path / "j")), "s", 1)
    asked = [study.ask() for _ in range(6)]
    study.tell(asked[1], state=TrialState.FAIL)
    import optuna

    study.add_trial(
        optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 1, "retry_history": [1]})
    )
    late = study.ask()  # pops the retry (number 6)
    assert late.number == 6
    extra = study.ask()  # number 7
    verdicts = {t.number: over_cap(study, t, 4) for t in reversed([*asked, extra])}
    assert verdicts == {0: False, 1: False, 2: False, 3: False, 4: True, 5: True, 7: True}
    asked[2].set_user_attr("discarded", True)  # a discarded trial leaves its place to the next one
    assert not over_cap(study, asked[4], 4) and over_cap(study, asked[5], 4)
    assert not over_cap(study, extra, None)


# --------------------------------------------------------------------------------------------- urls
def test_redis_prefix_is_taken_out_of_the_url():
    assert redis_url_and_prefix("redis://h:6379/2?prefix=proj") == ("redis://h:6379/2", "proj")
    assert redis_url_and_prefix("redis://:pw@h/0?prefix=p&socket_timeout=5") == (
        "redis://:pw@h/0?socket_timeout=5",
        "p",
    )
    assert redis_url_and_prefix("redis://h") == ("redis://h", "")


def test_unreachable_storages_are_one_line_errors():
    with pytest.raises(SearchError, match="cannot reach the Redis server"):
        open_storage("redis://127.0.0.1:1/0")
    with pytest.raises(SearchError, match="cannot open"):
        open_storage("postgresql://nobody@127.0.0.1:1/none")


def test_journal_lock_pickles_without_its_descriptors(tmp_path):
    import pickle

    lock = FlockLock(str(tmp_path / "l"))
    assert lock.acquire()
    copy = pickle.loads(pickle.dumps(lock))
    lock.release()
    assert copy.path == lock.path and copy.acquire()
    copy.release()


# -------------------------------------------------------------------------------------- lmforge worker
def _lmforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_worker_command_errors_are_one_line(tmp_path):
    journal = str(tmp_path / "study.journal")
    r = _lmforge("worker", "--storage", journal, "--study", "nope")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: no study named 'nope' in the storage"]
    create_or_load(open_storage(journal), "plain", 1)
    r = _lmforge("worker", "--storage", journal, "--study", "plain")
    assert r.returncode == 2 and "not created by lmforge tune" in r.stderr
    study, ctx = make_study(journal, "t", tmp_path, n_trials=1)
    r = _lmforge("worker", "--storage", journal, "--study", "t", "--run-dir", str(tmp_path / "elsewhere"))
    assert r.returncode == 2 and "does not exist on this machine" in r.stderr


def test_two_workers_on_a_journal_file_run_exactly_n_trials(tmp_path):
    journal = str(tmp_path / "study.journal")
    study, ctx = make_study(journal, "t", tmp_path, n_trials=4, steps=8)
    procs = start_workers(journal, "t", 2, worker_env(tmp_path), tmp_path / "logs")
    wait_all(procs, tmp_path / "logs", timeout=120)
    check_exactly_n(create_or_load(open_storage(journal), "t", 1), ctx, 4)
