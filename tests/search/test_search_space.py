"""Search spaces: YAML parsing, conditionals, Optuna naming, grid enumeration, applying values to a config."""

from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest

from lmforge.config import build_config
from lmforge.search.space import (
    SearchSpace,
    SpaceError,
    apply_values,
    load_space,
    parse_space,
    repair_config,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "params": {
        "model.family": ["transformer", "gru"],
        "optim.lr": {"float": [1e-4, 1e-2], "log": True, "grid": [1e-3, 3e-3]},
        "model.d_model": {"int": [16, 64], "step": 16},
    },
    "conditional": [
        {"when": {"model.family": "transformer"}, "params": {"model.n_head": [2, 4], "model.n_layer": {"int": [1, 4]}}},
        {"when": {"model.family": ["gru"]}, "params": {"model.residual": [True, False], "model.n_layer": [1, 2]}},
    ],
    "fixed": {"train.batch_size": 4},
}


def _study() -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


def test_parse_kinds_and_describe():
    space = parse_space(SPACE)
    by_path = {d.path: d for d in space.blocks[0].dists}
    assert by_path["model.family"].kind == "categorical"
    assert by_path["optim.lr"].kind == "float" and by_path["optim.lr"].log
    assert by_path["model.d_model"].kind == "int" and by_path["model.d_model"].step == 16
    assert space.blocks[0].fixed == {"train.batch_size": 4}
    assert space.conditional
    assert "when model.family=transformer" in space.describe()


def test_shorthand_without_sections_is_params():
    space = parse_space({"optim.lr": [1e-3, 2e-3], "train.batch_size": 8})
    assert [d.path for d in space.dists] == ["optim.lr"]
    assert space.blocks[0].fixed == {"train.batch_size": 8}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"optim.lrr": [1]}, "optim.lrr"),
        ({"lr": [1]}, "'lr' is not a config path"),
        ({"optim.lr": {"float": [1e-2, 1e-4]}}, "above high"),
        ({"optim.lr": {"float": [0, 1], "log": True}}, "log range needs low > 0"),
        ({"optim.lr": {"float": [1e-3, 1e-2], "grid": [1.0]}}, "within"),
        ({"model.n_layer": {"int": [1.5, 3]}}, "integers"),
        ({"model.n_layer": {"int": [1, 3], "foo": 1}}, "unknown option"),
        ({"model.n_layer": []}, "non-empty"),
        (
            {"params": {"model.n_layer": [1]}, "conditional": [{"when": {"model.family": "lstm"}, "params": {}}]},
            "not sampled or fixed before",
        ),
        (
            {
                "params": {"model.family": ["gru"], "model.n_layer": [1]},
                "conditional": [{"when": {"model.family": "gru"}, "params": {"model.n_layer": [2]}}],
            },
            "both unconditionally and in a conditional block",
        ),
        ({"params": {}, "bogus": {}}, "unknown section"),
    ],
)
def test_errors_name_the_problem(raw, needle):
    with pytest.raises(SpaceError) as info:
        parse_space(raw, source="s.yaml")
    assert needle in str(info.value)
    assert "s.yaml" in str(info.value)


def test_suggest_follows_conditions_with_real_optuna_trials():
    space = parse_space(SPACE)
    study = _study()
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        fam = values["model.family"]
        seen.add(fam)
        assert values["train.batch_size"] == 4
        if fam == "transformer":
            assert values["model.n_head"] in (2, 4) and 1 <= values["model.n_layer"] <= 4
            assert "model.residual" not in values
        else:
            assert "model.n_head" not in values
            assert values["model.n_layer"] in (1, 2) and values["model.residual"] in (True, False)
        assert values["model.d_model"] in (16, 32, 48, 64)
        assert 1e-4 <= values["optim.lr"] <= 1e-2
        # the inverse mapping from the stored params gives the same values
        assert space.values_from_params(study.trials[-1].params) == values
    assert seen == {"transformer", "gru"}


def test_same_path_with_different_kinds_gets_distinct_optuna_names():
    space = parse_space(SPACE)
    names = {d.name for d in space.dists if d.path == "model.n_layer"}
    # an int range and a categorical list cannot share one Optuna name
    assert names == {"model.n_layer", "model.n_layer|model.family=gru"}


