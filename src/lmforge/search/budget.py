"""Budgets of a tuning run: parse them, split them between the steps, and plan the trials' fidelity.

A budget is wall-clock time (``90s``, ``10m``, ``2h``) or trained tokens (``500ktok``, ``5Mtok``) and covers
every step of the pipeline. Each step may spend the budget up to its cumulative share minus what all steps
spent so far, so time a step leaves unused passes on to the next one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from optuna.trial import FrozenTrial

from lmforge.config import ConfigError, parse_duration

STEPS = ("search", "final", "decode", "evaluate")
"""The pipeline's steps in order (``decode``: decoding-settings tuning, for task data only)."""

_SHARES_TIME = {"search": 0.70, "final": 0.25, "decode": 0.0, "evaluate": 0.05}
_SHARES_TIME_TASK = {"search": 0.60, "final": 0.25, "decode": 0.10, "evaluate": 0.05}
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKENS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*(?:tok|tokens?)\s*$", re.IGNORECASE)
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


class BudgetError(ConfigError):
    """A budget, size or count that cannot be read; the message names the option and the value."""


@dataclass(frozen=True)
class Budget:
    """Seconds of wall clock or trained tokens (exactly one is set)."""

    seconds: float | None = None
    tokens: int | None = None

    @property
    def kind(self) -> str:
        return "time" if self.seconds is not None else "tokens"

    @property
    def amount(self) -> float:
        return float(self.seconds if self.seconds is not None else self.tokens or 0)

    def scaled(self, share: float) -> Budget:
        if self.seconds is not None:
            return Budget(seconds=self.seconds * share)
        return Budget(tokens=int(round((self.tokens or 0) * share)))

    def __str__(self) -> str:
        return format_amount(self.amount, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        return cls(seconds=d.get("seconds"), tokens=d.get("tokens"))


def format_amount(amount: float, kind: str) -> str:
    if kind == "time":
        s = max(0.0, amount)
        if s >= 3600:
            return f"{s / 3600:.2f}h"
        if s >= 60:
            return f"{s / 60:.1f}m"
        return f"{s:.0f}s"
    return f"{format_count(amount)}tok"


def format_count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def parse_budget(text: str) -> Budget:
    """``"10m"``, ``"2h"``, ``"90s"`` -> time; ``"5Mtok"``, ``"500ktok"``, ``"200000tokens"`` -> tokens."""
    m = _TOKENS.match(str(text))
    if m:
        tokens = int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])
        if tokens < 1:
            raise BudgetError(f"--budget {text!r}: must be at least 1 token")
        return Budget(tokens=tokens)
    try:
        seconds = parse_duration(str(text))
    except ValueError:
        raise BudgetError(f"--budget {text!r}: use a duration (90s, 10m, 2h) or tokens (500ktok, 5Mtok)") from None
    if not seconds or seconds <= 0:
        raise BudgetError(f"--budget {text!r}: must be positive")
    return Budget(seconds=seconds)


def parse_count(text: str | int, option: str = "--max-params") -> int:
    """``"2M"``, ``"500k"``, ``"1.5B"``, ``1000`` -> an integer count."""
    if isinstance(text, int):
        return text
    m = _COUNT.match(str(text))
    if not m:
        raise BudgetError(f"{option} {text!r}: use a number, optionally with k, M or B (e.g. 2M)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


def parse_bytes(text: str | int, option: str = "--disk-cap") -> int:
    """``"2GB"``, ``"500MB"``, ``"1GiB"``, ``"100k"`` -> bytes (decimal units; ``i`` for binary)."""
    if isinstance(text, int):
        return text
    m = _BYTES.match(str(text))
    if not m:
        raise BudgetError(f"{option} {text!r}: use a size such as 500MB or 2GB")
    base = 1024 if m.group(3) else 1000
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * base**power)


# -------------------------------------------------------------------------------- budget spent
class SearchLimits(Protocol):
    """The search's own budget: a wall-clock deadline (time budgets) or a token allowance (token budgets).
    :class:`lmforge.search.context.SearchContext` is one."""

    deadline_unix: float | None
    search_tokens: int | None


def tokens_used(trials: Iterable[FrozenTrial]) -> int:
    """Tokens the search trained so far: the sum of what each trial trained itself (``tokens_trained``)."""
    return sum(int(t.user_attrs.get("tokens_trained", 0)) for t in trials)


