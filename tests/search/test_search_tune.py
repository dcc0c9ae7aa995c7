"""``lmforge tune`` end to end on tiny data: outputs, promotion without retraining, final continuation,
failed trials, cross-validation, several objectives, parallel workers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from lmforge.runs import load_model, read_metrics
from lmforge.search.pipeline import TuneOptions, run_pipeline
from support.search import BASE, TPS, load_study, options, write_docs


def steps_strictly_increasing(run_dir: Path) -> list[dict]:
    recs = read_metrics(run_dir)
    steps = [r["step"] for r in recs]
    tokens = [r["tokens"] for r in recs]
    assert steps == sorted(set(steps)) and tokens == sorted(set(tokens)), steps
    return recs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared machine: one intra-op thread is many times faster than several contending ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the main end-to-end run
ASHA_SPACE = """
params:
  model.family: [transformer, gru]
  optim.lr: {float: [1.0e-3, 3.0e-2], log: true}
"""


@pytest.fixture(scope="module")
def asha_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asha")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMFORGE_CACHE", str(tmp / "cache"))
    opts = options(
        tmp, ASHA_SPACE, budget="8ktok", sampler="random", pruner="asha", n_trials=6, trial_tokens=12 * TPS, seed=3
    )
    summary = run_pipeline(opts)
    yield Path(opts.out), summary
    mp.undo()


def test_outputs_leaderboard_summary_best(asha_run):
    run, summary = asha_run
    assert summary["steps"] == {"search": "done", "final": "done", "decode": "skipped", "evaluate": "done"}
    with open(run / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 == summary["trials"]["total"]
    assert {"rank", "trial", "state", "val_loss", "params", "tokens", "model.family", "optim.lr"} <= set(rows[0])
    assert rows[0]["state"] == "complete"
    assert "optuna-dashboard" in summary["study"]["dashboard"]
    # the tokens of all trials against those of the finished ones, recounted from the metrics files
    study = load_study(run)
    trained = sum(read_metrics(run / t.user_attrs["run_dir"])[-1]["tokens"] for t in study.trials)
    finished = sum(
        read_metrics(run / t.user_attrs["run_dir"])[-1]["tokens"]
        for t in study.trials
        if t.state == TrialState.COMPLETE
    )
    assert summary["tokens"]["search_total"] == trained
    assert summary["tokens"]["finished_trials"] == finished < trained


def test_best_is_loadable_and_test_loss_matches_an_independent_computation(asha_run):
    run, summary = asha_run
    model, tok, cfg = load_model(run / "best")
    from lmforge.config import build_config
    from lmforge.data import prepare_data
    from lmforge.search.splits import holdout_split

    state = json.loads((run / "pipeline.json").read_text())
    study = load_study(run)
    base = study.user_attrs["lmforge"]["base_config"]
    data = prepare_data(build_config(base))
    _, test = holdout_split(data.val, tok.eot_id, state["options"]["seed"])
    # plain cross-entropy over every complete block of the test stream
    T = cfg.data.block_size
    n = (len(test) - 1) // T
    x = torch.tensor(np.stack([test[i * T : i * T + T] for i in range(n)]).astype(np.int64))
    y = torch.tensor(np.stack([test[i * T + 1 : i * T + T + 1] for i in range(n)]).astype(np.int64))
    model.eval()
    with torch.no_grad():
        logits, _ = model(x)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert summary["best"]["test_loss"] == pytest.approx(ref, rel=1e-4)
    assert summary["best"]["params"] == sum(p.numel() for p in model.parameters())


def test_promotion_continues_in_one_run_dir_and_pruned_trials_stop(asha_run):
    run, _ = asha_run
    study = load_study(run)
    fid = study.user_attrs["lmforge"]["fidelity"]
    dirs = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(set(dirs)) == len(dirs)  # one directory per trial: nothing retrained elsewhere
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert complete and pruned
    for t in complete:
        recs = steps_strictly_increasing(run / t.user_attrs["run_dir"])
        # it passed the first rung (a pruning decision) and went on to the full length in the same process
        assert recs[0]["tokens"] <= fid["min_tokens"] and recs[-1]["tokens"] >= fid["max_tokens"]
        assert "resumed_from_tokens" not in t.user_attrs
        assert t.value == pytest.approx(min(r["val_loss"] for r in recs))
    for t in pruned:
        recs = steps_strictly_increasing(run / t.user_attrs["run_dir"])
        assert recs[-1]["tokens"] < fid["max_tokens"]
        assert max(t.intermediate_values) == recs[-1]["tokens"]  # reported at step = tokens


def test_final_training_continues_the_best_trial(asha_run):
    run, summary = asha_run
    state = json.loads((run / "pipeline.json").read_text())
    plan = state["steps"]["final"]["plan"]
    trial_recs = read_metrics(run / "trials" / f"{plan['trial']:04d}")
    final_recs = steps_strictly_increasing(run / "final")
    assert final_recs[0]["step"] > trial_recs[-1]["step"]  # continued, not restarted
    assert plan["from"] and Path(plan["from"]).parent.parent == run / "trials" / f"{plan['trial']:04d}"
    assert summary["best"]["trial"] == plan["trial"]
    best_meta = json.loads((run / "best" / "meta.json").read_text())
    all_vals = [r["val_loss"] for r in trial_recs + final_recs]
    assert best_meta["val_loss"] == pytest.approx(min(all_vals))


# ----------------------------------------------------------------------------------- failing trial
def test_diverging_trial_is_failed_with_reason_and_the_study_goes_on(tmp_path):
    space = """
