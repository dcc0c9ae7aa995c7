"""A ``lmforge tune --task`` run in progress: its state (``DIR/pipeline.json``), the time ledger that
charges wall time to the step that runs, each step's allowance, and the records of each split.

The budget is wall-clock time; each step may spend up to its cumulative share (``state["shares"]``) minus
what all steps spent so far, so time one step leaves passes on. A thread saves the ledger every
:data:`~lmforge.search.ticker.LEDGER_SAVE_S` seconds, so a killed run has charged (almost) all it spent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json
from lmforge.data.retrieval import RETRIEVAL_TASKS, RetrievalIndex, attach, build_index
from lmforge.data.tasks import get_task, read_located_records
from lmforge.search.budget import Budget
from lmforge.search.task_plan import STATE_FILE, TASK_STEPS, TaskPipelineError, TaskTuneOptions
from lmforge.search.ticker import ticking

MIN_TRIAL_S = 3.0
"""The shortest training run a step starts (less is not worth the start-up)."""
VAL_METRIC_RECORDS = 32
"""Validation records decoded by the re-ranking and the decoding search (the first ones)."""
VAL_CLASSIFY_RECORDS = 256
"""Classification's re-ranking scores this many (one forward pass per record, no decoding): with 32 records
one record moves the accuracy by 3 points, more than the trials differ by."""


class TaskRun:
    """The state of one task run and its clock; the steps (``lmforge.search.task_*``) read and record
    through it."""

    def __init__(
        self,
        state: dict[str, Any],
        run_dir: Path,
        opts: TaskTuneOptions,
        log: Callable[[str], None],
    ) -> None:
        self.state = state
        self.run_dir = run_dir
        self.opts = opts
        self.log = log
        self.task = get_task(state["task"])
        self._t = time.monotonic() if opts.started is None else min(opts.started, time.monotonic())
        # the start-up (and a resumed run's) is charged to the first step still to run
        pending = [s for s in TASK_STEPS if state["steps"][s]["status"] not in ("done", "skipped")]
        self.step = pending[0] if pending else TASK_STEPS[-1]
        self.lock = threading.RLock()
        self._records: list[dict[str, Any]] | None = None
        self._index: RetrievalIndex | None = None
        self._with_examples: dict[tuple[str, int], list[dict[str, Any]]] = {}

    # -- state and ledger -----------------------------------------------------------------------------
    def save(self) -> None:
        with self.lock:
            atomic_write_json(self.run_dir / STATE_FILE, self.state)

    def tick(self, save: bool = False) -> None:
        """Charge the time since the last tick to the step that runs."""
        with self.lock:
            now = time.monotonic()
            self.state["spent_s"][self.step] += now - self._t
            self._t = now
            if save:
                self.save()

    def enter(self, step: str) -> None:
        """From now on, time is charged to ``step``."""
        with self.lock:
            self.tick()
            self.step = step

    def set_step(self, step: str, **fields: Any) -> None:
        with self.lock:
            self.state["steps"][step].update(fields)
            self.save()

    @property
    def budget_s(self) -> float:
        return float(Budget.from_dict(self.state["budget"]).amount)

    def allowance(self, step: str) -> float:
        """What ``step`` may still spend: its cumulative share minus what all steps spent so far."""
        self.tick()
        shares = self.state["shares"]
        cum = sum(shares[s] for s in TASK_STEPS[: TASK_STEPS.index(step) + 1])
        return max(0.0, self.budget_s * cum - sum(self.state["spent_s"].values()))

    def ledger_clock(self) -> contextlib.AbstractContextManager[None]:
        """While the steps run: tick and save the ledger every ``LEDGER_SAVE_S`` seconds (the steps' own
        saves report a disk that cannot be written)."""
        return ticking(lambda: self.tick(save=True), lambda err: None, name="lmforge-task-ledger")

    # -- data -----------------------------------------------------------------------------------------
    def records(self, split: str) -> list[dict[str, Any]]:
        if self._records is None:
            plan = self.state["plan"]
            self._records = [r for _, r in read_located_records(plan["data"], self.task, self.state["fields"])]
            n = sum(len(self.state["split"][s]) for s in ("train", "val", "test"))
            if len(self._records) != n:
                raise TaskPipelineError(
                    f"{plan['data']} now holds {len(self._records)} records; this run split {n}: use a new --out"
                )
        return [self._records[i] for i in self.state["split"][split]]

    def val_metric_records(self, k: int = 0) -> list[dict[str, Any]]:
        n = VAL_CLASSIFY_RECORDS if self.task.name == "classification" else VAL_METRIC_RECORDS
        return self.prompt_records("val", k)[:n]

    # -- retrieval ------------------------------------------------------------------------------------
    @property
    def uses_retrieval(self) -> bool:
        """Whether the search tries prompts with retrieved training examples (:mod:`lmforge.data.retrieval`)."""
        return self.task.name in RETRIEVAL_TASKS

    def retrieval_index(self, k: int = 1) -> RetrievalIndex:
        """The index of the training records (built once per process)."""
        if self._index is None:
            self._index = build_index(self.task, self.records("train"), k)
        self._index.k = k
        return self._index

    def prompt_records(self, split: str, k: int) -> list[dict[str, Any]]:
        """The records of ``split`` with their ``k`` nearest training records attached (``k`` 0: as they are),
        as training, the decoding search, the evaluation and ``lmforge eval`` of the model see them."""
        if k == 0:
            return self.records(split)
        if (split, k) not in self._with_examples:
            self._with_examples[split, k] = attach(self.retrieval_index(k), self.records(split), k)
        return self._with_examples[split, k]

    def retrieval_k(self) -> int:
        """The retrieved examples per prompt of the search's winner (0: none)."""
        params = self.state["steps"]["search"].get("winner_params") or {}
        return int(params.get("retrieval", 0))

    def task_info(self) -> dict[str, Any]:
        return {"task": self.task.name, "fields": self.state["fields"], "labels": self.state["labels"]}

    # -- the start model ------------------------------------------------------------------------------
    def candidates(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.state["plan"]["candidates"]}

    def start_model(self, name: str | None = None) -> str:
        """The checkpoint fine-tuning starts from: ``--init``, or the pretrained model of candidate ``name``
        (default: the search's winner)."""
        plan = self.state["plan"]
        if plan.get("init"):
            return str(plan["init"])
        if name is None:
            name = str(self.state["steps"]["final"].get("start") or plan["candidates"][0]["name"])
        return str(self.state["steps"]["pretrain"]["candidates"][name]["start"])
