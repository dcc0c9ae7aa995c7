"""What a tuning run concludes: the best trial, ``DIR/leaderboard.csv`` and ``DIR/summary.json``, and the
summary's text for the terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmforge.atomic import atomic_write_json
from lmforge.search.budget import Budget, Ledger, format_count, tokens_used
from lmforge.search.context import SearchContext
from lmforge.search.disk import MARKER
from lmforge.search.leaderboard import rows, write_csv
from lmforge.search.study import dashboard_command

SUMMARY_FILE = "summary.json"
LEADERBOARD_FILE = "leaderboard.csv"


def write_outputs(run_dir: Path, state: dict[str, Any], study: optuna.Study, ctx: SearchContext) -> None:
    """Write ``DIR/leaderboard.csv`` and ``DIR/summary.json`` (atomically: a reader sees the old or the new)."""
    table = rows(study, ctx.objectives, ctx.fid)
    write_csv(list(table), run_dir / LEADERBOARD_FILE)
    atomic_write_json(run_dir / SUMMARY_FILE, build_summary(run_dir, state, study, ctx, table))


def select_best(study: optuna.Study, ctx: SearchContext) -> FrozenTrial | None:
    """The finished trial with the lowest validation loss (within ``--max-params``); failing that, the
    pruned trial with the lowest last report whose checkpoints remain. None when there is neither."""

    def ok(t: FrozenTrial) -> bool:
        rel = t.user_attrs.get("run_dir")
        if not rel or (Path(ctx.run_dir) / rel / MARKER).exists():
            return False
        return ctx.max_params is None or int(t.user_attrs.get("params") or 0) <= ctx.max_params

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values and math.isfinite(t.values[0]) and ok(t)]
    if done:
        return min(done, key=lambda t: t.values[0])
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values and ok(t)]
    if pruned:
        return min(pruned, key=lambda t: min(t.intermediate_values.values()))
    return None


def build_summary(
    run_dir: Path, state: dict[str, Any], study: optuna.Study, ctx: SearchContext, table: list[dict[str, Any]]
) -> dict[str, Any]:
    """The content of ``DIR/summary.json``: the study, the budget and what each step spent, the trials,
    the best configuration and its held-out evaluation."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("discarded")]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    search_tokens = tokens_used(trials)
    finished_tokens = sum(int(t.user_attrs.get("tokens", 0)) for t in complete)
    final = state["steps"]["final"]
    best_trial = None
    if final.get("plan"):
        n = final["plan"]["trial"]
        bt = next((t for t in trials if t.number == n), None)
        if bt is not None:
            space = ctx.search_space
            searched = {d.path for d in space.dists}
            best_trial = {
                "trial": n,
                # an evolution child's mutated values may lie outside the space: it records them itself
                "values": {k: v for k, v in (bt.user_attrs.get("values") or space.values_from_params(bt.params)).items()
                           if k in searched},
                "search_val_loss": bt.values[0] if bt.values else bt.user_attrs.get("val_loss"),
                "params": bt.user_attrs.get("params"),
            }
    evaluation = {k: v for k, v in state["steps"]["evaluate"].items() if k != "status"}
    pareto = [t.number for t in study.best_trials] if len(ctx.objectives) > 1 and complete else []
    budget = Budget.from_dict(state["budget"])
    return {
        "run_dir": str(run_dir),
        "study": {
            "name": state["study_name"],
            "storage": state["storage"],
            "dashboard": dashboard_command(state["storage"]),
        },
        "budget": {
            "total": str(budget),
            **budget.to_dict(),
            "shares": Ledger(budget, split=state.get("shares")).shares,
            "spent_s": {k: round(v, 2) for k, v in state["spent_s"].items()},
            "spent_tokens": state["spent_tokens"],
        },
        "objectives": ctx.objectives,
        "sampler": ctx.sampler,
        "pruner": ctx.pruner,
        "cv": ctx.cv,
        "fidelity": ctx.fidelity,
        "trials": {"total": len(trials), **counts},
        "tokens": {
            "search_total": search_tokens,
            "finished_trials": finished_tokens,
            "finished_share": round(finished_tokens / search_tokens, 4) if search_tokens else None,
            "final_training": final.get("tokens", 0),
        },
        "best": {**(best_trial or {}), **evaluation, "checkpoint": str(run_dir / "best")},
        "pareto_front": pareto,
        "steps": {k: v.get("status") for k, v in state["steps"].items()},
        "leaderboard": str(run_dir / "leaderboard.csv"),
        "notes": state.get("notes", []),
    }


def summary_text(s: dict[str, Any]) -> str:
    """The summary as the few lines printed at the end of ``lmforge tune``."""
    b = s["best"]
    t = s["trials"]
    tok = s["tokens"]
    lines = [
        "",
        f"== lmforge tune: {s['run_dir']}",
        f"trials: {t['total']} ({t.get('complete', 0)} finished, {t.get('pruned', 0)} pruned, "
        f"{t.get('fail', 0)} failed)",
        f"tokens: {format_count(tok['search_total'])} trained in the search, {format_count(tok['finished_trials'])} "
        f"of them in finished trials; {format_count(tok['final_training'])} in the final training",
    ]
    if b.get("values"):
        lines.append(
            "best configuration (trial {}): {}".format(
                b.get("trial"), ", ".join(f"{k}={v}" for k, v in b["values"].items())
            )
        )
    if "test_loss" in b:
        lines.append(
            f"test loss {b['test_loss']:.4f} (perplexity {b['test_ppl']:.2f}); validation loss "
            f"{b.get('val_loss', float('nan')):.4f}; {format_count(b.get('params') or 0)} parameters; "
            f"{b.get('latency_ms_per_token', float('nan')):.2f} ms/token greedy"
        )
    if s["pareto_front"]:
        lines.append(f"Pareto front: trials {s['pareto_front']}")
    lines += [
        f"best model: {b['checkpoint']}",
        f"leaderboard: {s['leaderboard']}",
        f"dashboard: {s['study']['dashboard']}",
    ]
    return "\n".join(lines)