params:
  optim.lr: [1.0e+30, 3.0e-3]
fixed:
  train.on_bad_steps: stop
"""
    opts = options(tmp_path, space, budget="2ktok", sampler="grid", pruner="none", trial_tokens=4 * TPS)
    summary = run_pipeline(opts)
    study = load_study(Path(opts.out))
    by_lr = {t.params["optim.lr"]: t for t in study.trials}
    bad, good = by_lr[1e30], by_lr[3e-3]
    assert bad.state == TrialState.FAIL and "diverged" in bad.user_attrs["fail_reason"]
    assert good.state == TrialState.COMPLETE and math.isfinite(good.value)
    assert summary["best"]["trial"] == good.number and summary["trials"]["fail"] == 1
    with open(Path(opts.out) / "leaderboard.csv", newline="") as f:
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    assert "diverged" in rows[bad.number]["note"]


# ------------------------------------------------------------------------------------------- cv
def test_cv_score_is_the_mean_of_the_folds(tmp_path):
    opts = options(
        tmp_path, "params:\n  optim.lr: [3.0e-3]\n", budget="2ktok", sampler="grid", cv=2, trial_tokens=4 * TPS
    )
    summary = run_pipeline(opts)
    run = Path(opts.out)
    (t,) = load_study(run).trials
    folds = [min(r["val_loss"] for r in read_metrics(run / "trials" / "0000" / f"fold-{i}")) for i in range(2)]
    assert t.value == pytest.approx(sum(folds) / 2)
    assert summary["pruner"] == "none" and summary["cv"] == 2
    assert (run / "best" / "COMPLETE").exists()


# ------------------------------------------------------------------------------ several objectives
def test_pareto_front_with_nsga2(tmp_path):
    space = "params:\n  model.d_model: [8, 16, 24]\n  optim.lr: {float: [1.0e-3, 1.0e-2], log: true}\n"
    overrides = BASE[:-2]  # without --model.d_model: it is searched here
    opts = options(
        tmp_path,
        space,
        budget="3ktok",
        objectives=["val_loss", "params", "latency"],
        n_trials=4,
        trial_tokens=3 * TPS,
        overrides=overrides,
    )
    summary = run_pipeline(opts)
    study = load_study(Path(opts.out))
    assert summary["sampler"] == "nsga2" and summary["pruner"] == "none"
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # brute-force Pareto front over the three objectives
    front = [
        a.number
        for a in complete
        if not any(
            all(x <= y for x, y in zip(b.values, a.values, strict=True)) and b.values != a.values for b in complete
        )
    ]
    assert sorted(summary["pareto_front"]) == sorted(front)
    with open(Path(opts.out) / "leaderboard.csv", newline="") as f:
        marked = sorted(int(r["trial"]) for r in csv.DictReader(f) if r["pareto"] == "True")
    assert marked == sorted(front)
    assert all(t.values[1] == t.user_attrs["params"] and t.values[2] > 0 for t in complete)


# -------------------------------------------------------------------------------- parallel workers
@pytest.mark.slow
def test_two_worker_processes(tmp_path):
    opts = options(
        tmp_path, ASHA_SPACE, budget="3ktok", sampler="tpe", pruner="none", n_trials=4, n_jobs=2, trial_tokens=3 * TPS
    )
    summary = run_pipeline(opts)
    study = load_study(Path(opts.out))
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2
    assert summary["steps"]["evaluate"] == "done"


def test_bad_options_are_one_line_errors(tmp_path):
    from lmforge.search.study import SearchError

    with pytest.raises(SearchError, match="--objectives"):
        run_pipeline(options(tmp_path, ASHA_SPACE, objectives=["params"]))
    with pytest.raises(SearchError, match="--cv"):
        run_pipeline(options(tmp_path / "b", ASHA_SPACE, cv=1))


def test_optuna_is_not_imported_below_search():
    import subprocess
    import sys

    code = (
        "import sys, lmforge.train.loop, lmforge.predict, lmforge.data, lmforge.models; print('optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert optuna.__version__


def test_max_params_constraint_skips_large_models(tmp_path):
    from lmforge.config import build_config
    from lmforge.models import build_model

    def n_params(d: int) -> int:  # counted on a real model, as a user would
        cfg = build_config({"model": {"d_model": d, "n_layer": 1, "n_head": 4}, "data": {"block_size": 16}})
        return sum(p.numel() for p in build_model(cfg.model, vocab_size=40, max_seq_len=16).parameters())

    limit = (n_params(8) + n_params(32)) // 2
    opts = options(
        tmp_path,
        "params:\n  model.d_model: [8, 32]\n",
        budget="2ktok",
        sampler="grid",
        pruner="none",
        trial_tokens=3 * TPS,
        overrides=BASE[:-2],
        max_params=limit,
    )
    summary = run_pipeline(opts)
    run = Path(opts.out)
    by_d = {t.params["model.d_model"]: t for t in load_study(run).trials}
    big, small = by_d[32], by_d[8]
    assert big.state == TrialState.PRUNED and "--max-params" in big.user_attrs["stopped"]
    assert not read_metrics(run / big.user_attrs["run_dir"])  # never trained
    assert small.state == TrialState.COMPLETE and summary["best"]["trial"] == small.number
    assert summary["best"]["params"] <= limit


def test_out_of_memory_and_time_share_failures_are_recorded(tmp_path, monkeypatch):
    import lmforge.search.objective as objective
    import lmforge.train.loop as loop

    real = loop.train

    def flaky_train(cfg, out, **kw):  # stands in for a GPU running out of memory / a trial running too long
        if cfg.optim.lr == 1e-3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cfg.optim.lr == 2e-3:
            return loop.TrainResult(
                out_dir=Path(out),
                step=1,
                tokens=TPS,
                elapsed_s=9.0,
                best_val_loss=3.0,
                best_step=1,
                final_val_loss=3.0,
                stop_reason="max_time",
                num_params=1,
                history=[],
            )
        return real(cfg, out, **kw)

    monkeypatch.setattr(objective, "train", flaky_train)  # the trial's training loop
    opts = options(
        tmp_path,
        "params:\n  optim.lr: [1.0e-3, 2.0e-3, 3.0e-3]\n",
        budget="2ktok",
        sampler="grid",
        pruner="none",
        trial_tokens=3 * TPS,
        overrides=[*BASE, "--train.max_time", "8"],
    )
    summary = run_pipeline(opts)
    by_lr = {t.params["optim.lr"]: t for t in load_study(Path(opts.out)).trials}
    assert by_lr[1e-3].state == TrialState.FAIL
    assert by_lr[1e-3].user_attrs["fail_reason"].startswith("out of memory")
    assert by_lr[2e-3].state == TrialState.FAIL and "time share" in by_lr[2e-3].user_attrs["fail_reason"]
    assert by_lr[3e-3].state == TrialState.COMPLETE
    assert summary["best"]["trial"] == by_lr[3e-3].number


@pytest.mark.slow
def test_time_budget_covers_every_step_with_the_default_space(tmp_path):
    import time

    tmp_path.mkdir(exist_ok=True)
    opts = TuneOptions(
        out=str(tmp_path / "run"),
        data=str(write_docs(tmp_path / "docs.jsonl", n=400)),
        budget="40s",
        overrides=["--data.block_size", "32", "--train.batch_size", "8"],
        verbose=False,
    )
    t0 = time.monotonic()
    summary = run_pipeline(opts)
    wall = time.monotonic() - t0
    assert wall < 40 * 1.3 + 10, wall  # the budget holds for all steps (the last evaluation may run over)
    spent = summary["budget"]["spent_s"]
    assert spent["search"] > 0 and spent["final"] > 0 and spent["evaluate"] > 0
    assert summary["budget"]["shares"]["search"] == pytest.approx(0.45 * 0.88 / 0.95)  # 12% kept for evaluation
    state = json.loads((Path(opts.out) / "pipeline.json").read_text())
    assert state["plan"]["flops_per_s"] > 0 and state["plan"]["param_cap"] > 0
    study = load_study(Path(opts.out))
    cap = state["plan"]["param_cap"]
    trained = [t for t in study.trials if t.user_attrs.get("tokens")]
    assert trained and all(t.user_attrs["params"] <= 1.5 * cap for t in trained)
    assert summary["best"]["test_loss"] < math.log(40)  # better than uniform over the small vocabulary


# ------------------------------------------------------------- a Hugging Face checkpoint as the model
def test_search_over_fine_tuning_a_hugging_face_checkpoint(tmp_path):
    """The issue's "and later search": a space over the fine-tuning of a local HF GPT-2 (the model fixed,
    its learning rate searched); sizing counts the checkpoint without loading its weights."""
    pytest.importorskip("transformers")
    from lmforge.models.hf import HFCausalLM
    from lmforge.predict.loading import load_pretrained
    from support.finetune import make_gpt2_dir

    text = "".join(f"the cat number {i} sat on the mat in the red house.\n" for i in range(200))
    hf_dir = make_gpt2_dir(tmp_path / "gpt2", text)
    space = f"""