def budget_spent(limits: SearchLimits, tokens: float) -> str | None:
    """THE rule for "the search budget is spent", shared by every strategy (worker processes, evolution,
    Ray) and by a trial deciding whether to stop: the deadline has passed, or ``tokens`` (what the search
    has trained, counted by the caller with :func:`tokens_used`) reached the token allowance. Returns why,
    or None while budget is left."""
    if limits.deadline_unix is not None and time.time() >= limits.deadline_unix:
        return "search time budget spent"
    if limits.search_tokens is not None and tokens >= limits.search_tokens:
        return "search token budget spent"
    return None


# ---------------------------------------------------------------------------------------- split
EVAL_SECONDS = 8.0
"""Wall clock the evaluation step needs at least (loading, scoring, the report: about 5 s on 2 CPU cores for a
small model); short time budgets reserve this much, up to ``EVAL_MAX_SHARE`` of the budget."""
EVAL_MAX_SHARE = 0.12
SHORT_BUDGET_S, LONG_BUDGET_S = 120.0, 1800.0
SHORT_SEARCH_SHARE = 0.45
"""Share of the search at budgets up to ``SHORT_BUDGET_S`` (then growing log-linearly to the default 70% at
``LONG_BUDGET_S``). A short budget cannot afford many full-length trials, and the final training, which
continues the best trial, turns time into validation loss more surely than a wider search does."""


def search_share(seconds: float, full: float = _SHARES_TIME["search"]) -> float:
    """The search's share of a time budget before the evaluation's reserve is taken out."""
    if seconds >= LONG_BUDGET_S:
        return full
    if seconds <= SHORT_BUDGET_S:
        return SHORT_SEARCH_SHARE
    f = math.log(seconds / SHORT_BUDGET_S) / math.log(LONG_BUDGET_S / SHORT_BUDGET_S)
    return SHORT_SEARCH_SHARE + f * (full - SHORT_SEARCH_SHARE)


def shares(budget: Budget, has_task: bool = False) -> dict[str, float]:
    """Fraction of the budget per step. Tokens are spent by training only, so the evaluation's share of a
    token budget goes to the final training. Short time budgets move part of the search's share to the
    final training (:func:`search_share`) and keep ``EVAL_SECONDS`` for the evaluation."""
    s = dict(_SHARES_TIME_TASK if has_task else _SHARES_TIME)
    if budget.kind == "tokens":
        s["final"] += s["evaluate"]
        s["evaluate"] = 0.0
        return s
    moved = s["search"] - search_share(budget.amount, s["search"])
    s["search"] -= moved
    s["final"] += moved
    ev = max(s["evaluate"], min(EVAL_SECONDS / max(budget.amount, 1e-9), EVAL_MAX_SHARE))
    scale = (1.0 - ev) / (1.0 - s["evaluate"])
    return {k: (ev if k == "evaluate" else v * scale) for k, v in s.items()}


def split_budget(budget: Budget, has_task: bool = False) -> dict[str, Budget]:
    return {step: budget.scaled(f) for step, f in shares(budget, has_task).items()}


def search_to_final(split: dict[str, float], keep: float) -> dict[str, float]:
    """``split`` with the search keeping ``keep`` of its share and the rest moved to the final training."""
    out = dict(split)
    moved = out["search"] * (1.0 - keep)
    out["search"] -= moved
    out["final"] += moved
    return out


class Ledger:
    """What each step spent, against the budget; persisted by the pipeline as a plain dict. ``split``: the
    shares the run planned (stored in its state), else :func:`shares` of the budget."""

    def __init__(
        self,
        budget: Budget,
        has_task: bool = False,
        spent: dict[str, float] | None = None,
        split: dict[str, float] | None = None,
    ) -> None:
        self.budget = budget
        self.shares = dict(split) if split else shares(budget, has_task)
        self.spent: dict[str, float] = {s: 0.0 for s in STEPS}
        self.spent.update(spent or {})

    @property
    def total_spent(self) -> float:
        return sum(self.spent.values())

    def allowance(self, step: str) -> float:
        """What ``step`` may still spend: its cumulative share minus what all steps spent so far."""
        cum = sum(self.shares[s] for s in STEPS[: STEPS.index(step) + 1])
        return max(0.0, self.budget.amount * cum - self.total_spent)

    def remaining(self) -> float:
        return max(0.0, self.budget.amount - self.total_spent)

    def charge(self, step: str, amount: float) -> None:
        self.spent[step] += max(0.0, amount)

    def describe(self) -> str:
        kind = self.budget.kind
        parts = [
            f"{s} {self.shares[s]:.0%} ({format_amount(self.budget.amount * self.shares[s], kind)})"
            for s in STEPS
            if self.shares[s] > 0
        ]
        return f"budget {self.budget}: " + ", ".join(parts)


