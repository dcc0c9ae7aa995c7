"""The final training: the best trial continues from its own last checkpoint with the budget left, to
convergence (early stopping); ``DIR/best`` then gets the best validation checkpoint.

The plan is computed once and stored in ``pipeline.json`` (``steps.final.plan``), so a killed final
training resumes toward the same target instead of re-planning from a budget it partly spent; a time budget's
clock is only ever shortened on a resume (:func:`fit_plan_to_time_left`), never lengthened: the killed run's
time and the resumed run's start-up are spent budget.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lmforge.config import DECAYING_SCHEDULES, build_config, load_yaml
from lmforge.runs import list_checkpoints, load_checkpoint
from lmforge.search.context import SearchContext, SearchData, fixed_val_batches
from lmforge.train.loop import TrainResult, train

FINAL_PATIENCE = 6
"""Evaluations without improvement before the final training stops."""
FINAL_STEP_CAP = 3
"""A time-budgeted final training may run up to this many times the steps estimated from the trial's speed
(the clock, and its learning-rate decay, end it)."""


def plan_final(
    src: Path, trial_number: int, *, cv: int, allowance: float, budget_kind: str, reference_tokens_per_s: float
) -> dict[str, Any]:
    """The final training of the trial in ``src`` (its run directory, or fold 0 of a cross-validated one)
    within ``allowance`` (seconds or tokens, as ``budget_kind``): where it starts, up to which step, its
    clock and its evaluation and checkpoint intervals."""
    cfg_raw = load_yaml(src / "config.yaml")
    ckpts = [] if cv >= 2 else list_checkpoints(src)
    start = load_checkpoint(ckpts[-1], load_trainer_state=False).meta if ckpts else {}
    step0, tokens0, elapsed0 = (
        int(start.get("step", 0)),
        int(start.get("tokens", 0)),
        float(start.get("elapsed_s", 0.0)),
    )
    tc = cfg_raw["train"]
    tps = int(tc["batch_size"]) * int(cfg_raw["data"]["block_size"]) * int(tc.get("grad_accum", 1))
    train_s = training_seconds(allowance)
    if budget_kind == "tokens":
        extra = int(allowance // tps)
    else:
        rate = tokens0 / elapsed0 if tokens0 and elapsed0 > 0 else reference_tokens_per_s
        extra = int(train_s * rate // tps)  # an estimate: the clock stops the final training
    if not ckpts:  # from scratch (cross-validation folds trained on part of the data)
        extra += int(tc["max_steps"])
    timed = budget_kind == "time"
    decaying = (cfg_raw.get("schedule") or {}).get("name") in DECAYING_SCHEDULES
    return {
        "trial": trial_number,
        "from": str(ckpts[-1]) if ckpts else None,
        "start_step": step0,
        "start_tokens": tokens0,
        # a time budget: the learning rate decays over the time left (schedule.horizon time), the
        # steps only cap it, at several times the estimate
        "max_steps": step0 + max(0, FINAL_STEP_CAP * extra if timed else extra),
        "max_time": elapsed0 + train_s if timed else None,
        "horizon": "time" if timed and decaying else "steps",  # constant / plateau have no horizon
        # about 20 evaluations for early stopping, but not more often than the trials evaluated
        "eval_interval": max(1, int(tc["eval_interval"]), extra // 20),
        "checkpoint_interval": max(1, extra // 5),
    }


def training_seconds(allowance: float) -> float:
    """Seconds of the training loop's clock that fit in ``allowance`` seconds of budget: the loop's clock
    leaves out checkpoint writing, so a small margin is kept for it."""
    return max(0.0, allowance - (0.5 + 0.03 * allowance))


def resume_point(plan: dict[str, Any], final_dir: Path) -> Path | None:
    """The checkpoint :func:`train_final` continues from: the final training's own newest, else the trial's."""
    ckpts = list_checkpoints(final_dir)
    if ckpts:
        return ckpts[-1]
    return Path(plan["from"]) if plan.get("from") else None


def fit_plan_to_time_left(plan: dict[str, Any], final_dir: Path, allowance: float) -> dict[str, Any]:
    """A stored plan of a time budget, its clock (``max_time``) shortened so that the training resumed now
    ends within ``allowance`` seconds (what the ledger leaves the final step); the plan itself when it fits
    (or counts tokens). The loop's clock continues from the resume checkpoint's ``elapsed_s``."""
    if plan.get("max_time") is None:
        return plan
    start = resume_point(plan, final_dir)
    elapsed = float(load_checkpoint(start, load_trainer_state=False).meta.get("elapsed_s", 0.0)) if start else 0.0
    cap = elapsed + training_seconds(allowance)
    return {**plan, "max_time": cap} if cap < float(plan["max_time"]) else plan


def train_final(
    plan: dict[str, Any], src: Path, final_dir: Path, ctx: SearchContext, data: SearchData, verbose: bool
) -> TrainResult:
    """Run (or resume) the planned final training in ``final_dir`` with the one training loop."""
    cfg_raw = load_yaml(src / "config.yaml")
    resume = "auto" if list_checkpoints(final_dir) or not plan["from"] else plan["from"]
    cfg_raw["train"].update(
        resume=resume,
        max_steps=plan["max_steps"],
        max_tokens=None,
        max_epochs=None,
        max_time=plan["max_time"],
        patience=FINAL_PATIENCE,
        eval_interval=plan["eval_interval"],
        checkpoint_interval=plan["checkpoint_interval"],
        keep_last=2,
        progress=verbose,
    )
    cfg_raw.setdefault("schedule", {})["horizon"] = plan.get("horizon", "steps")
    cfg = build_config(cfg_raw)
    return train(
        cfg,
        final_dir,
        data=data.prepared,
        verbose=verbose,
        val_batches=fixed_val_batches(data.prepared.val, cfg, ctx.eval_blocks),
    )


def install_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either the old or the new complete copy."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