def test_overlapping_conditions_are_refused_when_sampling():
    space = parse_space(
        {
            "params": {"model.family": ["gru"]},
            "conditional": [
                {"when": {"model.family": "gru"}, "params": {"model.d_model": [16]}},
                {"when": {"model.family": ["gru", "lstm"]}, "params": {"model.d_model": [32]}},
            ],
        }
    )
    with pytest.raises(SpaceError, match="two blocks"):
        space.suggest(_study().ask())


def test_grid_matches_brute_force_enumeration():
    space = parse_space(SPACE)
    grid = space.grid()
    expected = []
    for fam, lr, d in itertools.product(["transformer", "gru"], [1e-3, 3e-3], [16, 32, 48, 64]):
        base = {"model.family": fam, "optim.lr": lr, "model.d_model": d}
        if fam == "transformer":
            for h, n in itertools.product([2, 4], [1, 2, 3, 4]):
                expected.append({**base, "model.n_head": h, "model.n_layer": n})
        else:
            for r, n in itertools.product([True, False], [1, 2]):
                expected.append({**base, "model.residual": r, "model.n_layer|model.family=gru": n})
    key = lambda p: sorted((k, repr(v)) for k, v in p.items())  # noqa: E731
    assert sorted(map(key, grid)) == sorted(map(key, expected))


def test_grid_needs_listed_values_for_float_ranges():
    space = parse_space({"optim.lr": {"float": [1e-4, 1e-2]}})
    with pytest.raises(SpaceError, match="grid"):
        space.grid()


def test_restrict_drops_paths_the_user_fixed():
    space = parse_space(SPACE).restrict({"optim.lr", "train.batch_size"})
    assert "optim.lr" not in space.paths() and "train.batch_size" not in space.paths()


def test_spec_round_trip():
    space = parse_space(SPACE)
    again = parse_space(space.to_spec())
    assert [(d.name, d.kind, d.choices, d.low, d.high, d.log, d.step, d.grid) for d in again.dists] == [
        (d.name, d.kind, d.choices, d.low, d.high, d.log, d.step, d.grid) for d in space.dists
    ]
    assert again.grid() == space.grid()


def test_apply_values_switches_family_cleanly():
    base = {"model": {"family": "transformer", "n_head": 8, "d_model": 64}}
    raw = apply_values(base, {"model.family": "gru", "model.d_model": 32, "optim.lr": 0.01})
    cfg = build_config(raw)  # the transformer-only n_head is gone, or validation would fail
    assert cfg.model.family == "gru" and cfg.model.d_model == 32 and cfg.optim.lr == 0.01
    assert base["model"]["n_head"] == 8  # the base is not modified
    # options both families have survive the switch (a user's fixed width applies to every family)
    kept = build_config(apply_values({"model": {"n_head": 2, "d_model": 24, "n_layer": 1}}, {"model.family": "lstm"}))
    assert (kept.model.family, kept.model.d_model, kept.model.n_layer) == ("lstm", 24, 1)


