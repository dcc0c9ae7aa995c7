"""The final step: choose the configuration, continue it from its own last checkpoint with the budget left,
decay its learning rate once; ``DIR/best`` then gets the best validation checkpoint.

Choice (:func:`choose_final`): every finished trial, and every stopped one whose checkpoint remains, is
scored by the loss its validation curve predicts at the length the final training would reach *for that
trial* (its tokens so far plus what its own speed trains in the final step's allowance;
:mod:`lmforge.search.curves`), plus one standard deviation (a pick the curve is sure of). The best
``RESCORE_TOP`` are then re-scored on the whole search validation split (up to ``RESCORE_MAX_TOKENS``
tokens) at the checkpoint the final training continues from, and their predictions shifted by the
difference between that loss and the curve's last point (scored on the trials' fixed sample of blocks).
Multi-objective and cross-validated searches keep the plain rule (lowest finished loss).

Sizing from the run's own trials (:func:`lmforge.search.sizing.fit_loss_surface`): the curves of every trial
with a size and a curve are fitted together as loss against parameters and tokens; each candidate's curve
prediction is combined (inverse-variance) with the surface's (its own offset plus the pooled token term at
its final length), so a candidate with a one- or two-point curve is extrapolated with what the longer curves
show, and the model size that wins is the one the trials say the final's length rewards, not a fixed
tokens-per-parameter rule. The surface's compute-optimal size for the final's allowance (with the trials'
measured speed against size) is recorded beside the choice (``plan.sizing``).

One decay, at the end: trials of the default space train warmup-stable (``schedule.name constant`` after the
warm-up: the stable phase of warmup-stable-decay), so their last checkpoint is a stable one; the final
training continues it as ``wsd`` (a constant schedule's state loads into a ``wsd`` one) and decays once,
linearly to ``schedule.min_lr`` over the last ``DECAY_SHARE`` of its own time (or steps), with no early
stopping before the decay. Trials of another schedule (a user's ``cosine``) continue with it as before.

The plan is computed once and stored in ``pipeline.json`` (``steps.final.plan``), so a killed final
training resumes toward the same target instead of re-planning from a budget it partly spent; a time budget's
clock is only ever shortened on a resume (:func:`fit_plan_to_time_left`), never lengthened: the killed run's
time and the resumed run's start-up are spent budget.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmforge.config import DECAYING_SCHEDULES, build_config, load_yaml
from lmforge.data import eval_batches
from lmforge.runs import list_checkpoints, load_checkpoint, load_model, read_metrics
from lmforge.search.context import SearchContext, SearchData, fixed_val_batches
from lmforge.search.curves import Prediction, predict
from lmforge.search.disk import MARKER
from lmforge.search.sizing import LossSurface, Speed, fit_loss_surface, fit_speed, optimal_size
from lmforge.search.speed_guard import SLOW_FAIL
from lmforge.train.loop import TrainResult, evaluate_loss, resolve_device, train

FINAL_PATIENCE = 6
"""Evaluations without improvement before the final training stops."""
FINAL_STEP_CAP = 3
"""A time-budgeted final training may run up to this many times the steps estimated from the trial's speed
(the clock, and its learning-rate decay, end it)."""
DECAY_SHARE = 0.4
"""The final training of a warmup-stable trial decays its learning rate over this share of its own length."""
RESCORE_TOP = 3
"""Candidates re-scored on the whole validation split before the choice."""
RESCORE_MAX_TOKENS = 131_072
"""Most validation tokens a re-score reads (the whole split of the benchmark corpora; evenly spread blocks of
a larger one)."""


# ----------------------------------------------------------------------------------------- choice
@dataclass
class Candidate:
    """A trial the final step may continue, with its predicted loss at the final length."""

    trial: FrozenTrial
    src: Path
    tokens: int
    target_tokens: float
    prediction: Prediction
    shift: float = 0.0
    """Whole-split loss minus the sample loss at the continued checkpoint (0 until re-scored)."""
    full_loss: float | None = None
    curve: Prediction | None = None
    """The trial's own curve's prediction, when ``prediction`` combines it with the loss surface's."""
    surface_loss: float | None = None

    @property
    def score(self) -> float:
        return self.prediction.mean + self.shift + self.prediction.std

    def record(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "trial": self.trial.number,
            "tokens": self.tokens,
            "target_tokens": int(self.target_tokens),
            "predicted_loss": round(p.mean, 5),
            "predicted_std": round(p.std, 5),
            "fitted": p.fitted,
            "curve_loss": round((self.curve or p).mean, 5),
            "surface_loss": None if self.surface_loss is None else round(self.surface_loss, 5),
            "params": int(self.trial.user_attrs.get("params") or 0),
            "full_val_loss": None if self.full_loss is None else round(self.full_loss, 5),
            "score": round(self.score, 5),
        }


