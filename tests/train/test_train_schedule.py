"""LR schedules against reference formulas (nanoGPT's get_lr, np.interp, torch's ReduceLROnPlateau)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from lmforge.config import ScheduleConfig
from lmforge.train.schedule import ScheduleError, build_scheduler

LR, MIN_LR = 1e-3, 1e-4


def _optimizer(lrs: tuple[float, ...] = (LR,)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=LR)


def _run(cfg: ScheduleConfig, total: int | None, steps: int, lrs: tuple[float, ...] = (LR,)) -> list[list[float]]:
    """The lr of every group at each optimizer step, as a training loop sees it."""
    opt = _optimizer(lrs)
    sched = build_scheduler(opt, cfg, total, LR)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    # verbatim from nanoGPT train.py
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_cosine_matches_nanogpt_get_lr(warmup: int) -> None:
    total = 50
    cfg = ScheduleConfig(name="cosine", warmup_steps=warmup, min_lr=MIN_LR)
    sched = build_scheduler(_optimizer(), cfg, total, LR)
    for it in range(total + 10):
        assert sched.lr_at(it) == nanogpt_get_lr(it, LR, warmup, total, MIN_LR), it
    seen = _run(cfg, total, total + 10)
    for it, (lr,) in enumerate(seen):
        assert lr == pytest.approx(nanogpt_get_lr(it, LR, warmup, total, MIN_LR), rel=1e-12, abs=1e-18), it


def _warmup(it: int, warmup: int) -> float:
    return LR * (it + 1) / (warmup + 1)


def test_linear_is_a_straight_line_to_min_lr() -> None:
    total, warmup = 40, 5
    seen = _run(ScheduleConfig(name="linear", warmup_steps=warmup, min_lr=MIN_LR), total, total + 5)
    for it, (lr,) in enumerate(seen):
        ref = _warmup(it, warmup) if it < warmup else float(np.interp(it, [warmup, total], [LR, MIN_LR]))
        assert lr == pytest.approx(ref, rel=1e-9), it
    assert seen[-1][0] == pytest.approx(MIN_LR)


@pytest.mark.parametrize(("warmup", "fraction"), [(0, 0.2), (4, 0.25), (3, 1.0)])
def test_wsd_is_warmup_stable_then_linear_decay(warmup: int, fraction: float) -> None:
    total = 40
    decay_start = max(warmup, total - round(fraction * total))
    cfg = ScheduleConfig(name="wsd", warmup_steps=warmup, min_lr=MIN_LR, decay_fraction=fraction)
    seen = _run(cfg, total, total + 5)
    for it, (lr,) in enumerate(seen):
        if it < warmup:
            ref = _warmup(it, warmup)
        else:
            ref = float(np.interp(it, [warmup, decay_start, total], [LR, LR, MIN_LR]))
        assert lr == pytest.approx(ref, rel=1e-9), it
    stable = [lr for it, (lr,) in enumerate(seen) if warmup <= it < decay_start]
    assert all(lr == LR for lr in stable)


def test_constant_with_warmup_and_without_length() -> None:
    seen = _run(ScheduleConfig(name="constant", warmup_steps=3), None, 8)
    assert [lr for (lr,) in seen] == pytest.approx([LR / 4, 2 * LR / 4, 3 * LR / 4, LR, LR, LR, LR, LR])


def test_every_group_follows_the_same_factor() -> None:
    muon_lr = 0.02
    seen = _run(ScheduleConfig(name="cosine", warmup_steps=2, min_lr=MIN_LR), 20, 25, lrs=(LR, muon_lr))
    for it, (main, muon) in enumerate(seen):
        assert main == pytest.approx(nanogpt_get_lr(it, LR, 2, 20, MIN_LR), rel=1e-12)
        assert muon / muon_lr == pytest.approx(main / LR, rel=1e-12)


LOSSES = [3.0, 2.5, 2.6, 2.55, 2.7, 2.4, 2.45, 2.5, 2.41, 2.46, float("nan"), 2.47, 2.48, 2.49, 2.5, 2.51, 2.6]


@pytest.mark.parametrize(("patience", "factor"), [(0, 0.5), (1, 0.3), (2, 0.5)])
def test_plateau_matches_torch_reduce_on_plateau(patience: int, factor: float) -> None:
    cfg = ScheduleConfig(name="plateau", plateau_patience=patience, plateau_factor=factor, min_lr=MIN_LR)
    opt = _optimizer()
    sched = build_scheduler(opt, cfg, None, LR)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, mode="min", factor=factor, patience=patience, threshold=0.0, min_lr=MIN_LR
    )
    reductions = 0
    for loss in LOSSES:
        before = opt.param_groups[0]["lr"]
        sched.observe(loss)
        ref.step(loss)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        reductions += opt.param_groups[0]["lr"] < before
    assert reductions >= 2
    assert opt.param_groups[0]["lr"] >= MIN_LR


def test_plateau_keeps_warmup_and_scaled_lr_through_steps() -> None:
    cfg = ScheduleConfig(name="plateau", warmup_steps=4, plateau_patience=0, plateau_factor=0.5)
    opt = _optimizer()
    sched = build_scheduler(opt, cfg, None, LR)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 5)
    sched.observe(2.0)
    sched.observe(2.1)  # patience 0: the first non-improvement halves the lr
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 10)
    for _ in range(6):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 2)


def test_other_schedules_ignore_observe() -> None:
    opt = _optimizer()
    sched = build_scheduler(opt, ScheduleConfig(name="cosine"), 10, LR)
    for loss in (1.0, 2.0, 3.0, 4.0):
        sched.observe(loss)
    assert opt.param_groups[0]["lr"] == LR


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "wsd", "plateau"])
def test_state_dict_is_plain_and_resumes_identically(name: str) -> None:
    cfg = ScheduleConfig(name=name, warmup_steps=3, min_lr=MIN_LR, plateau_patience=0)
    losses = [2.0, 2.1, 1.9, 2.2, 2.3]

    def drive(sched, opt, steps):
        out = []
        for it in steps:
            out.append(opt.param_groups[0]["lr"])
            sched.step()
            if it % 3 == 2:
                sched.observe(losses[(it // 3) % len(losses)])
        return out

    opt = _optimizer()
    ref = drive(build_scheduler(opt, cfg, 30, LR), opt, range(30))

    opt = _optimizer()
    sched = build_scheduler(opt, cfg, 30, LR)
    got = drive(sched, opt, range(13))
    state = sched.state_dict()
    json.dumps(state)  # plain python numbers only
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt = _optimizer()
    sched = build_scheduler(opt, cfg, 30, LR)
    sched.load_state_dict(state)
    got += drive(sched, opt, range(13, 30))
    assert got == ref


def test_schedule_errors_name_the_field() -> None:
    with pytest.raises(ScheduleError, match="train.max_steps or schedule.total_steps"):
        build_scheduler(_optimizer(), ScheduleConfig(name="cosine"), None, LR)
    with pytest.raises(ScheduleError, match="schedule.warmup_steps"):
        build_scheduler(_optimizer(), ScheduleConfig(name="linear", warmup_steps=10), 10, LR)
    state = build_scheduler(_optimizer(), ScheduleConfig(name="cosine"), 10, LR).state_dict()
    with pytest.raises(ScheduleError, match="'cosine'"):
        build_scheduler(_optimizer(), ScheduleConfig(name="wsd"), 10, LR).load_state_dict(state)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_time_horizon_decays_over_the_clock(name: str) -> None:
    """``horizon: time``: the step-horizon formula with the progress measured in seconds instead of steps."""
    cfg = ScheduleConfig(name=name, warmup_steps=2, min_lr=MIN_LR, horizon="time", decay_fraction=0.25)
    opt = _optimizer((LR, 0.5 * LR))
    sched = build_scheduler(opt, cfg, None, LR, total_time=40.0)
    ref = build_scheduler(_optimizer(), cfg.model_copy(update={"horizon": "steps"}), 102, LR)
    for _ in range(2):  # warmup counts steps
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR)
    for seconds, it in ((0.0, 2), (10.0, 27), (20.0, 52), (30.0, 77), (35.0, 89.5), (40.0, 102), (55.0, 200)):
        sched.set_elapsed(seconds)
        # step horizon 102 with warmup 2: progress (it - 2) / 100 equals seconds / 40 at these points
        want = ref.lr_at(int(it)) if float(it).is_integer() else 0.5 * (ref.lr_at(89) + ref.lr_at(90))
        if name == "wsd":  # wsd's step form counts its decay from total - fraction * total, the time form likewise
            p = min(1.0, seconds / 40)
            want = LR if p < 0.75 else LR - (p - 0.75) / 0.25 * (LR - MIN_LR)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-3 if name == "cosine" else 1e-9)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(MIN_LR)


def test_time_horizon_needs_a_clock_and_a_decay() -> None:
    with pytest.raises(ScheduleError, match="train.max_time"):
        build_scheduler(_optimizer(), ScheduleConfig(name="cosine", horizon="time"), 100, LR)
    with pytest.raises(ScheduleError, match="decaying"):
        build_scheduler(_optimizer(), ScheduleConfig(name="constant", horizon="time"), None, LR, total_time=5.0)
    from lmforge.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="schedule.horizon"):
        build_config({"schedule": {"name": "cosine", "horizon": "time"}, "train": {"max_steps": 10}})
    cfg = build_config({"schedule": {"name": "cosine", "horizon": "time"}, "train": {"max_steps": None, "max_time": "1m"}})
    assert cfg.schedule.horizon == "time" and cfg.train.max_time == 60


def test_wsd_continues_a_constant_run_and_decays_once() -> None:
    """Warmup-stable-decay split over two runs (a tune trial, then its final training): the constant run's
    state loads into a wsd one, whose lr starts where the constant one stopped and only goes down."""
    warm = 5
    opt = _optimizer()
    stable = build_scheduler(opt, ScheduleConfig(name="constant", warmup_steps=warm), None, LR)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        stable.step()
    state = json.loads(json.dumps(stable.state_dict()))
    opt2 = _optimizer()
    wsd = build_scheduler(opt2, ScheduleConfig(name="wsd", warmup_steps=warm, decay_fraction=0.25, min_lr=MIN_LR), 60, LR)
    wsd.load_state_dict(state)
    for _ in range(20, 60):
        lrs.append(opt2.param_groups[0]["lr"])
        opt2.step()
        wsd.step()
    # reference: nanoGPT-style warmup, then LR until step 45, then linear to MIN_LR at 60
    ref = [LR * (i + 1) / (warm + 1) if i < warm else LR if i < 45 else LR - (i - 45) / 15 * (LR - MIN_LR)
           for i in range(60)]
    assert lrs == pytest.approx(ref)
    after_peak = lrs[warm:]
    assert all(b <= a for a, b in zip(after_peak, after_peak[1:], strict=False))  # never up after the warm-up
    with pytest.raises(ScheduleError, match="cosine"):  # only the stable phase continues
        build_scheduler(_optimizer(), ScheduleConfig(name="cosine"), 60, LR).load_state_dict(state)
