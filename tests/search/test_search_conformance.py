"""Conformance: every search strategy on every storage keeps the same contract (in the spirit of Optuna's
``pytest_samplers``). One parametrized test runs a tiny search through the strategy table
(:func:`lmforge.search.strategies.strategy_for`) and checks:

- trials are recorded (run directory, tokens trained, a finite objective for finished ones);
- a continued search (same study, a raised trial count) adds trials and never re-runs or rewrites the
  finished ones;
- a token budget stops the strategy by the one rule (:func:`lmforge.search.budget.budget_spent`), at most
  one trial's length past the allowance;
- the best trial is selectable, and it is the finished trial with the lowest objective (a brute-force min).

PostgreSQL and Redis run when reachable on 127.0.0.1 (marked ``services``); Ray only where it is installed
(marked ``slow``: starting Ray takes longer than the rest together).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import socket
import uuid
from pathlib import Path

import pytest
from optuna.trial import TrialState

from lmforge.search.budget import budget_spent, plan_fidelity, tokens_used
from lmforge.search.context import CONTEXT_ATTR, SearchContext, load_context, prepare_search_data
from lmforge.search.options import TuneOptions
from lmforge.search.space import parse_space
from lmforge.search.strategies import SearchJob, strategy_for
from lmforge.search.study import create_or_load, open_storage, storage_url
from lmforge.search.summary import select_best

TPS = 4 * 16  # tokens per optimizer step (batch 4, block 16)
TRIAL_TOKENS = 4 * TPS
SPACE = {"params": {"model.family": ["transformer", "gru"], "optim.lr": {"float": [3e-3, 3e-2], "log": True}}}


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _storage(kind: str, run: Path) -> str:
    if kind == "journal":
        return storage_url(None, run)
    if kind == "sqlite":
        return f"sqlite:///{run / 'study.db'}"
    if kind == "postgresql":
        if not _reachable(5432) or importlib.util.find_spec("sqlalchemy") is None:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        return "postgresql://postgres@127.0.0.1:5432/test"  # as test_scale_services
    if not _reachable(6379) or importlib.util.find_spec("redis") is None:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return f"redis://127.0.0.1:6379/0?prefix=conformance-{uuid.uuid4().hex[:8]}"


STORAGES = [
    "journal",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.services),
    pytest.param("redis", marks=pytest.mark.services),
]
STRATEGIES = [
    ("embedded", "optuna"),
    ("embedded", "evolution"),
    pytest.param(
        "ray",
        "optuna",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed"),
        ],
    ),
]


def _setup(tmp: Path, storage_kind: str, backend: str):
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house while small bird sang".split()
    docs = tmp / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))}) + "\n"
            for _ in range(120)
        ),
        encoding="utf-8",
    )
    base = {
        "data": {"path": str(docs), "block_size": 16},
        "train": {"batch_size": 4, "eval_batches": 4},
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2},
    }
    run = tmp / "run"
    run.mkdir()
    url = _storage(storage_kind, run)
    ctx = SearchContext(
        run_dir=str(run),
        base_config=base,
        space=parse_space(SPACE).to_spec(),
        fidelity=plan_fidelity(0, TPS, max_tokens=TRIAL_TOKENS).to_dict(),
        sampler="random",
        pruner="none",
        parallel=backend == "ray",
    )
    name = f"conformance-{uuid.uuid4().hex[:8]}"
    study = create_or_load(open_storage(url), name, 1)
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    return run, url, name, prepare_search_data(base)


def _search(run: Path, url: str, name: str, data, backend: str, strategy: str, **limits) -> list:
    """Set the search's limits in the study's context (as the pipeline does) and run the strategy once."""
    study = create_or_load(open_storage(url), name, 1)
    ctx = load_context(study)
    for k, v in limits.items():
        setattr(ctx, k, v)
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    opts = TuneOptions(out=str(run), backend=backend, strategy=strategy, population=2, sample=2, verbose=False)
    job = SearchJob(
        study=study,
        ctx=ctx,
        data=data,
        study_name=name,
        storage=url,
        run_dir=run,
        stored=opts,
        given=opts,
        hook=lambda: None,
        log=lambda msg: None,
    )
    strategy_for(backend, strategy)(job)
    return study.get_trials(deepcopy=False)


@pytest.mark.parametrize("storage_kind", STORAGES)
@pytest.mark.parametrize(("backend", "strategy"), STRATEGIES)
def test_strategy_and_storage_conformance(tmp_path, monkeypatch, storage_kind, backend, strategy):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    run, url, name, data = _setup(tmp_path, storage_kind, backend)

    # trials recorded
    first = _search(run, url, name, data, backend, strategy, n_trials=2)
    done = [t for t in first if t.state == TrialState.COMPLETE]
    assert len(done) == 2, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in first]
    for t in done:
        assert (run / t.user_attrs["run_dir"] / "metrics.jsonl").is_file()
        assert t.user_attrs["tokens_trained"] > 0 and math.isfinite(t.values[0])

    # continued: the finished trials stay as they were, new ones are added
    before = {t.number: (t.values, t.user_attrs["run_dir"]) for t in done}
    second = _search(run, url, name, data, backend, strategy, n_trials=3)
    after = {t.number: t for t in second}
    assert all(after[n].state == TrialState.COMPLETE and (after[n].values, after[n].user_attrs["run_dir"]) == v
               for n, v in before.items())
    new = [t for t in second if t.number not in before and not t.user_attrs.get("discarded")]
    assert len(new) == 1 and new[0].user_attrs["run_dir"] not in {v[1] for v in before.values()}

    # a token budget: the strategy stops by the one rule, at most one trial past the allowance
    used = tokens_used(second)
    allowance = used + TRIAL_TOKENS // 2
    third = _search(run, url, name, data, backend, strategy, n_trials=None, search_tokens=allowance)
    ctx = load_context(create_or_load(open_storage(url), name, 1))
    assert budget_spent(ctx, tokens_used(third)) == "search token budget spent"
    assert tokens_used(third) <= allowance + TRIAL_TOKENS

    # the best trial: selectable, and the brute-force minimum of the finished trials
    study = create_or_load(open_storage(url), name, 1)
    best = select_best(study, ctx)
    finished = [t for t in third if t.state == TrialState.COMPLETE]
    assert best is not None and best.values[0] == min(t.values[0] for t in finished)
