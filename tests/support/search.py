"""Tiny corpora, spaces and study helpers for the search and scale tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lmforge.config import apply_overrides
from lmforge.runs import read_metrics
from lmforge.search.budget import Fidelity
from lmforge.search.context import CONTEXT_ATTR, SearchContext, prepare_search_data
from lmforge.search.pipeline import TuneOptions
from lmforge.search.space import parse_space
from lmforge.search.study import create_or_load, open_storage

BASE = ["--data.block_size", "16", "--train.batch_size", "4", "--model.n_layer", "1", "--model.d_model", "16"]


TPS = 4 * 16  # tokens per optimizer step


def write_docs(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the cat sat on a mat and dog ran to big red house while small bird sang".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))}) + "\n")
    return path


def write_space(path: Path, space: str) -> Path:
    path.write_text(space, encoding="utf-8")
    return path


def options(tmp: Path, space: str, **kw) -> TuneOptions:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_docs(tmp / "docs.jsonl")
    return TuneOptions(
        out=str(tmp / "run"),
        data=str(data),
        space=str(write_space(tmp / "space.yaml", space)),
        overrides=list(kw.pop("overrides", BASE)),
        verbose=False,
        **kw,
    )


def load_study(run: Path):
    state = json.loads((run / "pipeline.json").read_text())
    return create_or_load(open_storage(state["storage"]), state["study_name"], len(state["options"]["objectives"]))


SPACE = {
    "params": {
        "model.family": ["transformer", "gru"],
        "optim.lr": {"float": [1.0e-3, 1.0e-2], "log": True},
    }
}


FAST_HEARTBEAT = {"LMFORGE_HEARTBEAT_S": "1", "LMFORGE_GRACE_S": "4"}


# ----------------------------------------------------------------------------------------- helpers
def make_study(
    url: str, name: str, tmp: Path, *, n_trials: int, steps: int = 12, eval_steps: int = 4, seed: int = 0
) -> tuple[object, SearchContext]:
    """A study as ``lmforge tune`` leaves it for workers: tiny models, ``steps`` optimizer steps per trial,
    an evaluation (and checkpoint) every ``eval_steps``, no pruning. The data is prepared (cached) here
    once, so the workers do not all tokenize it at the same moment."""
    docs = write_docs(tmp / "docs.jsonl")
    base = apply_overrides({}, ["--data.path", str(docs), *BASE])
    fid = Fidelity(min_tokens=eval_steps * TPS, max_tokens=steps * TPS, eta=3, rungs=1, tokens_per_step=TPS)
    run = tmp / "run"
    run.mkdir(parents=True, exist_ok=True)
    ctx = SearchContext(
        run_dir=str(run),
        base_config=base,
        space=parse_space(SPACE, source="test").to_spec(),
        fidelity=fid.to_dict(),
        sampler="random",
        pruner="none",
        seed=seed,
        parallel=True,
        n_trials=n_trials,
    )
    study = create_or_load(open_storage(url), name, 1)
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    prepare_search_data(base)
    return study, ctx


def worker_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LMFORGE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", **FAST_HEARTBEAT, **extra}


def start_workers(url: str, name: str, n: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "lmforge", "worker", "--storage", url, "--study", name]
        cmd += ["--threads", "1", "--worker-id", str(i)]
        with open(logs / f"worker-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("workers did not finish:\n" + _tails(logs))
    bad = [p.returncode for p in procs if p.returncode not in (0, -9)]
    assert not bad, f"worker exit codes {bad}:\n" + _tails(logs)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(logs.glob("*.log")))


def counted(study) -> list:
    """The study's trials that count (not discarded past the cap)."""
    return [t for t in study.get_trials() if not t.user_attrs.get("discarded")]


def check_exactly_n(study, ctx: SearchContext, n: int) -> None:
    """``n`` trials numbered 0..n-1, each finished once, in its own directory, trained exactly once to the
    full length; every extra trial a racing worker asked was discarded before training."""
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    kept = counted(study)
    assert sorted(t.number for t in kept) == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in kept)
    assert sorted(t.user_attrs["run_dir"] for t in kept) == [f"trials/{i:04d}" for i in range(n)]
    run = Path(ctx.run_dir)
    assert sorted(p.name for p in (run / "trials").iterdir()) == [f"{i:04d}" for i in range(n)]
    fid = ctx.fid
    expected_steps = list(range(fid.eval_steps, fid.max_steps + 1, fid.eval_steps))
    for t in kept:
        steps = [r["step"] for r in read_metrics(run / t.user_attrs["run_dir"])]
        assert steps == expected_steps, (t.number, steps)  # one continuous history: never trained twice
        assert t.user_attrs["tokens"] == fid.max_tokens
    for t in trials:
        if t.user_attrs.get("discarded"):
            assert t.state == TrialState.FAIL and "run_dir" not in t.user_attrs


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
