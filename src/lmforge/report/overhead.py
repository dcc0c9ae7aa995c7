"""Where a search's time went: the trials' wall time by phase, from what each trial recorded itself.

Every trial records ``duration_s`` (its wall time) and ``phases`` (from the training loop: ``build_s``,
``train_s`` = optimizer steps, ``compile_s``, ``eval_s``, ``checkpoint_s``); a worker process of its own
records its start-up (``worker_startup``: process start and imports, data preparation) on its first trial.
What a trial spent outside the loop (configuration, study writes, the objective's own work) is its duration
less its phases. The pipeline's ``spent_s`` (``pipeline.json``) adds the steps around the search and the
time between trials (the sampler, study reads, disk cap) in a single-process search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.report.run import ReportRun

PHASES = (
    ("build_s", "model build (model, optimizer, data views)"),
    ("train_s", "training: optimizer steps"),
    ("compile_s", "compile (first compiled step)"),
    ("eval_s", "evaluation"),
    ("checkpoint_s", "checkpoint and best/ writes"),
)


@dataclass(frozen=True)
class Overhead:
    rows: list[tuple[str, float]]
    """(phase, seconds) in order; the trial phases first, then the time around them."""
    trial_s: float
    """Summed wall time of the trials that recorded phases."""
    train_s: float
    trials: int

    @property
    def train_share(self) -> float:
        """Share of the trials' wall time that is optimizer steps (the "trial overhead" goal: >= 95%)."""
        return self.train_s / self.trial_s if self.trial_s > 0 else 0.0


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0


def overhead(run: ReportRun) -> Overhead | None:
    """The search's wall time by phase (None when no trial recorded phases: a run from before they were)."""
    timed = [t for t in run.trials if isinstance(t.user_attrs.get("phases"), dict)]
    if not timed:
        return None
    sums = {key: sum(_num(t.user_attrs["phases"].get(key)) for t in timed) for key, _ in PHASES}
    trial_s = sum(_num(t.user_attrs.get("duration_s")) for t in timed)
    rows: list[tuple[str, float]] = []
    startups = [t.user_attrs["worker_startup"] for t in run.trials if isinstance(t.user_attrs.get("worker_startup"), dict)]
    if startups:
        rows.append(("worker process start and imports", sum(_num(s.get("process_s")) for s in startups)))
        rows.append(("worker data preparation", sum(_num(s.get("data_s")) for s in startups)))
    rows += [(label, sums[key]) for key, label in PHASES]
    rows.append(("trial set-up and study writes (duration less phases)", max(0.0, trial_s - sum(sums.values()))))
    spent = (run.state or {}).get("spent_s")
    if isinstance(spent, dict):
        for step, seconds in spent.items():
            if step == "search":
                if not startups:  # one process: the search step is the trials and the time between them
                    all_trials = sum(_num(t.user_attrs.get("duration_s")) for t in run.trials)
                    rows.append(("search step outside trials (data, plan, study, sampler)", max(0.0, _num(seconds) - all_trials)))
            else:
                rows.append((f"pipeline step: {step}", _num(seconds)))
    return Overhead(rows=rows, trial_s=trial_s, train_s=sums["train_s"], trials=len(timed))


def overhead_text(ov: Overhead) -> str:
    """The table as plain text (the benchmark prints it)."""
    total = sum(s for _, s in ov.rows) or 1.0
    lines = [f"{'phase':<58} {'seconds':>9} {'share':>7}"]
    lines += [f"{name:<58} {s:>9.2f} {100 * s / total:>6.1f}%" for name, s in ov.rows]
    lines.append(f"optimizer steps: {100 * ov.train_share:.1f}% of the wall time of {ov.trials} trials "
                 f"({ov.trial_s:.1f} s); {100 * ov.train_s / total:.1f}% of all time listed")
    return "\n".join(lines)
