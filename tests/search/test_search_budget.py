"""Budgets: parsing, the split between steps, the ledger, the fidelity plan."""

from __future__ import annotations

import math

import pytest

from lmforge.search.budget import (
    Budget,
    BudgetError,
    Fidelity,
    Ledger,
    parse_budget,
    parse_bytes,
    parse_count,
    plan_fidelity,
    shares,
    split_budget,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", Budget(seconds=600)),
        ("2h", Budget(seconds=7200)),
        ("90s", Budget(seconds=90)),
        ("45", Budget(seconds=45)),
        ("5Mtok", Budget(tokens=5_000_000)),
        ("500ktok", Budget(tokens=500_000)),
        ("1.5Btok", Budget(tokens=1_500_000_000)),
        ("20000 tokens", Budget(tokens=20_000)),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "ten minutes", "-5m", "0s", "5Xtok"])
def test_bad_budget_names_the_option(text):
    with pytest.raises(BudgetError, match="--budget"):
        parse_budget(text)


def test_sizes_and_counts():
    assert parse_bytes("2GB") == 2_000_000_000
    assert parse_bytes("1GiB") == 1024**3
    assert parse_bytes("500MB") == 500_000_000
    assert parse_count("2M") == 2_000_000
    assert parse_count("500k") == 500_000
    with pytest.raises(BudgetError, match="--max-params"):
        parse_count("lots")


def test_short_time_budgets_reserve_time_for_the_evaluation():
    short = split_budget(Budget(seconds=60))
    assert short["evaluate"].seconds == pytest.approx(60 * 0.12)  # capped share
    assert sum(b.seconds for b in short.values()) == pytest.approx(60)
    assert split_budget(Budget(seconds=100))["evaluate"].seconds == pytest.approx(8)


def test_short_time_budgets_give_the_final_training_more():
    share = [shares(Budget(seconds=s))["search"] / shares(Budget(seconds=s))["final"] for s in (60, 120, 600, 1800, 7200)]
    assert share[0] == pytest.approx(0.45 / 0.50) and share[1] == pytest.approx(share[0])
    assert share[1] < share[2] < share[3] == pytest.approx(0.70 / 0.25) and share[4] == pytest.approx(share[3])


def test_split_time_and_tokens():
    t = split_budget(Budget(seconds=2000))
    assert t["search"].seconds == pytest.approx(1400) and t["final"].seconds == pytest.approx(500)
    assert t["evaluate"].seconds == pytest.approx(100) and t["decode"].seconds == 0
    assert sum(b.seconds for b in t.values()) == pytest.approx(2000)
    k = split_budget(Budget(tokens=1000))
    # evaluation trains nothing: its share of a token budget goes to the final training
    assert k["search"].tokens == 700 and k["final"].tokens == 300 and k["evaluate"].tokens == 0
    task = split_budget(Budget(seconds=1000), has_task=True)
    assert task["decode"].seconds > 0 and sum(b.seconds for b in task.values()) == pytest.approx(1000)


def test_ledger_passes_unused_budget_on():
    led = Ledger(Budget(seconds=2000))
    assert led.allowance("search") == pytest.approx(1400)
    led.charge("search", 800)  # the search stopped early
    assert led.allowance("final") == pytest.approx(1900 - 800)
    led.charge("final", 1100)
    assert led.allowance("evaluate") == pytest.approx(100)
    led.charge("evaluate", 160)
    assert led.remaining() == 0 and led.allowance("evaluate") == 0


def test_fidelity_plan_rungs_are_step_multiples():
    fid = plan_fidelity(search_tokens=8 * 27 * 4 * 512, tokens_per_step=512)
    assert fid.rungs == 3 and fid.eta == 3
    assert fid.max_tokens == fid.min_tokens * 27
    assert fid.min_tokens % 512 == 0 and fid.min_tokens // 512 >= 4
    assert [fid.rung_of(fid.min_tokens * 3**k) for k in range(4)] == [0, 1, 2, 3]
    assert fid.rung_of(fid.min_tokens - 1) == -1


def test_fidelity_plan_small_budget_has_fewer_rungs():
    fid = plan_fidelity(search_tokens=8 * 10 * 100, tokens_per_step=100)
    # 10 steps per trial: only one rung of at least 4 steps below it (10 // 3 = 3 < 4 -> no rung)
    assert fid.rungs == 0 and fid.max_tokens == fid.min_tokens == 1000
    forced = plan_fidelity(search_tokens=1e9, tokens_per_step=100, max_tokens=3600)
    assert forced.max_tokens == 3600 and forced.rungs == 2 and forced.min_tokens == 400


