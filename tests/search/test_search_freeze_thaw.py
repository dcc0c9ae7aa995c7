"""Freeze-thaw: a stopped trial worth more per second than a new one is enqueued again in its own run
directory, and its training continues bit for bit as if it had never been paused."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from lmforge.config import apply_overrides, build_config
from lmforge.runs import list_checkpoints, load_checkpoint
from lmforge.search.freeze_thaw import THAW_ATTR, enqueue_thaw, expected_improvement, thaw_choice
from lmforge.search.study import original_number
from lmforge.train.loop import Callback, train
from support.search import BASE, write_docs

T0 = 1000


def test_expected_improvement_matches_monte_carlo():
    rng = np.random.default_rng(0)
    draws = rng.normal(2.0, 0.3, 400_000)
    assert expected_improvement(1.9, 2.0, 0.3) == pytest.approx(np.maximum(0, 1.9 - draws).mean(), abs=2e-3)
    assert expected_improvement(1.0, 2.0, 0.0) == 0.0


def _add(study, run_dir, number, curve, state, duration=10.0, stopped=None):
    d = run_dir / "trials" / f"{number:04d}" / "checkpoints" / "step-0000001"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text("")
    attrs = {"run_dir": f"trials/{number:04d}", "duration_s": duration}
    if stopped:
        attrs["stopped"] = stopped
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=curve[max(curve)] if state == TrialState.COMPLETE else None,
            params={"x": number / 10},
            distributions={"x": FloatDistribution(0.0, 1.0)},
            intermediate_values=curve,
            user_attrs=attrs,
        )
    )


def test_a_stopped_late_winner_is_thawed_into_its_own_directory(tmp_path):
    study = optuna.create_study()
    steps = np.arange(1, 10) * T0
    flat = {int(s): float(2.2 + 1.0 * (s / T0) ** -1.5) for s in steps}
    _add(study, tmp_path, 0, flat, TrialState.COMPLETE)
    _add(study, tmp_path, 1, {k: v + 0.3 for k, v in flat.items()}, TrialState.COMPLETE)
    # stopped at 3k tokens, but falling steeply toward a much lower loss
    slow = {int(s): float(1.2 + 2.5 * (s / T0) ** -0.5) for s in steps[:3]}
    _add(study, tmp_path, 2, slow, TrialState.PRUNED, duration=3.0)
    _add(study, tmp_path, 3, slow, TrialState.PRUNED, duration=3.0, stopped="search budget exhausted at 3,000 tokens")
    trials = study.get_trials()
    chosen, info = thaw_choice(trials, tmp_path, max_tokens=9 * T0)
    assert chosen is not None and chosen.number == 2 and info["rate"] > info["rate_new"]
    enqueue_thaw(study, chosen)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert original_number(waiting) == 2 and waiting.user_attrs[THAW_ATTR] == 2
    assert waiting.user_attrs["run_dir"] == "trials/0002" and waiting.params == chosen.params
    # thawed once at most; a hopeless stopped trial is left frozen
    assert thaw_choice(study.get_trials(), tmp_path, max_tokens=9 * T0)[0] is None
    bad = optuna.create_study()
    _add(bad, tmp_path / "b", 0, flat, TrialState.COMPLETE)
    _add(bad, tmp_path / "b", 1, {k: v + 0.2 for k, v in flat.items()}, TrialState.COMPLETE)
    _add(bad, tmp_path / "b", 2, {k: v + 1.0 for k, v in list(flat.items())[:3]}, TrialState.PRUNED)
    assert thaw_choice(bad.get_trials(), tmp_path / "b", max_tokens=9 * T0)[0] is None


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_eval(self, state, record) -> bool:
        return state.step >= self.step


def test_a_thawed_trial_continues_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    docs = write_docs(tmp_path / "docs.jsonl")
    raw = apply_overrides({}, ["--data.path", str(docs), *BASE, "--model.family", "gru", "--train.max_steps", "12",
                               "--train.eval_interval", "3", "--train.keep_last", "1", "--train.resume", "auto",
                               "--train.deterministic", "true", "--schedule.name", "constant",
                               "--schedule.warmup_steps", "2", "--train.progress", "false"])  # fmt: skip
    cfg = build_config(raw)
    once = train(cfg, tmp_path / "once", verbose=False)
    stopped = train(cfg, tmp_path / "paused", callbacks=[_StopAt(6)], verbose=False)  # frozen at a rung
    assert stopped.step == 6 and stopped.stop_reason == "callback"
    thawed = train(cfg, tmp_path / "paused", verbose=False)  # thawed: the same directory, resume auto
    assert thawed.step == once.step == 12
    a = load_checkpoint(list_checkpoints(tmp_path / "once")[-1]).state_dict
    b = load_checkpoint(list_checkpoints(tmp_path / "paused")[-1]).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert thawed.best_val_loss == once.best_val_loss