def trial_curve(src: Path) -> tuple[list[int], list[float]]:
    """The validation curve ``(tokens, losses)`` a trial's run directory recorded."""
    recs = [r for r in read_metrics(src, lenient=True) if r.get("val_loss") is not None and r.get("tokens")]
    return [int(r["tokens"]) for r in recs], [float(r["val_loss"]) for r in recs]


def final_tokens(trial: FrozenTrial, tokens: int, *, allowance: float, budget_kind: str, ref_tps: float) -> float:
    """Tokens the final step would train for ``trial``: the allowance, or its seconds at the trial's speed."""
    if budget_kind == "tokens":
        return float(allowance)
    duration = float(trial.user_attrs.get("duration_s") or 0.0)
    rate = tokens / duration if tokens > 0 and duration > 0 else ref_tps
    return training_seconds(allowance) * rate


def _trials_with_curves(study: optuna.Study, ctx: SearchContext) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        if t.user_attrs.get("run_dir") and int(t.user_attrs.get("params") or 0) > 0
    ]


def run_surface(study: optuna.Study, ctx: SearchContext) -> tuple[LossSurface | None, Speed | None]:
    """The loss surface and the speed against size, fitted on every trial of the run with a size and a
    validation curve (stopped and failed ones too: their curves are data)."""
    curves: dict[str, tuple[float, list[float], list[float]]] = {}
    sizes, rates = [], []
    for t in _trials_with_curves(study, ctx):
        src = Path(ctx.run_dir) / t.user_attrs["run_dir"]
        if ctx.cv >= 2 or not (src / "metrics.jsonl").is_file():
            continue
        xs, ys = trial_curve(src)
        if not xs:
            continue
        n = float(t.user_attrs["params"])
        curves[str(t.number)] = (n, [float(x) for x in xs], ys)
        duration = float(t.user_attrs.get("duration_s") or 0.0)
        if duration > 0:
            sizes.append(n)
            rates.append(xs[-1] / duration)
    return fit_loss_surface(curves), fit_speed(sizes, rates)


def combine(curve: Prediction, surface_mean: float, surface_std: float) -> Prediction:
    """Inverse-variance mean of the curve's prediction and the surface's."""
    wc = 1.0 / max(curve.std, 1e-6) ** 2
    ws = 1.0 / max(surface_std, 1e-6) ** 2
    mean = (wc * curve.mean + ws * surface_mean) / (wc + ws)
    return Prediction(curve.tokens, mean, math.sqrt(1.0 / (wc + ws)), curve.fitted, curve.a, curve.b, curve.c)


def apply_surface(cands: list[Candidate], surface: LossSurface | None) -> None:
    """Each candidate's prediction combined with the surface's at its target length (in place)."""
    if surface is None:
        return
    for c in cands:
        key = str(c.trial.number)
        if key not in surface.offsets:
            continue
        c.surface_loss = surface.extrapolate(key, c.target_tokens)
        c.curve = c.prediction
        c.prediction = combine(c.prediction, c.surface_loss, surface.extrapolate_std(key, c.target_tokens))


def sizing_record(
    surface: LossSurface | None, speed: Speed | None, cands: list[Candidate], *, allowance: float, budget_kind: str
) -> dict[str, Any]:
    """The surface, and the size it predicts best for the final's allowance (within the trials' sizes, up
    to twice the largest), beside the chosen candidate's: what the run's own trials say about model size."""
    if surface is None:
        return {"fitted": False, "why": "fewer than two trials with a curve of two or more points"}
    sizes = [float(c.trial.user_attrs.get("params") or 0) for c in cands] or [surface.n_ref]
    low, high = min(sizes), 2.0 * max(sizes)
    if budget_kind == "tokens" or speed is None:
        n_opt, l_opt = optimal_size(surface, Speed(1.0, 0.0, 1.0), float(allowance), low, high)
    else:
        n_opt, l_opt = optimal_size(surface, speed, training_seconds(allowance), low, high)
    rec: dict[str, Any] = {"fitted": True, "surface": surface.record(), "optimal_params": int(n_opt),
                           "optimal_loss": round(l_opt, 5), "searched_params": [int(low), int(high)]}  # fmt: skip
    if speed is not None:
        rec["speed"] = {"tokens_per_s": round(speed.rate, 1), "power": round(speed.power, 4), "n_ref": int(speed.n_ref)}
    return rec


