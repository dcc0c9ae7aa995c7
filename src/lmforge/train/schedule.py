"""Learning-rate schedules from :class:`~lmforge.config.ScheduleConfig` (layer 3).

A schedule computes the learning rate of the main group (``base_lr``, i.e. ``optim.lr``) for an
optimizer step ``it`` (counted from 0, as nanoGPT's ``get_lr(it)``) and scales every parameter group by
the same factor ``lr(it) / base_lr`` relative to the group's own ``initial_lr``; a Muon group thus keeps
its own base learning rate and follows the same shape.

Usage (the lr for step 0 is set when the schedule is built)::

    sched = build_scheduler(opt, cfg.schedule, cfg.total_steps, cfg.optim.lr)
    for it in range(n):
        ...; opt.step(); sched.step()        # sets the lr of step it + 1
        if evaluating: sched.observe(val_loss)  # plateau only

Shapes (W = ``warmup_steps``, N = ``total_steps``, lr = ``base_lr``):

- warmup (all schedules, ``it < W``): ``lr * (it + 1) / (W + 1)``
- ``constant``: ``lr``
- ``cosine``: ``min_lr + 0.5 * (1 + cos(pi * (it - W) / (N - W))) * (lr - min_lr)``, ``min_lr`` from N on
- ``linear``: ``lr - (it - W) / (N - W) * (lr - min_lr)``, ``min_lr`` from N on
- ``wsd``: ``lr`` until ``D = max(W, N - round(decay_fraction * N))``, then linear to ``min_lr`` at N
- ``horizon: time`` (with ``total_time`` = ``train.max_time``): ``linear``, ``cosine`` and ``wsd`` use the
  progress ``p = elapsed / total_time`` (the loop reports its training seconds with ``set_elapsed``) in place
  of ``(it - W) / (N - W)``; ``wsd`` decays over the last ``decay_fraction`` of the time
- a ``wsd`` schedule may load the state of a ``constant`` one (its stable phase): the run continues at
  ``lr`` and decays once at its end (warmup-stable-decay split over two runs, as ``lmforge tune``'s trials
  and final training are)
- ``plateau``: ``lr * scale``; ``scale *= plateau_factor`` when more than ``plateau_patience``
  evaluations in a row did not improve on the best, never below ``min_lr`` (torch's ReduceLROnPlateau
  with ``threshold=0``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmforge.config import DECAYING_SCHEDULES, LmforgeError, ScheduleConfig


class ScheduleError(LmforgeError, ValueError):
    """A schedule that cannot be built; the message names the field and the value."""


class Schedule:
    """Sets ``group["lr"]`` of every parameter group of ``optimizer`` from the step count."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: ScheduleConfig,
        total_steps: int | None,
        base_lr: float,
        total_time: float | None = None,
    ) -> None:
        self.total_time = None
        if cfg.horizon == "time":
            if total_time is None or not total_time > 0 or cfg.name not in DECAYING_SCHEDULES:
                raise ScheduleError(
                    f"schedule.horizon 'time' needs a positive total_time (train.max_time; got {total_time}) and "
                    f"a decaying schedule (linear, cosine, wsd; got {cfg.name!r})"
                )
            self.total_time = float(total_time)
        elif cfg.name in DECAYING_SCHEDULES:
            if total_steps is None:
                raise ScheduleError(
                    f"schedule.name '{cfg.name}' needs a length: set train.max_steps or schedule.total_steps"
                )
            if cfg.warmup_steps >= total_steps:
                raise ScheduleError(
                    f"schedule.warmup_steps ({cfg.warmup_steps}) must be below the schedule length ({total_steps})"
                )
        if not base_lr > 0:
            raise ScheduleError(f"base_lr must be positive, got {base_lr}")
        if cfg.min_lr > base_lr:
            raise ScheduleError(f"schedule.min_lr ({cfg.min_lr}) is larger than optim.lr ({base_lr})")
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = total_steps
        self.base_lr = float(base_lr)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.it = 0
        """Index of the optimizer step whose lr is currently set."""
        self.elapsed = 0.0
        """Training seconds so far (``horizon: time`` only)."""
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0
        self._apply()

    # ------------------------------------------------------------------------------------ shape
    def lr_at(self, it: int) -> float:
        """Learning rate of the main group at optimizer step ``it``."""
        c, lr, min_lr = self.cfg, self.base_lr, self.cfg.min_lr
        warmup = c.warmup_steps
        if c.name == "plateau":
            scaled = lr * self.plateau_scale
            return scaled * (it + 1) / (warmup + 1) if it < warmup else max(min_lr, scaled)
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if c.name == "constant":
            return lr
        if self.total_time is not None:
            p = min(1.0, max(0.0, self.elapsed / self.total_time))
            if c.name == "wsd":
                start = 1.0 - c.decay_fraction
                return lr if p < start else lr - (p - start) / c.decay_fraction * (lr - min_lr)
            if c.name == "cosine":
                return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - min_lr)
            return lr - p * (lr - min_lr)
        n = self.total_steps
        assert n is not None  # checked in __init__
        if it >= n:
            return min_lr
        if c.name == "wsd":
            start = max(warmup, n - round(c.decay_fraction * n))
            if it < start:
                return lr
            return lr - (it - start) / (n - start) * (lr - min_lr)
        ratio = (it - warmup) / (n - warmup)
        if c.name == "cosine":
            return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
        return lr - ratio * (lr - min_lr)  # linear

    def lr_factor(self, it: int | None = None) -> float:
        """``lr_at(it) / base_lr`` (default: the current step)."""
        return self.lr_at(self.it if it is None else it) / self.base_lr

    def get_last_lr(self) -> list[float]:
        """The learning rate of every parameter group, as set for the current step."""
        return [g["lr"] for g in self.optimizer.param_groups]

    @property
    def lr(self) -> float:
        """The main learning rate of the current step."""
        return self.lr_at(self.it)

    def _apply(self) -> None:
        factor = self.lr_factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    # ----------------------------------------------------------------------------------- events
    def step(self) -> None:
        """Advance to the next optimizer step (call once after every ``optimizer.step()``)."""
        self.it += 1
        self._apply()

    def set_elapsed(self, seconds: float) -> None:
        """Report the training seconds so far; with ``horizon: time`` this sets the learning rate."""
        if self.total_time is not None:
            self.elapsed = float(seconds)
            self._apply()

    def observe(self, val_loss: float) -> None:
        """Report an evaluation; ``plateau`` may reduce the learning rate, the others ignore it."""
        if self.cfg.name != "plateau":
            return
        # NaN never improves (every comparison with NaN is False)
        if self.best is None and math.isfinite(val_loss) or self.best is not None and val_loss < self.best:
            self.best = float(val_loss)
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.cfg.plateau_patience:
            floor = self.cfg.min_lr / self.base_lr
            self.plateau_scale = max(self.plateau_scale * self.cfg.plateau_factor, floor)
            self.bad_evals = 0
            self._apply()

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain python numbers (loadable with ``torch.load(weights_only=True)`` and JSON)."""
        return {
            "name": self.cfg.name,
            "it": self.it,
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a constant schedule (after its warm-up) is the stable phase of warmup-stable-decay: a wsd run may
        # continue it and decay once (lmforge tune's final training of a warmup-stable trial)
        continues_stable = state.get("name") == "constant" and self.cfg.name == "wsd"
        if state.get("name") != self.cfg.name and not continues_stable:
            raise ScheduleError(
                f"schedule state was saved by schedule.name {state.get('name')!r}, this run uses {self.cfg.name!r}"
            )
        self.it = int(state["it"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad_evals"])
        self._apply()

    def __repr__(self) -> str:
        return f"Schedule({self.cfg.name}, it={self.it}, lr={self.lr:.3g})"


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    total_steps: int | None,
    base_lr: float,
    total_time: float | None = None,
) -> Schedule:
    """A :class:`Schedule` for ``optimizer``; it sets the lr of step 0 right away.

    ``total_steps`` is the schedule length (``RunConfig.total_steps``); ``base_lr`` the main learning
    rate (``optim.lr``), the reference of ``min_lr``.
    """
    return Schedule(optimizer, cfg, total_steps, base_lr, total_time)