def test_fidelity_round_trip():
    fid = Fidelity(min_tokens=100, max_tokens=900, eta=3, rungs=2, tokens_per_step=50)
    assert Fidelity.from_dict(fid.to_dict()) == fid
    assert math.isclose(fid.max_tokens / fid.min_tokens, 9)


def test_throughput_probe_takes_its_fastest_window(monkeypatch):
    """A stall during one window of the probe (another process, a page-cache flush) must not shrink the
    measured speed, which sizes every model of the run: the fastest of three windows counts. A fake clock
    makes it exact: an optimizer step takes 1 ms, except two stalled steps of 250 ms in the first window."""
    import types

    import numpy as np
    import torch

    from lmforge.search import sizing

    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(sizing, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        clock["calls"] += 1
        clock["t"] += 0.25 if clock["calls"] in (2, 3) else 0.001  # call 1 is the warm-up
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    base = {"data": {"block_size": 16}, "train": {"batch_size": 4}}
    tokens = np.random.default_rng(0).integers(0, 30, 5000).astype(np.uint16)
    flops, tok_s = sizing.measure_throughput(base, tokens, 30, seconds=0.6)
    assert tok_s == pytest.approx(4 * 16 / 0.001)  # 64 tokens per 1 ms step, the stall left out
    assert flops > 0


def test_fidelity_plan_aims_for_a_number_of_configurations():
    """Successive halving spends about one first-rung length per rung per configuration: the plan's rungs
    and first-rung length fit about ``configs`` configurations, the longest trial within search / full_trials."""
    tps = 768
    for steps in (500, 1300, 2700, 6500, 26000, 130000):
        fid = plan_fidelity(steps * tps, tps, min_steps=16, configs=64)
        m, r = fid.min_tokens // tps, fid.rungs
        assert m >= 16 and fid.max_tokens == m * 3**r * tps
        assert fid.max_tokens <= max(16, steps / 8) * tps
        if m > 16:  # not held up by the shortest rung: about 64 configurations
            assert 56 <= steps / (m * (1 + r)) <= 72
    # at about 2,700 steps of search the plan of eight full trials fits about 24 configurations; this one 56
    # a budget where no rung fits keeps the single length of the plan without configs
    assert plan_fidelity(300 * tps, tps, min_steps=16, configs=64) == plan_fidelity(300 * tps, tps, min_steps=16)
    old, new = plan_fidelity(2700 * tps, tps, min_steps=16), plan_fidelity(2700 * tps, tps, min_steps=16, configs=64)
    assert 2700 / ((new.min_tokens // tps) * (1 + new.rungs)) > 2 * 2700 / ((old.min_tokens // tps) * (1 + old.rungs))


def test_a_time_budget_whose_plan_has_no_rung_gives_half_its_search_to_the_final(tmp_path, monkeypatch):
    """One-point curves cannot be extrapolated: a plan without rungs keeps NO_RUNG_SEARCH of the search's
    share and moves the rest to the final training; a plan with rungs keeps the budget's shares."""
    from lmforge.config import apply_overrides, build_config
    from lmforge.search import plan as plan_mod
    from lmforge.search.context import prepare_search_data
    from support.search import BASE, write_docs

    base = apply_overrides({}, ["--data.path", str(write_docs(tmp_path / "d.jsonl")), *BASE])
    data = prepare_search_data(base, 0, 0)
    budget = Budget(seconds=90)
    full = Ledger(budget).shares

    def plan(tok_s: float) -> plan_mod.CapacityPlan:
        monkeypatch.setattr(plan_mod.sizing, "measure_throughput", lambda *a, **k: (tok_s * 1e6, tok_s))
        return plan_mod.plan_capacity(base, build_config(base), data, budget, n_jobs=1, trial_tokens=None)

    slow, fast = plan(300.0), plan(300_000.0)
    assert slow.fidelity.rungs == 0 and fast.fidelity.rungs >= 1
    assert fast.split == full
    assert slow.split["search"] == pytest.approx(full["search"] * plan_mod.NO_RUNG_SEARCH)
    assert slow.split["final"] == pytest.approx(full["final"] + full["search"] * (1 - plan_mod.NO_RUNG_SEARCH))
    assert sum(slow.split.values()) == pytest.approx(1.0) and "search_share_cut" in slow.record
    led = Ledger(budget, split=slow.split)  # what the pipeline rebuilds from its state
    assert led.allowance("search") == pytest.approx(90 * slow.split["search"])