params:
  optim.lr: [3.0e-4, 3.0e-3]
fixed:
  model.family: hf
  model.path: {hf_dir}
  tokenizer.kind: hf
  tokenizer.path: {hf_dir}
"""
    opts = options(
        tmp_path, space, budget="3ktok", sampler="grid", pruner="none", trial_tokens=8 * TPS,
        overrides=["--data.block_size", "16", "--train.batch_size", "4"],
    )  # fmt: skip
    summary = run_pipeline(opts)
    study = load_study(Path(opts.out))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert {t.params["optim.lr"] for t in study.trials} == {3e-4, 3e-3}
    model, _, cfg = load_pretrained(Path(opts.out))
    assert isinstance(model, HFCausalLM) and cfg.model.path == str(hf_dir)
    assert summary["best"]["params"] == sum(p.numel() for p in model.parameters())
    assert summary["steps"]["evaluate"] == "done" and math.isfinite(summary["best"]["test_loss"])



def test_a_trial_too_slow_for_its_time_share_stops_after_a_few_steps(tmp_path):
    """The trial's own speed projects past its time share: it stops at the first check, not at the share."""
    from lmforge.search.speed_guard import SPEED_STEPS, TOO_SLOW, SpeedGuard
    from lmforge.train.callbacks import LoopState

    def run(step_s: float) -> tuple[int, str | None]:
        guard = SpeedGuard(share_s=10.0, max_tokens=1000)
        state = LoopState(config=None, out_dir=tmp_path, model=None)  # type: ignore[arg-type]
        for step in range(1, 101):
            state.step, state.tokens = step, 10 * step
            state.elapsed_s = 4.0 + step_s * (step - 1)  # the first step is slow (allocations, a compile)
            if guard.on_step(state):
                return step, guard.too_slow
        return 100, guard.too_slow

    # 10 tokens per 0.2 s: 1000 tokens need about 24 s of a 10 s share -> stopped at the first check
    step, why = run(0.2)
    assert step == 1 + SPEED_STEPS and why is not None and why.startswith(f"{TOO_SLOW} of 10s") and "24s" in why
    # 10 tokens per 0.05 s: about 9 s, within the share -> trains on (the slow first step is not counted)
    assert run(0.05) == (100, None)
    assert SpeedGuard(share_s=None, max_tokens=1000).on_step(LoopState(None, tmp_path, None)) is False  # type: ignore[arg-type]


