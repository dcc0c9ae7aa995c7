"""How much the search can train and how large a model the budget can take: the trials' token fidelity,
the soft parameter cap, and the default space narrowed to both (a user's space is used as given)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.config import RunConfig
from lmforge.search import sizing
from lmforge.search.budget import Budget, Fidelity, Ledger, plan_fidelity, search_to_final
from lmforge.search.context import SearchData
from lmforge.search.space import SearchSpace

RUNG_MIN_STEPS = 16
"""Optimizer steps of the shortest rung (unless --trial-tokens sets the trial length)."""
CONFIGS = 64
"""Configurations the trial plan aims for (:func:`lmforge.search.budget.plan_fidelity`'s ``configs``)."""
NO_RUNG_SEARCH = 0.5
"""Share of its search time a time budget keeps when its plan has no rung (the rest goes to the final
training). With no rung, trials are one short length each and their one-point curves cannot be extrapolated;
a handful of such trials buys less than the same seconds of training the chosen model: in the 90-second
benchmark on a loaded machine (benchmarks/RESULTS.md, session 7) the default configuration trained alone beat
every search, lmforge's by 0.17-0.22 nats, and lmforge's plan had no rung in every run; rerun with this cut,
lmforge was 0.21 and 0.16 below the default alone on two of the three corpora, 0.14 above on the third."""


@dataclass
class CapacityPlan:
    """What the budget affords: the trials' fidelity, the size cap, and the tokens the final model is
    expected to train (which sets how much regularization the space keeps)."""

    fidelity: Fidelity
    param_cap: int
    final_model_tokens: float
    record: dict[str, Any]
    """The plan as recorded in ``pipeline.json`` (``plan``)."""
    split: dict[str, float]
    """The budget's shares per step (:class:`lmforge.search.budget.Ledger`), stored in the run's state."""


def plan_capacity(
    base: dict[str, Any],
    base_cfg: RunConfig,
    data: SearchData,
    budget: Budget,
    *,
    n_jobs: int,
    trial_tokens: int | None,
) -> CapacityPlan:
    """The trial length and model size cap for ``budget``: a time budget measures the machine's throughput
    on the base config first, a token budget is split directly."""
    led = Ledger(budget)
    vocab = data.tokenizer.vocab_size
    n_train = len(data.prepared.train)
    tps = base_cfg.train.batch_size * base_cfg.data.block_size * base_cfg.train.grad_accum
    plan: dict[str, Any] = {"tokens_per_step": tps}
    if budget.kind == "time":
        flops, ref_tok_s = sizing.measure_throughput(base, data.prepared.train, vocab)
        search_s = budget.amount * led.shares["search"]
        final_s = budget.amount * led.shares["final"]
        cap = sizing.size_cap_for_time(flops, final_s + search_s / 8, n_train)
        typical = max(1.0, 6.0 * cap / 3)  # FLOPs per token of a typical (third-of-the-cap) model
        # small models are bound by per-step overhead (the reference's speed), larger ones by FLOPs
        tok_s = min(flops / typical, ref_tok_s)
        search_tokens_est = 0.6 * tok_s * search_s * n_jobs**0.5
        final_model_tokens = tok_s * (final_s + search_s / 8)
        plan.update(flops_per_s=flops, reference_tokens_per_s=ref_tok_s, search_tokens_estimate=search_tokens_est)
    else:
        search_tokens_est = budget.amount * led.shares["search"]
        final_tokens = budget.amount * led.shares["final"]
        cap = sizing.size_cap_for_tokens(final_tokens + search_tokens_est / 8, n_train)
        final_model_tokens = final_tokens + search_tokens_est / 8
    # the first rung needs enough optimizer steps to rank trials by more than their initialization; a
    # trial length set by the user (--trial-tokens) gets as many rungs as fit it
    fid = plan_fidelity(
        search_tokens_est, tps, max_tokens=trial_tokens, min_steps=4 if trial_tokens else RUNG_MIN_STEPS,
        configs=None if trial_tokens else CONFIGS,
    )  # fmt: skip
    plan.update(param_cap=cap, fidelity=fid.to_dict())
    split = led.shares
    if budget.kind == "time" and fid.rungs == 0 and not trial_tokens:
        split = search_to_final(split, NO_RUNG_SEARCH)
        plan["search_share_cut"] = f"no rung fits: the search keeps {NO_RUNG_SEARCH:.0%} of its share, the final gets the rest"
    return CapacityPlan(fidelity=fid, param_cap=cap, final_model_tokens=final_model_tokens, record=plan, split=split)


def narrow_default_space(
    space: SearchSpace, base: dict[str, Any], data: SearchData, capacity: CapacityPlan
) -> tuple[SearchSpace, list[str]]:
    """The shipped space cut to the models the budget can train, its regularization fitted to the
    tokens per training token the final model will see; (space, notes)."""
    n_train = len(data.prepared.train)
    space, cap_notes = sizing.cap_space(space, base, data.tokenizer.vocab_size, capacity.param_cap)
    space, start_notes = sizing.shrink_starts(space, base, data.tokenizer.vocab_size, capacity.param_cap)
    space, reg_notes = sizing.fix_regularization(space, capacity.final_model_tokens / max(1, n_train))
    return space, cap_notes + start_notes + reg_notes
