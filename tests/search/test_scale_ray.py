"""``lmforge tune --backend ray`` on a local two-CPU Ray instance the tests start and stop (loopback, no
dashboard): the run directory has the embedded backend's layout, the Optuna study records the trials, a
trial trained in Ray's report-and-checkpoint chunks matches one uninterrupted training, and the experiment
is restored after its driver is killed (about 40 s)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from lmforge.config import build_config, load_yaml
from lmforge.runs import list_checkpoints, read_metrics
from lmforge.search.context import fixed_val_batches, prepare_search_data
from lmforge.search.pipeline import TuneOptions, run_pipeline
from lmforge.search.study import SearchError, create_or_load, open_storage
from lmforge.train.loop import train
from support.search import BASE, TPS, write_docs, write_space

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lmforge[ray]')")

SPACE = """
params:
  model.family: [transformer, gru]
  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}
start:
  - {model.family: gru, optim.lr: 5.0e-3}
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


def _options(tmp: Path, **kw) -> TuneOptions:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_docs(tmp / "docs.jsonl")
    return TuneOptions(
        out=str(tmp / "run"),
        data=str(data),
        space=str(write_space(tmp / "space.yaml", SPACE)),
        overrides=list(BASE),
        verbose=False,
        **{"backend": "ray", "trial_resources": "cpu=1", **kw},
    )


def _study(run: Path):
    state = json.loads((run / "pipeline.json").read_text())
    return create_or_load(open_storage(state["storage"]), state["study_name"], 1)


def test_ray_search_fills_the_run_directory_like_the_embedded_backend(local_ray, tmp_path):
    opts = _options(
        tmp_path, budget="12ktok", sampler="random", pruner="asha", n_trials=4, trial_tokens=12 * TPS, seed=1
    )
    summary = run_pipeline(opts)
    run = Path(opts.out)
    assert summary["steps"] == {"search": "done", "final": "done", "decode": "skipped", "evaluate": "done"}
    assert (run / "best" / "COMPLETE").is_file() and (run / "summary.json").is_file()
    assert (run / "ray" / "search").is_dir()

    study = _study(run)
    trials = [t for t in study.get_trials() if not t.user_attrs.get("discarded")]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert trials[0].params == {"model.family": "gru", "optim.lr": 5e-3}  # the space's start point came first
    assert any(t.state == TrialState.COMPLETE for t in trials)
    with open(run / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2, 3]
    fid_max = 12 * TPS
    for t in trials:
        rel = t.user_attrs["run_dir"]
        assert rel == f"trials/{t.number:04d}" and (run / rel / "config.yaml").is_file()
        recs = read_metrics(run / rel)
        steps = [r["step"] for r in recs]
        assert steps == sorted(set(steps)) and recs, (t.number, steps)
        # the study holds what the trial reported: every evaluation, at step = trained tokens
        assert sorted(t.intermediate_values) == [r["tokens"] for r in recs]
        assert t.user_attrs["tokens"] == recs[-1]["tokens"]
        if t.state == TrialState.COMPLETE:
            assert recs[-1]["tokens"] == fid_max and t.value == pytest.approx(min(r["val_loss"] for r in recs))
        else:
            assert recs[-1]["tokens"] < fid_max and "stopped by the ASHA scheduler" in t.user_attrs["stopped"]

    # independent reference: the best complete trial's configuration trained in one uninterrupted call
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    trial_dir = run / best.user_attrs["run_dir"]
    cfg = build_config(load_yaml(trial_dir / "config.yaml"))
    data = prepare_search_data(load_yaml(trial_dir / "config.yaml"), 0, 1)  # the split of --seed 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray trial ran (cpu=1)
    try:
        ref = train(
            cfg,
            tmp_path / "reference",
            data=data.prepared,
            verbose=False,
            val_batches=fixed_val_batches(data.prepared.val, cfg, 64),
        )
    finally:
        torch.set_num_threads(threads)
    got = read_metrics(trial_dir)
    assert [r["step"] for r in ref.history] == [r["step"] for r in got]
    for a, b in zip(ref.history, got, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)


