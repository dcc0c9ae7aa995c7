"""Studies without training: storages, sampler/pruner factories, recovery of interrupted trials, document
splits, the disk cap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lmforge.search import splits
from lmforge.search.disk import MARKER, enforce_disk_cap
from lmforge.search.pruning import CurvePruner
from lmforge.search.study import (
    SearchError,
    create_or_load,
    make_pruner,
    make_sampler,
    open_storage,
    process_identity,
    recover_interrupted,
)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_journal_storage_and_interrupted_trial_is_failed_and_retried(tmp_path):
    url = str(tmp_path / "study.journal")
    study = create_or_load(open_storage(url), "s", 1)
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 0.5)
    t = study.ask()
    x = t.suggest_float("x", 0, 1)
    t.set_user_attr("run_dir", "trials/0001")
    t.set_user_attr("host", process_identity()["host"])
    t.set_user_attr("pid", _dead_pid())
    alive = study.ask()  # a trial of a live process: left alone
    for k, v in process_identity().items():
        alive.set_user_attr(k, v)

    # a new process opens the same journal, as a resumed `lmforge tune` does
    again = create_or_load(open_storage(url), "s", 1)
    assert recover_interrupted(again) == [1]
    trials = again.get_trials()
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == 0.5  # finished: untouched
    assert trials[1].state == TrialState.FAIL and "interrupted" in trials[1].user_attrs["fail_reason"]
    assert trials[2].state == TrialState.RUNNING
    retry = trials[3]
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == 1 and retry.user_attrs == {"run_dir": "trials/0001"}
    # the retry gets the same parameter value
    popped = again.ask()
    assert popped.number == 3 and popped.suggest_float("x", 0, 1) == x


def test_unlabelled_running_trial_is_recovered_only_when_exclusive(tmp_path):
    study = create_or_load(open_storage(str(tmp_path / "j")), "s", 1)
    study.ask()
    assert recover_interrupted(study) == []
    assert recover_interrupted(study, exclusive=True) == [0]


def test_storage_errors_are_one_line(tmp_path):
    with pytest.raises(SearchError, match="unknown scheme"):
        open_storage("ftp://example/x")
    sqlite = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = create_or_load(sqlite, "s", 2)
    with pytest.raises(SearchError, match="objective"):
        create_or_load(sqlite, "s", 1)
    assert len(study.directions) == 2


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "gp", "nsga2"])
def test_samplers_by_name(name):
    sampler = make_sampler(name, seed=0, parallel=True, conditional=True)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.2) ** 2, n_trials=3)
    assert len(study.trials) == 3


def test_tpe_is_multivariate_with_constant_liar_in_parallel():
    s = make_sampler("tpe", seed=0, parallel=True)
    assert s._multivariate is True and s._constant_liar is True
    assert make_sampler("tpe", seed=0, parallel=False)._constant_liar is False


def test_unknown_sampler_and_pruner():
    with pytest.raises(SearchError, match="--sampler"):
        make_sampler("bogus", seed=0)
    with pytest.raises(SearchError, match="--pruner"):
        make_pruner("bogus", min_tokens=1, max_tokens=9, eta=3)


def test_pruners_use_token_resources():
    asha = make_pruner("asha", min_tokens=100, max_tokens=900, eta=3)
    assert isinstance(asha, CurvePruner) and asha.rungs() == [100, 300]
    sha = make_pruner("sha", min_tokens=100, max_tokens=900, eta=3)
    assert isinstance(sha, optuna.pruners.SuccessiveHalvingPruner)
    hb = make_pruner("hyperband", min_tokens=100, max_tokens=900, eta=3)
    assert isinstance(hb, optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", min_tokens=1, max_tokens=1, eta=3), optuna.pruners.NopPruner)


# ------------------------------------------------------------------------------------------ splits
EOT = 0


def _stream(lengths: list[int]) -> tuple[np.ndarray, list[list[int]]]:
    docs, out, tok = [], [], 1
    for n in lengths:
        doc = list(range(tok, tok + n))
        tok += n
        docs.append(doc + [EOT])
        out += doc + [EOT]
    return np.array(out, dtype=np.int64), docs


def _docs_of(tokens: np.ndarray) -> list[tuple[int, ...]]:
    out, cur = [], []
    for t in tokens.tolist():
        cur.append(t)
        if t == EOT:
            out.append(tuple(cur))
            cur = []
    return out


def test_kfold_partitions_whole_documents():
    tokens, docs = _stream([5, 9, 3, 7, 11, 4, 6, 8])
    folds = splits.kfold(tokens, EOT, 3, seed=1)
    assert len(folds) == 3
    val_docs = [d for _, val in folds for d in _docs_of(val)]
    # every document is validated on exactly once, whole
    assert sorted(val_docs) == sorted(tuple(d) for d in docs)
    for train, val in folds:
        assert sorted(_docs_of(train) + _docs_of(val)) == sorted(tuple(d) for d in docs)
        assert len(val) > 0


def test_holdout_and_single_document_fallback():
    tokens, docs = _stream([4, 4, 4, 4])
    a, b = splits.holdout_split(tokens, EOT)
    assert sorted(_docs_of(a) + _docs_of(b)) == sorted(tuple(d) for d in docs) and len(a) and len(b)
    one = np.arange(1, 101)
    a, b = splits.holdout_split(one, EOT)
    assert np.array_equal(np.concatenate([a, b]), one)


# -------------------------------------------------------------------------------------- disk cap
def test_disk_cap_keeps_the_best_and_running_trials(tmp_path):
    study = optuna.create_study()
    values = {0: 3.0, 1: 1.0, 2: None, 3: 2.0, 4: "running"}
    for n, v in values.items():
        t = study.ask()
        t.set_user_attr("run_dir", f"trials/{n:04d}")
        ck = tmp_path / "trials" / f"{n:04d}" / "checkpoints" / "step-1"
        ck.mkdir(parents=True)
        (ck / "w").write_bytes(b"x" * 1000)
        (ck.parent.parent / "metrics.jsonl").write_text("{}\n")
        if v == "running":
            continue
        if v is None:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, v)
    deleted = enforce_disk_cap(study, tmp_path, cap=2500, keep_best=1)
    # pruned first, then the worst finished ones; the best (1) and the running (4) stay
    assert deleted == [2, 0, 3]
    for n in (0, 2, 3):
        run = tmp_path / "trials" / f"{n:04d}"
        assert not (run / "checkpoints").exists() and (run / MARKER).exists() and (run / "metrics.jsonl").exists()
    assert (tmp_path / "trials" / "0001" / "checkpoints").exists()
    assert (tmp_path / "trials" / "0004" / "checkpoints").exists()
    assert enforce_disk_cap(study, tmp_path, cap=None) == []