# ------------------------------------------------------------------------------------- fidelity
@dataclass(frozen=True)
class Fidelity:
    """Trial lengths in trained tokens: every trial may train up to ``max_tokens``; the pruner's rungs sit
    at ``min_tokens * eta**k`` (``k = 0 .. rungs``), all multiples of ``tokens_per_step``."""

    min_tokens: int
    max_tokens: int
    eta: int
    rungs: int
    tokens_per_step: int

    @property
    def max_steps(self) -> int:
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step))

    @property
    def eval_steps(self) -> int:
        """Evaluate (and report to the pruner) every ``min_tokens``: each rung falls on an evaluation."""
        return max(1, self.min_tokens // self.tokens_per_step)

    def rung_of(self, tokens: int) -> int:
        """Highest rung reached with ``tokens`` trained (-1 below the first)."""
        if tokens < self.min_tokens:
            return -1
        return min(self.rungs, int(math.floor(math.log(tokens / self.min_tokens, self.eta) + 1e-9)))

    def to_dict(self) -> dict[str, int]:
        return {
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "eta": self.eta,
            "rungs": self.rungs,
            "tokens_per_step": self.tokens_per_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fidelity:
        return cls(**{k: int(d[k]) for k in ("min_tokens", "max_tokens", "eta", "rungs", "tokens_per_step")})


def plan_fidelity(
    search_tokens: float,
    tokens_per_step: int,
    *,
    full_trials: float = 8.0,
    eta: int = 3,
    max_rungs: int = 3,
    min_steps: int = 4,
    max_tokens: int | None = None,
    configs: float | None = None,
) -> Fidelity:
    """Trial length for a search that can train about ``search_tokens`` in all.

    The longest trial gets ``search_tokens / full_trials`` (the search can afford about that many full-length
    trials; successive halving fits many more short ones: with eta 3 and 3 rungs, about 27 starts per full
    trial); the shortest rung keeps at least ``min_steps`` optimizer steps. ``max_tokens`` forces the length.

    ``configs``: aim for about that many configurations instead. Successive halving that stops half of the
    trials at the first rung and all but ``1/eta`` at the next ones spends about one first-rung length per
    rung per configuration, so ``r`` rungs of shortest length ``m`` fit ``search / (m (1 + r))``
    configurations; the plan takes the most rungs whose longest trial (``m * eta**r``) stays within
    ``search_tokens / full_trials``, with ``m`` as short as ``configs`` needs (never under ``min_steps``);
    when not even one rung fits, the plan is the one without ``configs``.
    Breadth at a short first rung is what wins at moderate budgets (the one-pass top-K baseline of
    ``benchmarks/search_vs_baselines.py`` screens about 70 configurations in 10 minutes; the eight-full-trials
    plan gave 10-13 there).
    """
    tps = max(1, int(tokens_per_step))
    if configs is not None and max_tokens is None:
        total = search_tokens / tps
        ceiling = max(min_steps, total / max(1.0, full_trials))
        for r in range(max_rungs, 0, -1):
            m = max(min_steps, int(total / (configs * (1 + r))))
            if m * eta**r <= ceiling:
                return Fidelity(min_tokens=m * tps, max_tokens=m * eta**r * tps, eta=eta, rungs=r, tokens_per_step=tps)
        # no rung fits: one trial length, as long as the ceiling allows (as without ``configs``)
    longest = max_tokens if max_tokens is not None else search_tokens / max(1.0, full_trials)
    max_steps = max(min_steps, int(longest // tps))
    rungs = 0
    while rungs < max_rungs and max_steps / eta ** (rungs + 1) >= min_steps:
        rungs += 1
    min_steps_ = max(1, max_steps // eta**rungs)
    if max_tokens is not None:
        return Fidelity(
            min_tokens=min_steps_ * tps,
            max_tokens=max(int(max_tokens), min_steps_ * tps),
            eta=eta,
            rungs=rungs,
            tokens_per_step=tps,
        )
    return Fidelity(
        min_tokens=min_steps_ * tps, max_tokens=min_steps_ * eta**rungs * tps, eta=eta, rungs=rungs, tokens_per_step=tps
    )