def test_repair_config_picks_a_valid_head_count():
    raw = {"model": {"family": "transformer", "d_model": 48, "n_head": 5, "position": "rope"}}
    notes = repair_config(raw)
    # brute force: the largest n <= 5 dividing 48 with an even head size
    expected = max(n for n in range(1, 6) if 48 % n == 0 and (48 // n) % 2 == 0)
    assert raw["model"]["n_head"] == expected and notes
    assert repair_config({"model": {"family": "gru", "d_model": 48}}) == []


def test_default_space_samples_valid_configs():
    space = load_space()
    assert isinstance(space, SearchSpace) and space.conditional
    study = _study()
    families = set()
    rng = random.Random(0)
    for _ in range(40):
        values = space.suggest(study.ask())
        raw = apply_values({"data": {"block_size": rng.choice([16, 32])}}, values)
        repair_config(raw)
        cfg = build_config(raw)
        families.add(cfg.model.family)
        assert math.isfinite(cfg.optim.lr)
    assert families == {"transformer", "gru", "lstm", "rcnn"}


def test_start_points_are_moved_into_the_space_and_tried_first():
    raw = dict(SPACE, start=[
        {"model.family": "gru", "optim.lr": 0.5, "model.d_model": 100, "model.n_layer": 2, "model.residual": True},
        {"model.family": "transformer", "model.n_head": 3, "model.n_layer": 9},
        {"model.family": "gru", "optim.lr": 0.5, "model.d_model": 100, "model.n_layer": 2, "model.residual": True},
        {"train.seed": 3},  # nothing the space searches: no start point
    ])
    space = parse_space(raw)
    starts = space.start_params()
    assert starts == [
        # lr and d_model clipped to their ranges, the gru block's values kept
        {"model.family": "gru", "optim.lr": 1e-2, "model.d_model": 64, "model.residual": True,
         "model.n_layer|model.family=gru": 2},
        # n_head 3 -> the nearest choice (the lower on a tie); n_layer 9 -> the range's top
        {"model.family": "transformer", "model.n_head": 2, "model.n_layer": 4},
    ]
    study = _study()
    for p in starts:
        study.enqueue_trial(p)
    first = [space.suggest(study.ask()) for _ in range(2)]
    assert first[0]["model.family"] == "gru" and first[0]["optim.lr"] == 1e-2 and first[0]["model.residual"] is True
    assert first[1]["model.family"] == "transformer" and first[1]["model.n_layer"] == 4
    assert "model.d_model" in first[1]  # left out by the start point: sampled
    # narrowing the space narrows the start points; the spec keeps them; user-fixed paths leave them
    assert parse_space(space.to_spec()).start_params() == starts
    assert all("optim.lr" not in p for p in space.restrict({"optim.lr"}).start_params())


def test_start_points_must_be_plain_values():
    with pytest.raises(SpaceError, match=r"start\[0\].optim.lr"):
        parse_space(dict(SPACE, start=[{"optim.lr": [1e-3, 2e-3]}]))
    with pytest.raises(SpaceError, match="bogus"):
        parse_space(dict(SPACE, start=[{"model.bogus": 1}]))


def test_short_runs_do_not_search_dropout():
    from lmforge.search.sizing import fix_regularization

    space = load_space()
    assert "model.dropout" in {d.path for d in space.dists}
    same, notes = fix_regularization(space, epochs=5.0)
    assert same is space and notes == []
    short, notes = fix_regularization(space, epochs=0.7)
    assert "model.dropout" not in {d.path for d in short.dists} and "0.7 passes" in notes[0]
    values = short.suggest(_study().ask())
    assert values["model.dropout"] == 0.0 and short.starts == space.starts


def test_default_space_start_points_are_derived_and_it_searches_what_matters():
    """No start points picked on a benchmark corpus: one per family, written by benchmarks/derive_priors.py
    (its marker and the corpora it read precede them), none of the old Tiny-Shakespeare-measured ones (lr 8e-3
    / 5e-3, width-128 rcnn); the step shape, context, warm-up and optimizer are searched; trials train
    warmup-stable (constant after the warm-up) so the final training decays once."""
    from lmforge.search.space import DEFAULT_SPACE_FILE

    text = DEFAULT_SPACE_FILE.read_text(encoding="utf-8")
    marker = "# ---- start points: written by benchmarks/derive_priors.py"
    assert marker in text and text.index(marker) < text.index("\nstart:")
    header = text[text.index(marker) : text.index("\nstart:")]
    for corpus in ("licenses", "man", "changelogs", "perlpod"):
        assert corpus in header
    space = load_space()
    starts = space.start_params()
    assert sorted(s["model.family"] for s in starts) == ["gru", "lstm", "rcnn", "transformer"]
    assert not {s["optim.lr"] for s in starts} & {8.0e-3, 5.0e-3}
    paths = {d.path for d in space.dists}
    assert {"train.batch_size", "data.block_size", "schedule.warmup_steps", "optim.name", "optim.muon_lr"} <= paths
    assert space.blocks[0].fixed["schedule.name"] == "constant"


def test_default_space_has_a_default_grid_of_valid_configs():
    from lmforge.search.budget import Fidelity
    from lmforge.search.context import trial_config

    space = load_space()
    grid = space.grid()
    assert 1 < len(grid) <= 64
    assert {p["model.family"] for p in grid} == {"transformer", "gru", "lstm", "rcnn"}
    fid = Fidelity(min_tokens=2048, max_tokens=18432, eta=3, rungs=2, tokens_per_step=1536)
    study = _study()
    for params in grid:
        study.enqueue_trial(params)
        values = space.suggest(study.ask())
        assert {k: values[k] for k in ("model.family", "optim.lr")} == {
            "model.family": params["model.family"],
            "optim.lr": params["optim.lr"],
        }
        cfg, _ = trial_config({}, values, fid, None)
        assert cfg.schedule.name == "constant" and cfg.optim.name == "adamw"
