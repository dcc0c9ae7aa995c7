"""Regularized evolution on a tiny study made here: population bookkeeping, tournaments, children that
continue their parents' weights, lineage attributes and token accounting, retries, the study params."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lmforge.report import build_report
from lmforge.runs import load_model
from lmforge.search.budget import plan_fidelity
from lmforge.search.context import CONTEXT_ATTR, SearchContext, fixed_val_batches, prepare_search_data
from lmforge.search.evolution import apply_mutation, child_params, run_evolution
from lmforge.search.space import parse_space
from lmforge.search.study import SearchError, create_or_load, open_storage, storage_url
from lmforge.train.loop import evaluate_loss

TPS = 4 * 16  # tokens per optimizer step (batch 4, block 16)
INCREMENT = 4 * TPS
SPACE = {
    "params": {
        "model.family": ["transformer", "gru"],
        "model.n_layer": {"int": [1, 2]},
        "optim.lr": {"float": [3e-3, 3e-2], "log": True},
    },
    "conditional": [{"when": {"model.family": "gru"}, "params": {"model.residual": [True]}}],
}


def setup_study(tmp: Path, n_trials: int | None, seed: int = 0):
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house while small bird sang".split()
    docs = tmp / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))}) + "\n")
    base = {
        "data": {"path": str(docs), "block_size": 16},
        "train": {"batch_size": 4, "eval_batches": 4},
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2},
    }
    run = tmp / "run"
    run.mkdir()
    ctx = SearchContext(
        run_dir=str(run),
        base_config=base,
        space=parse_space(SPACE).to_spec(),
        fidelity=plan_fidelity(0, TPS, max_tokens=8 * TPS).to_dict(),
        sampler="random",
        pruner="none",
        seed=seed,
        n_trials=n_trials,
    )
    url = storage_url(None, run)
    study = create_or_load(open_storage(url), "evo", 1)
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    return run, url, ctx, prepare_search_data(base)


def val_loss(model, data, cfg) -> float:
    return evaluate_loss(model, fixed_val_batches(data.prepared.val, cfg, 64), torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def evo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evo")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMFORGE_CACHE", str(tmp / "cache"))
    run, url, ctx, data = setup_study(tmp, n_trials=8)
    n = run_evolution("evo", url, data=data, population=3, sample=2, increment_tokens=INCREMENT)
    study = optuna.load_study(study_name="evo", storage=open_storage(url))
    yield run, study, data, n
    mp.undo()


# ----------------------------------------------------------------------------------------- the search
def test_initial_population_then_children(evo):
    run, study, _, n = evo
    trials = study.get_trials()
    assert n == 8 and len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all("parent" not in t.user_attrs for t in trials[:3])  # random members until the population is full
    for t in trials[3:]:
        ua = t.user_attrs
        assert {"parent", "mutation", "mutation_spec", "generation", "tokens_offset", "run_dir"} <= set(ua)
        assert ua["mutation"].startswith(ua["mutation_spec"]["op"] + "(")
        parent = trials[ua["parent"]]
        assert ua["generation"] == parent.user_attrs.get("generation", 0) + 1
        assert ua["run_dir"] == f"trials/{t.number:04d}"


def test_parents_come_from_the_population_and_win_their_tournament(evo):
    """Regularized evolution: the parent is one of the 3 most recent finished members at the child's birth,
    and, being the best of 2 drawn among 3, never the worst of them."""
    _, study, _, _ = evo
    trials = study.get_trials()
    for child in trials[3:]:
        population = [t for t in trials if t.number < child.number][-3:]
        parent = trials[child.user_attrs["parent"]]
        assert parent in population
        assert parent.value < max(t.value for t in population) or len({t.value for t in population}) == 1


def test_children_start_from_their_parents_trained_weights(evo):
    """Re-creating a child from its parent's best checkpoint and its recorded mutation gives, for the
    function-preserving operators, exactly the parent's validation loss (the loop's own evaluation)."""
    run, study, data, _ = evo
    trials = study.get_trials()
    checked = 0
    for child in trials[3:]:
        spec = child.user_attrs["mutation_spec"]
        if spec["op"] not in ("add_layer", "widen", "lr"):
            continue
        parent = trials[child.user_attrs["parent"]]
        model, _, cfg = load_model(run / parent.user_attrs["run_dir"] / "best")
        mutated, _ = apply_mutation(model, cfg, spec)
        assert val_loss(mutated.eval(), data, cfg) == pytest.approx(parent.value, abs=1e-4)
        checked += 1
    assert checked  # the run is seeded: it has such children
    # and the operators explicitly, on the first member
    first = trials[0]
    model, _, cfg = load_model(run / first.user_attrs["run_dir"] / "best")
    for spec in (
        {"op": "add_layer", "args": {"index": model.config.n_layer}, "seed": 1},
        {"op": "widen", "args": {"factor": 2.0}, "seed": 2},
        {"op": "lr", "args": {"factor": 2.0}},
    ):
        mutated, raw = apply_mutation(model, cfg, spec)
        again, _ = apply_mutation(model, cfg, spec)
        for (name, a), (_, b) in zip(mutated.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), name  # deterministic given the spec's seed
        assert val_loss(mutated.eval(), data, cfg) == pytest.approx(first.value, abs=1e-4)
    assert raw["optim"]["lr"] == pytest.approx(2 * cfg.optim.lr)


def test_children_tokens_continue_their_lineage(evo):
    run, study, _, _ = evo
    trials = study.get_trials()
    for child in trials[3:]:
        parent = trials[child.user_attrs["parent"]]
        best_meta = json.loads((run / parent.user_attrs["run_dir"] / "best" / "meta.json").read_text())
        offset = parent.user_attrs.get("tokens_offset", 0) + best_meta["tokens"]
        assert child.user_attrs["tokens_offset"] == offset
        assert child.user_attrs["tokens_trained"] == INCREMENT
        assert child.user_attrs["tokens"] == offset + INCREMENT
        assert max(child.intermediate_values) == offset + INCREMENT
        assert (run / child.user_attrs["run_dir"] / "best" / "COMPLETE").is_file()


def test_children_record_their_config_as_params(evo):
    run, study, _, _ = evo
    for child in study.get_trials()[3:]:
        cfg = load_model(run / child.user_attrs["run_dir"] / "best")[2]
        assert child.params["model.family"] == cfg.model.family
        assert child.params["model.n_layer"] == cfg.model.n_layer
        assert child.params["optim.lr"] == pytest.approx(cfg.optim.lr)
        assert child.user_attrs["params"] == sum(
            p.numel() for p in load_model(run / child.user_attrs["run_dir"] / "best")[0].parameters()
        )


def test_report_shows_the_lineage(evo):
    run, study, _, _ = evo
    html = build_report(run, sample=False).read_text()
    assert (run / "figures" / "lineage.png").is_file()
    child = study.get_trials()[3]
    assert f"{child.user_attrs['mutation']} of {child.user_attrs['parent']}" in html


# -------------------------------------------------------------------------------------- resumption
def test_an_interrupted_child_is_retried_with_the_same_parent_and_mutation(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    run, url, _, data = setup_study(tmp_path, n_trials=None, seed=5)
    study = optuna.load_study(study_name="evo", storage=open_storage(url))

    def interrupt() -> None:  # Ctrl-C while a child trains
        if any(t.state == TrialState.RUNNING and "mutation_spec" in t.user_attrs for t in study.get_trials()):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_evolution("evo", url, data=data, population=2, sample=2, increment_tokens=INCREMENT, hook=interrupt)
    trials = study.get_trials()
    failed, retry = trials[2], trials[3]
    assert failed.state == TrialState.FAIL and failed.user_attrs["interrupted"]
    assert retry.state == TrialState.WAITING
    assert run_evolution("evo", url, data=data, population=2, sample=2, increment_tokens=INCREMENT, max_trials=1) == 1
    retry = study.get_trials()[3]
    assert retry.state == TrialState.COMPLETE
    for key in ("parent", "mutation", "mutation_spec", "run_dir"):
        assert retry.user_attrs[key] == failed.user_attrs[key], key
    assert retry.user_attrs["tokens_trained"] == INCREMENT


def test_option_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    run, url, ctx, data = setup_study(tmp_path, n_trials=1)
    with pytest.raises(SearchError, match="population"):
        run_evolution("evo", url, data=data, population=1)
    with pytest.raises(SearchError, match="sample"):
        run_evolution("evo", url, data=data, population=3, sample=4)
    study = optuna.load_study(study_name="evo", storage=open_storage(url))
    study.set_user_attr(CONTEXT_ATTR, {**ctx.to_dict(), "cv": 3})
    with pytest.raises(SearchError, match="--cv"):
        run_evolution("evo", url, data=data)


# ------------------------------------------------------------------------------------- study params
def test_child_params_widen_ranges_and_leave_out_foreign_choices():
    space = parse_space(
        {
            "params": {
                "model.family": ["gru"],
                "model.n_layer": {"int": [1, 4]},
                "optim.lr": {"float": [1e-3, 1e-2], "log": True},
                "model.d_model": [16, 32],
            },
            "conditional": [{"when": {"model.family": "gru"}, "params": {"model.residual": [True, False]}}],
        }
    )
    cfg = {"model": {"family": "gru", "n_layer": 6, "d_model": 24, "residual": True}, "optim": {"lr": 0.05}}
    params, dists, values = child_params(space, cfg)
    assert params == {"model.family": "gru", "model.n_layer": 6, "optim.lr": 0.05, "model.residual": True}
    assert dists["model.n_layer"] == IntDistribution(1, 6)
    assert dists["optim.lr"] == FloatDistribution(1e-3, 0.05, log=True)
    assert dists["model.residual"] == CategoricalDistribution([True, False])
    assert values["model.d_model"] == 24 and "model.d_model" not in params
    # Optuna accepts such a trial next to ones with the space's own ranges
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=1.0))
    inside, dists2, _ = child_params(space, {"model": {**cfg["model"], "n_layer": 2}, "optim": {"lr": 0.005}})
    assert dists2["model.n_layer"] == IntDistribution(1, 4) and inside["model.n_layer"] == 2
    study.add_trial(optuna.trial.create_trial(params=inside, distributions=dists2, value=2.0))