def candidates(
    study: optuna.Study, ctx: SearchContext, *, allowance: float, budget_kind: str, ref_tps: float
) -> list[Candidate]:
    """Finished trials and stopped ones with a checkpoint left, each with its predicted final loss. A trial
    that only ran over its time share (slow, not broken: it has a curve and a checkpoint) counts as stopped."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.state == TrialState.FAIL and not str(t.user_attrs.get("fail_reason", "")).startswith(SLOW_FAIL):
            continue
        rel = t.user_attrs.get("run_dir")
        if not rel or t.user_attrs.get("discarded"):
            continue
        src = Path(ctx.run_dir) / rel
        if (src / MARKER).exists() or not list_checkpoints(src):
            continue
        if ctx.max_params is not None and int(t.user_attrs.get("params") or 0) > ctx.max_params:
            continue
        xs, ys = trial_curve(src)
        if not ys or not all(math.isfinite(y) for y in ys[-1:]):
            continue
        tokens = xs[-1]
        target = tokens + final_tokens(t, tokens, allowance=allowance, budget_kind=budget_kind, ref_tps=ref_tps)
        out.append(Candidate(t, src, tokens, target, predict(xs, ys, target)))
    return out


def rescore(cand: Candidate, val: Any, max_tokens: int = RESCORE_MAX_TOKENS) -> None:
    """Score the checkpoint ``cand`` would continue from on the whole validation split (up to
    ``max_tokens``) and shift its prediction by the difference to the curve's last point."""
    ckpt = list_checkpoints(cand.src)[-1]
    model, _, cfg = load_model(ckpt)
    device = resolve_device(cfg.train.device)
    model.to(device)
    block = cfg.data.block_size
    batches = eval_batches(val, block, 16, max(1, max_tokens // block // 16))
    if not batches:
        return
    full, _ = evaluate_loss(model, batches, device)
    step = int(load_checkpoint(ckpt, load_trainer_state=False).meta.get("step", -1))
    sample = [r["val_loss"] for r in read_metrics(cand.src, lenient=True) if r.get("step") == step]
    if sample and math.isfinite(full) and math.isfinite(float(sample[-1])):
        cand.full_loss = float(full)
        cand.shift = float(full) - float(sample[-1])


def choose_final(
    study: optuna.Study,
    ctx: SearchContext,
    data: SearchData,
    *,
    allowance: float,
    budget_kind: str,
    ref_tps: float,
    top: int = RESCORE_TOP,
) -> tuple[FrozenTrial | None, list[dict[str, Any]], dict[str, Any]]:
    """The trial the final step continues (see the module doc), the ranked candidates' records and the
    sizing record; (None, [], {}) when no trial qualifies or the search is multi-objective or
    cross-validated (the caller's plain rule applies)."""
    if ctx.multi_objective or ctx.cv >= 2:
        return None, [], {}
    cands = candidates(study, ctx, allowance=allowance, budget_kind=budget_kind, ref_tps=ref_tps)
    if not cands:
        return None, [], {}
    surface, speed = run_surface(study, ctx)
    apply_surface(cands, surface)
    sizing = sizing_record(surface, speed, cands, allowance=allowance, budget_kind=budget_kind)
    cands.sort(key=lambda c: c.score)
    for c in cands[:top]:
        rescore(c, data.prepared.val)
    best = sorted(cands[:top], key=lambda c: c.score)
    ranked = best + cands[top:]
    sizing["chosen_params"] = int(best[0].trial.user_attrs.get("params") or 0)
    return best[0].trial, [c.record() for c in ranked[: 2 * top]], sizing


# ------------------------------------------------------------------------------------------ plan
def plan_final(
    src: Path,
    trial_number: int,
    *,
    cv: int,
    allowance: float,
    budget_kind: str,
    reference_tokens_per_s: float,
    choice: list[dict[str, Any]] | None = None,
    sizing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The final training of the trial in ``src`` (its run directory, or fold 0 of a cross-validated one)
    within ``allowance`` (seconds or tokens, as ``budget_kind``): where it starts, up to which step, its
    clock, its evaluation and checkpoint intervals, and the schedule of its one decay."""
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
    sched_name = (cfg_raw.get("schedule") or {}).get("name")
    schedule: dict[str, Any] = {}
    if sched_name == "constant" and ckpts:  # warmup-stable trial: the final decays once, over its last part
        own = train_s if timed else float(extra)
        total = (elapsed0 if timed else float(step0)) + own
        if own > 0 and total > 0:
            schedule = {"name": "wsd", "decay_fraction": min(1.0, max(1e-3, DECAY_SHARE * own / total))}
    decaying = schedule.get("name", sched_name) in DECAYING_SCHEDULES
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
        "schedule": schedule,
        "choice": choice or [],
        "sizing": sizing or {},
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
        # a warmup-stable-decay final ends with its decay: stopping early would skip it
        patience=None if plan.get("schedule") else FINAL_PATIENCE,
        eval_interval=plan["eval_interval"],
        checkpoint_interval=plan["checkpoint_interval"],
        keep_last=2,
        progress=verbose,
    )
    sched = cfg_raw.setdefault("schedule", {})
    sched.update(plan.get("schedule") or {})
    sched["horizon"] = plan.get("horizon", "steps")
    if sched.get("name") == "wsd":
        sched["total_steps"] = None  # the decay follows the final's own length (train.max_steps or the clock)
    if sched.get("name") != "constant" and int(sched.get("warmup_steps") or 0) >= int(plan["max_steps"]):
        # a trial stopped during its warm-up, continued by a final shorter than that warm-up (a short
        # budget on a loaded machine): the warm-up ends at the final's last step, not after it
        sched["warmup_steps"] = max(0, int(plan["max_steps"]) - 1)
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
