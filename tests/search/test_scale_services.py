"""Several worker processes on one study in PostgreSQL and in Redis (the servers on 127.0.0.1): a trial cap is
met exactly, and a worker killed mid-trial (SIGKILL) is noticed by the others' heartbeat watch, its trial
failed and retried once from its checkpoint, and the study still completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lmforge.runs import list_checkpoints, read_metrics
from lmforge.search.context import load_context
from lmforge.search.study import create_or_load, open_storage
from support.search import (
    BASE,
    TPS,
    check_exactly_n,
    counted,
    make_study,
    start_workers,
    wait_all,
    worker_env,
    write_docs,
)

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.services


def _reachable(kind: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        if kind == "postgres":
            import sqlalchemy

            engine = sqlalchemy.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg2://"))
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("select 1"))
            engine.dispose()
        else:
            import redis

            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as err:  # any failure (driver missing, refused, auth) means: skip
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


@pytest.fixture(params=["postgres", "redis"])
def shared_storage(request):
    """(storage URL, study name) on a server, with a fresh study name (and for Redis a fresh key prefix);
    everything the test wrote there is removed afterwards."""
    kind = request.param
    why = _reachable(kind)
    if why is not None:
        pytest.skip(f"{kind} server at 127.0.0.1 unreachable ({why}); CI on the services machine has it")
    name = f"lmforge-test-{uuid.uuid4().hex[:12]}"
    url = PG_URL if kind == "postgres" else f"{REDIS_URL}?prefix={name}"
    yield url, name
    if kind == "postgres":
        try:
            optuna.delete_study(study_name=name, storage=open_storage(url))
        except KeyError:
            pass
    else:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)


def test_four_workers_finish_exactly_n_trials(shared_storage, tmp_path):
    url, name = shared_storage
    study, ctx = make_study(url, name, tmp_path, n_trials=8, steps=16)
    procs = start_workers(url, name, 4, worker_env(tmp_path), tmp_path / "logs")
    wait_all(procs, tmp_path / "logs", timeout=150)
    study = create_or_load(open_storage(url), name, 1)
    check_exactly_n(study, ctx, 8)
    assert len({t.user_attrs["pid"] for t in counted(study)}) >= 2  # the workers shared the trials


def _pick_victim(study, run: Path, pids: set[int]):
    """A running trial of one of our workers that has saved a checkpoint part-way."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rel, pid = t.user_attrs.get("run_dir"), t.user_attrs.get("pid")
        if rel and pid in pids and list_checkpoints(run / rel):
            return t
    return None


def test_killed_worker_trial_is_failed_retried_and_the_study_completes(shared_storage, tmp_path):
    url, name = shared_storage
    # long enough trials (80 steps, a checkpoint every 10) that the kill lands mid-trial
    study, ctx = make_study(url, name, tmp_path, n_trials=4, steps=80, eval_steps=10)
    run = Path(ctx.run_dir)
    logs = tmp_path / "logs"
    procs = start_workers(url, name, 3, worker_env(tmp_path), logs)
    by_pid = {p.pid: p for p in procs}
    deadline = time.time() + 90
    victim = None
    while victim is None:
        assert time.time() < deadline, "no trial reached a checkpoint in time"
        assert all(p.poll() is None for p in procs), "a worker ended before the kill"
        victim = _pick_victim(study, run, set(by_pid))
        time.sleep(0.05)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    killed_at = time.time()
    wait_all(procs, logs, timeout=150)

    study = create_or_load(open_storage(url), name, 1)
    trials = {t.number: t for t in study.get_trials()}
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"].startswith("worker lost")
    assert lost.datetime_complete is not None
    # failed within the grace period (4 s) plus a few heartbeat intervals of the watchers
    assert lost.datetime_complete.timestamp() - killed_at < 15
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert (
        retry.user_attrs["run_dir"] == lost.user_attrs["run_dir"] and retry.user_attrs["pid"] != lost.user_attrs["pid"]
    )
    assert retry.user_attrs["resumed_from_tokens"] > 0  # continued from the checkpoint, not retrained
    steps = [r["step"] for r in read_metrics(run / retry.user_attrs["run_dir"])]
    assert steps == list(range(10, 81, 10))
    # nothing left running or waiting, the cap counts the retry as the same trial
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    kept = counted(study)
    originals = sorted({t.system_attrs.get("failed_trial", t.number) for t in kept})
    assert originals == [0, 1, 2, 3]
    done = [t for t in kept if t.state == TrialState.COMPLETE]
    assert sorted(t.system_attrs.get("failed_trial", t.number) for t in done) == [0, 1, 2, 3]  # none run twice


def test_tune_driver_and_a_worker_from_another_machine_share_one_study(shared_storage, tmp_path):
    """``lmforge tune --storage URL`` creates the study and runs trials; ``lmforge worker`` joins it with only
    the URL and the study name; the driver waits for the joined worker's trials, then trains and evaluates
    the best model as usual."""
    url, name = shared_storage
    data = write_docs(tmp_path / "docs.jsonl")
    (tmp_path / "space.yaml").write_text("params:\n  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}\n")
    env = worker_env(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "tune", "--data", str(data), "--out", str(run), "--budget", "40ktok"]
    cmd += ["--space", str(tmp_path / "space.yaml"), "--sampler", "random", "--pruner", "none", "--n-trials", "6"]
    cmd += ["--trial-tokens", str(40 * TPS), "--storage", url, "--study-name", name, "--quiet", *BASE]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = open_storage(url)
    deadline = time.time() + 90
    while True:  # the worker can join once the driver has written the search context
        try:
            load_context(optuna.load_study(study_name=name, storage=storage))
            break
        except Exception:  # no study yet (KeyError) or no context yet (SearchError)
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "the driver did not create the study in time"
            time.sleep(0.2)
    workers = start_workers(url, name, 1, env, tmp_path / "logs")
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 0, err[-3000:]
    wait_all(workers, tmp_path / "logs", timeout=60)
    summary = json.loads(out)
    assert summary["steps"]["evaluate"] == "done" and summary["trials"]["complete"] == 6
    study = create_or_load(open_storage(url), name, 1)
    kept = counted(study)
    assert sorted(t.number for t in kept) == list(range(6)) and all(t.state == TrialState.COMPLETE for t in kept)
    by_pid = {}
    for t in kept:
        by_pid.setdefault(t.user_attrs["pid"], []).append(t.number)
    assert workers[0].pid in by_pid and len(by_pid) == 2, by_pid  # both the driver and the joined worker ran trials