def test_a_trial_the_speed_guard_stops_fails_for_its_time_share_after_those_steps(tmp_path, monkeypatch):
    from lmforge.search.speed_guard import TOO_SLOW, SpeedGuard

    def stop_slow_lr(self, state):  # stands in for a configuration too slow for its share
        if state.config.optim.lr == 2e-3 and state.step >= 2:
            self.too_slow = f"{TOO_SLOW} of 5s: (test)"
            return True
        return False

    monkeypatch.setattr(SpeedGuard, "on_step", stop_slow_lr)
    opts = options(
        tmp_path,
        "params:\n  optim.lr: [1.0e-3, 2.0e-3]\n",
        budget="2ktok",
        sampler="grid",
        pruner="none",
        trial_tokens=3 * TPS,
    )
    summary = run_pipeline(opts)
    by_lr = {t.params["optim.lr"]: t for t in load_study(Path(opts.out)).trials}
    slow, ok = by_lr[2e-3], by_lr[1e-3]
    assert slow.state == TrialState.FAIL and slow.user_attrs["fail_reason"].startswith(TOO_SLOW)
    assert slow.user_attrs["tokens"] == 2 * TPS  # stopped where the guard said, not at its length
    # not a candidate for the final step, even if its two steps scored better
    assert ok.state == TrialState.COMPLETE and summary["best"]["trial"] == ok.number
