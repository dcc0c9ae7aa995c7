"""The final step: one learning-rate decay at the end (warmup-stable trials, a wsd final continuing the last
stable checkpoint), and the choice by predicted final loss re-scored on the whole validation split."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from lmforge.runs import read_metrics
from lmforge.search.curves import predict
from lmforge.search.pipeline import run_pipeline
from support.search import TPS, load_study, options

SPACE = """
params:
  optim.lr: {float: [3.0e-3, 1.0e-2], log: true}
fixed:
  schedule.name: constant
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("final")
    os.environ["LMFORGE_CACHE"] = str(tmp / "cache")
    opts = options(tmp, SPACE, budget="12ktok", sampler="random", pruner="none", n_trials=3, trial_tokens=16 * TPS)
    run_pipeline(opts)
    return Path(opts.out)


def _lrs(path: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["lr"])) for r in read_metrics(path) if r.get("lr") is not None]


@pytest.mark.slow
def test_final_lr_never_jumps_up_after_a_decay(run):
    state = json.loads((run / "pipeline.json").read_text())
    plan = state["steps"]["final"]["plan"]
    assert plan["schedule"]["name"] == "wsd" and plan["from"]  # continues the trial's stable checkpoint
    trial_dir = run / "trials" / f"{plan['trial']:04d}"
    trial, final = _lrs(trial_dir), _lrs(run / "final")
    assert trial and len(final) >= 5
    assert [s for s, _ in final][0] > trial[-1][0]  # the final goes on from the trial's last step
    peak = trial[-1][1]
    assert all(lr == pytest.approx(peak) for _, lr in trial)  # trials stay in their stable phase
    seq = [lr for _, lr in trial + final]
    assert all(b <= a + 1e-12 for a, b in zip(seq, seq[1:], strict=False)), seq  # never up
    assert final[-1][1] < 0.5 * peak  # and it did decay, once, at the end
    assert sum(1 for a, b in zip(seq, seq[1:], strict=False) if b < a - 1e-12) >= 2


@pytest.mark.slow
def test_final_choice_is_recorded_with_predictions_and_full_split_scores(run):
    plan = json.loads((run / "pipeline.json").read_text())["steps"]["final"]["plan"]
    choice = plan["choice"]
    assert choice and choice[0]["trial"] == plan["trial"]
    study = load_study(run)
    assert len(choice) == len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")])
    for c in choice:
        assert c["full_val_loss"] is not None and math.isfinite(c["full_val_loss"])
        assert c["target_tokens"] > c["tokens"]
        # the recorded curve prediction is the curve's, recomputed independently from the trial's metrics
        recs = [r for r in read_metrics(run / "trials" / f"{c['trial']:04d}") if r.get("val_loss") is not None]
        p = predict([r["tokens"] for r in recs], [r["val_loss"] for r in recs], c["target_tokens"])
        assert c["curve_loss"] == pytest.approx(p.mean, abs=1e-4)
        if c["surface_loss"] is not None:  # combined with the run's loss surface: between the two
            lo, hi = sorted((c["curve_loss"], c["surface_loss"]))
            assert lo - 1e-4 <= c["predicted_loss"] <= hi + 1e-4
        else:
            assert c["predicted_loss"] == pytest.approx(p.mean, abs=1e-4)
    assert "fitted" in plan["sizing"]
    scores = [c["score"] for c in choice]
    assert scores == sorted(scores)


def test_choice_prefers_the_late_winner(tmp_path):
    """choose_final on a study whose trials' metrics are synthetic crossing curves: the slow one wins."""
    import optuna

    from lmforge.search.context import SearchContext
    from lmforge.search.final import candidates

    t = np.arange(1, 10) * 10_000
    curves = {"fast": 1.9 + 1.5 * (t / 1e4) ** -1.0, "slow": 1.3 + 2.5 * (t / 1e4) ** -0.5}
    study = optuna.create_study()
    for i, (name, ys) in enumerate(curves.items()):
        d = tmp_path / "trials" / f"{i:04d}"
        (d / "checkpoints" / "step-0000009").mkdir(parents=True)
        (d / "checkpoints" / "step-0000009" / "COMPLETE").write_text("")
        (d / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": k + 1, "tokens": int(x), "val_loss": float(y)}) + "\n"
                for k, (x, y) in enumerate(zip(t, ys, strict=True))
            )
        )
        tr = study.ask()
        tr.set_user_attr("run_dir", f"trials/{i:04d}")
        tr.set_user_attr("name", name)
        study.tell(tr, float(ys[-1]))
    ctx = SearchContext(run_dir=str(tmp_path), base_config={}, space={}, fidelity={})
    cands = candidates(study, ctx, allowance=270_000, budget_kind="tokens", ref_tps=1.0)
    assert sorted(cands, key=lambda c: c.score)[0].trial.user_attrs["name"] == "slow"
    # the slow model ran over its time share (FAIL, curve and checkpoint kept): still a candidate; a
    # trial that failed otherwise is not
    for reason, kept in (("exceeded its time share of 9s at 90,000 of 120,000 tokens", True), ("diverged", False)):
        study2 = optuna.create_study()
        tr = study2.ask()
        tr.set_user_attr("run_dir", "trials/0001")
        tr.set_user_attr("fail_reason", reason)
        study2.tell(tr, state=optuna.trial.TrialState.FAIL)
        got = candidates(study2, ctx, allowance=270_000, budget_kind="tokens", ref_tps=1.0)
        assert len(got) == int(kept)
    assert min(cands, key=lambda c: c.trial.values[0]).trial.user_attrs["name"] == "fast"  # raw loss disagrees


def test_a_final_shorter_than_the_trials_warm_up_still_trains(tmp_path):
    """A trial stopped during its warm-up (32 steps, stopped at 4), continued by a final of 8 steps: the
    final must not be refused for a warm-up longer than its schedule (it was, and crashed a benchmark)."""
    from lmforge.config import apply_overrides, build_config
    from lmforge.search.context import SearchContext, prepare_search_data
    from lmforge.search.final import plan_final, train_final
    from lmforge.train.loop import train
    from support.search import BASE, write_docs

    base = apply_overrides({}, ["--data.path", str(write_docs(tmp_path / "docs.jsonl")), *BASE])
    data = prepare_search_data(base, 0, 0)
    trial_raw = apply_overrides(base, ["--schedule.name", "constant", "--schedule.warmup_steps", "32",
                                       "--train.max_steps", "4", "--train.eval_interval", "2"])  # fmt: skip
    src = tmp_path / "trial"
    train(build_config(trial_raw), src, data=data.prepared, verbose=False)
    plan = plan_final(src, 0, cv=0, allowance=8 * TPS, budget_kind="tokens", reference_tokens_per_s=1e4)
    assert plan["schedule"]["name"] == "wsd" and plan["max_steps"] == 12
    ctx = SearchContext(run_dir=str(tmp_path), base_config=base, space={}, fidelity={})
    res = train_final(plan, src, tmp_path / "final", ctx, data, False)
    assert res.step == 12 and math.isfinite(res.best_val_loss)
    lrs = _lrs(tmp_path / "final")
    assert lrs[-1][1] < max(lr for _, lr in lrs)  # it still decays at its end