def test_ray_options_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(SearchError, match="--backend ray does not run --cv"):
        run_pipeline(_options(tmp_path, budget="4ktok", cv=2))
    with pytest.raises(SearchError, match="--trial-resources 'cpu'"):
        run_pipeline(_options(tmp_path / "b", budget="4ktok", trial_resources="cpu"))
    with pytest.raises(SearchError, match="one objective"):
        run_pipeline(_options(tmp_path / "c", budget="4ktok", objectives=["val_loss", "params"]))


def test_cli_without_ray_says_how_to_install_it(tmp_path):
    """A Python where ``import ray`` fails (a shadowing package): one line naming the extra, exit status 2."""
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow"), "LMFORGE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "lmforge", "tune", "--data", "demo", "--out", str(tmp_path / "r"), "--backend", "ray"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --backend ray needs Ray: pip install 'lmforge[ray]' (or pip install 'ray[tune]')"
    ]


def test_experiment_is_restored_after_the_driver_is_killed(local_ray, tmp_path):
    data = write_docs(tmp_path / "docs.jsonl")
    write_space(tmp_path / "space.yaml", SPACE)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "tune", "--out", str(run), "--backend", "ray", "--address", local_ray]
    first = [
        *cmd,
        *("--data", str(data), "--budget", "20ktok", "--space", str(tmp_path / "space.yaml")),
        *("--sampler", "random", "--pruner", "none", "--n-trials", "4", "--trial-tokens", str(40 * TPS)),
        *("--trial-resources", "cpu=1", "--quiet", *BASE),
    ]
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(first, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill point: some trial has checkpoints part-way and Tune has saved the experiment's state
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"lmforge tune ended (rc {proc.returncode}) before the kill:\n{proc.stdout.read()[-3000:]}")
        started = [d for d in (run / "trials").glob("*") if list_checkpoints(d)] if (run / "trials").is_dir() else []
        if started and list((run / "ray" / "search").glob("experiment_state*.json")):
            break
        assert time.time() - t0 < 240, "no trial checkpoint in time"
        time.sleep(0.1)
    before = {d.name: read_metrics(d) for d in started}
    saved_step = {d.name: int(list_checkpoints(d)[-1].name.split("-")[-1]) for d in started}
    ray_trials = {p.name for p in (run / "ray" / "search").glob("trial_*")}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    done = subprocess.run([*cmd, "--resume", "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["steps"]["evaluate"] == "done"
    study = _study(run)
    trials = {t.number: t for t in study.get_trials()}
    # four trials count; a trial the dead driver had only suggested (not yet in Tune's snapshot, never
    # trained) is discarded and replaced, so numbers may skip
    kept = [t for t in trials.values() if not t.user_attrs.get("discarded")]
    not_complete = [(t.number, t.state.name, t.user_attrs) for t in kept if t.state != TrialState.COMPLETE]
    assert len(kept) == 4 and not not_complete, not_complete  # the reason, if one failed
    assert sorted(p.name for p in (run / "trials").iterdir()) == sorted(f"{t.number:04d}" for t in kept)
    for name, recs in before.items():
        # restored, not restarted: the same Ray trial finished it, keeping its history before the kill
        t = trials[int(name)]
        assert t.state == TrialState.COMPLETE and f"trial_{t.user_attrs['ray_trial_id']}" in ray_trials
        after = read_metrics(run / "trials" / name)
        kept_recs = [r for r in recs if r["step"] <= saved_step[name]]
        assert after[: len(kept_recs)] == kept_recs  # up to the checkpoint: the very records, times included
        # records past it are redone from the checkpoint (exact resume: the same values, another clock)
        clockless = [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in after[: len(recs)]]
        assert clockless == [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in recs]
        assert [r["step"] for r in after] == list(range(4, 41, 4))
