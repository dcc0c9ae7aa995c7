"""``lmforge tune --task T``: a task model from records, within one time budget, resumable step by step.

Steps (each recorded in ``DIR/pipeline.json`` when done, so a killed run continues where it stopped; the
records' train/val/test split, deterministic in ``--seed``, is recorded there too):

1. ``pretrain`` (no ``--init``): a language model on the task's own text (every field of the training
   records, one document per record) plus any ``--corpus``, searched and trained by the plain ``lmforge tune``
   pipeline in ``DIR/pretrain-NAME`` (its own resumable run) for each tokenizer candidate NAME (byte-level BPE
   and char, see :func:`plan_tokenizers`), the step's share split between them. With ``--init``: skipped,
   the fine-tuning starts from that checkpoint.
2. ``search``: fine-tuning hyperparameters (the pretrained start, i.e. the tokenizer; lr, epochs, batch size)
   by an Optuna TPE study (``DIR/finetune.journal``), each trial a fine-tune in ``DIR/ft/NNNN`` scored by its
   best validation completion loss in nats per byte (comparable across tokenizers); the :data:`RERANK_TOP`
   best are re-ranked by the task metric on validation records.
3. ``final``: the winner's settings fine-tuned again from the start model with the rest of the budget's
   fine-tuning share (``DIR/final``); ``DIR/best`` is the better (validation loss) of that and the winner's
   trial checkpoint.
4. ``decode``: decoding settings searched on validation records with the task metric
   (:mod:`lmforge.search.decode_search`), written to ``DIR/best/generation_config.json``: the defaults of
   ``lmforge generate``, ``eval`` and ``export``.
5. ``evaluate``: the held-out test records (never read by the steps above), the task metric beside trivial
   baselines (:mod:`lmforge.evaluate.baselines`): ``DIR/summary.json``, ``DIR/leaderboard.csv``,
   ``DIR/test_report.json``, and the caller's report.

Every record is validated before anything is written (:func:`lmforge.data.tasks.check_task_records`): a bad
input leaves no ``DIR`` behind. The budget is wall-clock time; each step may spend up to its cumulative share
(:data:`SHARES`) minus what all steps spent so far, so time one step leaves passes on.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from lmforge.atomic import atomic_write_json, atomic_write_text
from lmforge.config import TASK_NAMES, TokenizerConfig, build_config
from lmforge.data.sources import read_documents
from lmforge.data.tasks import (
    Task,
    TaskDataError,
    check_fits_context,
    check_task_records,
    get_task,
    parse_fields,
    read_located_records,
    split_records,
    task_data_from_records,
    task_labels,
)
from lmforge.data.tokenizer import build_tokenizer
from lmforge.evaluate.baselines import baselines
from lmforge.evaluate.runner import evaluate_task
from lmforge.predict.config import GenerationConfig
from lmforge.predict.generation_config import load_generation_defaults, save_generation_defaults, with_defaults
from lmforge.predict.loading import load_pretrained
from lmforge.runs import run_lock, write_task_file
from lmforge.search import decode_search as D
from lmforge.search.budget import Budget, format_amount, parse_budget
from lmforge.search.final import install_dir
from lmforge.search.finetune import (
    PRETRAINED_START,
    finetune_config,
    pretrain_lm,
    set_schedule_length,
    train_on_task,
)
from lmforge.search.study import SearchError, open_storage, quiet_optuna
from lmforge.train.callbacks import TrainResult

STATE_FILE = "pipeline.json"
SUMMARY_FILE = "summary.json"
LEADERBOARD_FILE = "leaderboard.csv"
STATE_VERSION = 1
KIND = "task"
TASK_STEPS = ("pretrain", "search", "final", "decode", "evaluate")
SHARES = {"pretrain": 0.40, "search": 0.25, "final": 0.15, "decode": 0.10, "evaluate": 0.10}
"""Fraction of the budget per step (from scratch)."""
SHARES_INIT = {"pretrain": 0.0, "search": 0.45, "final": 0.25, "decode": 0.15, "evaluate": 0.15}
"""Fraction of the budget per step with ``--init`` (no pretraining)."""
RERANK_TOP = 3
"""The best trials by validation loss that are re-ranked by the task metric."""
VAL_METRIC_RECORDS = 32
"""Validation records decoded by the re-ranking and the decoding search (the first ones)."""
PLANNED_TRIALS = 4
"""The search's time is planned for this many trials (each gets its share as its clock)."""
MIN_TRIAL_S = 3.0
MAX_FAILED_TRIALS = 3
"""Failed trials after which a search out of time stops (three times as many stop it in any case)."""
MAX_BLOCK = 512
"""The longest context a model pretrained here gets (examples are truncated from the left to it)."""
MIN_BLOCK = 64
LEDGER_SAVE_S = 2.0
PRETRAIN_MIN_S = 30.0
"""The shortest pretraining search that finishes a trial on a loaded 2-core machine (data preparation and
the search's own start-up come first); a smaller share is raised to it, overrunning a tiny budget."""
BPE_CHARS_PER_TOKEN = 200
"""The BPE vocabulary grows with the training text: one token per this many characters (within bounds)."""
BPE_VOCAB = (512, 4096)
CHAR_BELOW = 100_000
EXAMPLES_IN_SUMMARY = 5
FALLBACK_MODEL = {"n_layer": 2, "d_model": 64, "n_head": 4}
"""The pretrained model when the pretraining search finishes no trial in its time."""


class TaskPipelineError(SearchError):
    """A task pipeline that cannot run as asked (one line naming the option, file, record or field)."""


@dataclass
class TaskTuneOptions:
    """The options of ``lmforge tune --task`` (see ``lmforge tune --help``)."""

    out: str
    task: str
    data: str | None = None
    fields: str | None = None
    corpus: list[str] = field(default_factory=list)
    init: str | None = None
    budget: str | None = None
    seed: int = 0
    n_trials: int | None = None
    verbose: bool = True
    started: float | None = None
    """``time.monotonic()`` when the command started (its start-up is charged to the budget). Not stored."""

    def stored(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("started")
        d.pop("verbose")
        return d


# ------------------------------------------------------------------------------------------ plan
def plan_tokenizers(texts: list[str]) -> list[dict[str, Any]]:
    """The tokenizer candidates of a model pretrained here, each pretrained in turn and chosen between by
    the fine-tuning search: byte-level BPE (char-level models score badly on summarization: every token of
    context buys one character) with a vocabulary sized to the text (one token per
    :data:`BPE_CHARS_PER_TOKEN` characters, within :data:`BPE_VOCAB`), and ``char``. Below
    :data:`CHAR_BELOW` characters a BPE vocabulary's embeddings alone would outweigh what the text can
    train, so ``char`` alone (unseen characters of later records map to its unknown token)."""
    chars = sum(len(t) for t in texts)
    char = {"name": "char", "kind": "char", "vocab_size": 1024}
    if chars < CHAR_BELOW:
        return [{**char, "why": f"{chars} characters < {CHAR_BELOW}: char only"}]
    vocab = int(min(BPE_VOCAB[1], max(BPE_VOCAB[0], chars // BPE_CHARS_PER_TOKEN)))
    return [
        {"name": "bpe", "kind": "bpe", "vocab_size": vocab, "why": f"{chars} characters: bpe {vocab}"},
        {**char, "why": "the character-level alternative"},
    ]


def _block_size(lengths: list[int]) -> int:
    """A power of two covering the 95th percentile of the examples' token lengths, in [MIN_BLOCK, MAX_BLOCK]."""
    p95 = float(np.percentile(np.asarray(lengths, dtype=float), 95)) if lengths else MIN_BLOCK
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 2 ** math.ceil(math.log2(max(p95, 1.0))))))


def _record_text(task: Task, rec: dict[str, Any]) -> str:
    """Every field of a record as one document (chat: every message's content)."""
    if task.name == "chat":
        return "\n".join(m["content"] for m in rec["messages"])
    return "\n".join(str(rec[r]) for r in task.roles)


def _init_path(init: str) -> str:
    p = Path(init).expanduser()
    return str(p.resolve()) if p.exists() else init


def validate_and_plan(opts: TaskTuneOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Read and check everything a new run depends on, before ``DIR`` is created; return its initial state."""
    if opts.task not in TASK_NAMES or opts.task == "lm":
        raise TaskPipelineError(f"--task {opts.task!r}: expected one of {[t for t in TASK_NAMES if t != 'lm']}")
    if not opts.data:
        raise TaskPipelineError("no data: pass --data RECORDS (.jsonl/.json/.csv or hf:NAME)")
    budget = parse_budget(opts.budget or "10m")
    if budget.kind != "time":
        raise TaskPipelineError(f"--budget {opts.budget}: tune --task takes a time budget (90s, 10m, 2h)")
    task = get_task(opts.task)
    data = str(Path(opts.data).expanduser().resolve()) if Path(opts.data).expanduser().exists() else opts.data
    located = read_located_records(data, task, opts.fields)
    check_task_records(data, task, located, opts.fields)
    split = split_records(len(located), opts.seed)
    check_task_records(data, task, located, opts.fields, split["train"])
    train_recs = [located[i][1] for i in split["train"]]
    corpus = [str(Path(c).expanduser().resolve()) if Path(c).expanduser().exists() else c for c in opts.corpus]
    corpus_docs: list[str] = []
    for c in corpus:
        corpus_docs += read_documents(c).texts
    plan: dict[str, Any] = {"data": data, "corpus": corpus}
    if opts.init:
        init = _init_path(opts.init)
        model, tokenizer, cfg = load_pretrained(init)
        context = int(getattr(model, "max_seq_len", None) or cfg.data.block_size + 1)
        check_fits_context(task, located, tokenizer, context, opts.fields)
        plan.update(init=init)
        plan["candidates"] = [{"name": "init", "block_size": min(int(cfg.data.block_size), context)}]
        plan["lr"] = PRETRAINED_START["optim"]["lr"]
        plan["lr_range"] = [1e-5, 5e-4]
    else:
        texts = [_record_text(task, r) for r in train_recs] + corpus_docs
        candidates = []
        for cand in plan_tokenizers(texts):
            tok = build_tokenizer(TokenizerConfig(kind=cand["kind"], vocab_size=cand["vocab_size"]), texts)
            check_fits_context(task, located, tok, MAX_BLOCK + 1, opts.fields)
            lengths = [
                len(tok.encode(task.format_prompt(r))) + len(tok.encode(" " + task.reference(r))) + 1
                for r in train_recs
            ]
            candidates.append({**cand, "block_size": _block_size(lengths)})
        plan["candidates"] = candidates
    labels = task_labels([rec for _, rec in located]) if task.name == "classification" else None
    shares = SHARES_INIT if opts.init else SHARES
    log(
        f"task {task.name}: {len(located)} records from {data}: {len(split['train'])} train / "
        f"{len(split['val'])} validation / {len(split['test'])} test (seed {opts.seed})"
    )
    return {
        "version": STATE_VERSION,
        "kind": KIND,
        "task": task.name,
        "options": opts.stored(),
        "budget": budget.to_dict(),
        "shares": shares,
        "split": {"seed": opts.seed, **split},
        "fields": parse_fields(opts.fields, task),
        "labels": labels,
        "plan": plan,
        "spent_s": {s: 0.0 for s in TASK_STEPS},
        "steps": {s: {"status": "pending"} for s in TASK_STEPS},
    }


def read_task_state(run_dir: str | Path) -> dict[str, Any] | None:
    """The state of a task run in ``run_dir`` (None: no run, or a plain ``lmforge tune`` run)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskPipelineError(f"{path} is corrupted ({err}); move it away to start the run over") from None
    return state if isinstance(state, dict) and state.get("kind") == KIND else None


def run_task_pipeline(opts: TaskTuneOptions, finish: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the task pipeline in ``opts.out``; return the summary (also ``DIR/summary.json``).
    ``finish(run_dir)`` (the HTML report) runs in the evaluation step, on the budget's clock."""
    quiet_optuna()
    log = _logger(opts.verbose)
    run_dir = Path(opts.out).expanduser().resolve()
    state = read_task_state(run_dir)
    if state is None:
        if (run_dir / STATE_FILE).is_file():
            raise TaskPipelineError(f"{run_dir} holds a plain lmforge tune run (no --task): use another --out")
        state = validate_and_plan(opts, log)  # before DIR exists: a bad input leaves nothing behind
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / STATE_FILE, state)
    else:
        if opts.task != state["task"]:
            raise TaskPipelineError(f"--task {opts.task}: {run_dir} holds a --task {state['task']} run")
        log(f"resuming {run_dir} (steps done: {', '.join(s for s in TASK_STEPS if state['steps'][s]['status'] in ('done', 'skipped')) or 'none'})")
        if opts.budget and parse_budget(opts.budget).to_dict() != state["budget"]:
            new = parse_budget(opts.budget)
            if new.kind != "time":
                raise TaskPipelineError(f"--budget {opts.budget}: tune --task takes a time budget")
            log(f"budget changed from {Budget.from_dict(state['budget'])} to {new}")
            state["budget"] = new.to_dict()
    with run_lock(run_dir, "tune"):
        return _TaskPipeline(state, run_dir, opts, finish, log).run()


def _logger(verbose: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    return log


class _TaskPipeline:
    def __init__(
        self,
        state: dict[str, Any],
        run_dir: Path,
        opts: TaskTuneOptions,
        finish: Callable[[Path], None] | None,
        log: Callable[[str], None],
    ) -> None:
        self.state = state
        self.run_dir = run_dir
        self.opts = opts
        self.finish = finish
        self.log = log
        self.task = get_task(state["task"])
        self._t = time.monotonic() if opts.started is None else min(opts.started, time.monotonic())
        # the start-up (and a resumed run's) is charged to the first step still to run
        pending = [s for s in TASK_STEPS if state["steps"][s]["status"] not in ("done", "skipped")]
        self._step = pending[0] if pending else TASK_STEPS[-1]
        self._lock = threading.RLock()
        self._records: list[dict[str, Any]] | None = None

    # -- state and ledger -----------------------------------------------------------------------------
    def save(self) -> None:
        with self._lock:
            atomic_write_json(self.run_dir / STATE_FILE, self.state)

    def tick(self, save: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            self.state["spent_s"][self._step] += now - self._t
            self._t = now
            if save:
                self.save()

    def set_step(self, step: str, **fields: Any) -> None:
        with self._lock:
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

    @contextlib.contextmanager
    def ledger_clock(self) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(LEDGER_SAVE_S):
                with contextlib.suppress(OSError):
                    self.tick(save=True)

        thread = threading.Thread(target=loop, daemon=True, name="lmforge-task-ledger")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    # -- data -----------------------------------------------------------------------------------------
    def records(self, split: str) -> list[dict[str, Any]]:
        if self._records is None:
            plan = self.state["plan"]
            self._records = [
                r for _, r in read_located_records(plan["data"], self.task, self.state["fields"])
            ]
            n = len(self.state["split"]["train"]) + len(self.state["split"]["val"]) + len(self.state["split"]["test"])
            if len(self._records) != n:
                raise TaskPipelineError(
                    f"{plan['data']} now holds {len(self._records)} records; this run split {n}: use a new --out"
                )
        return [self._records[i] for i in self.state["split"][split]]

    def val_metric_records(self) -> list[dict[str, Any]]:
        return self.records("val")[:VAL_METRIC_RECORDS]

    def task_info(self) -> dict[str, Any]:
        return {"task": self.task.name, "fields": self.state["fields"], "labels": self.state["labels"]}

    # -- entry ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        shares = self.state["shares"]
        self.log(
            f"budget {Budget.from_dict(self.state['budget'])}: "
            + ", ".join(f"{s} {shares[s]:.0%}" for s in TASK_STEPS if shares[s] > 0)
        )
        try:
            with self.ledger_clock():
                for step in TASK_STEPS:
                    if self.state["steps"][step]["status"] in ("done", "skipped"):
                        continue
                    with self._lock:
                        self._step = step
                    getattr(self, f"_step_{step}")()
                    self.tick(save=True)
        finally:
            self.tick(save=True)
        return json.loads((self.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))

    # -- step 1: pretrain ------------------------------------------------------------------------------
    def candidates(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.state["plan"]["candidates"]}

    def start_model(self, name: str | None = None) -> str:
        """The checkpoint fine-tuning starts from: ``--init``, or the pretrained model of candidate ``name``
        (default: the search's winner)."""
        plan = self.state["plan"]
        if plan.get("init"):
            return str(plan["init"])
        if name is None:
            name = str(self.state["steps"]["final"].get("start") or self.state["plan"]["candidates"][0]["name"])
        return str(self.state["steps"]["pretrain"]["candidates"][name]["start"])

    def _step_pretrain(self) -> None:
        plan = self.state["plan"]
        if plan.get("init"):
            self.set_step("pretrain", status="skipped", reason=f"--init {plan['init']}")
            return
        corpus = self.run_dir / "pretrain_corpus.jsonl"
        if not corpus.is_file():
            docs = [_record_text(self.task, r) for r in self.records("train")]
            for c in plan["corpus"]:
                docs += read_documents(c).texts
            atomic_write_text(corpus, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        self.set_step("pretrain", status="running")
        done: dict[str, dict[str, Any]] = dict(self.state["steps"]["pretrain"].get("candidates") or {})
        todo = [c for c in plan["candidates"] if "start" not in done.get(c["name"], {})]
        for i, cand in enumerate(todo):
            entry = done.setdefault(cand["name"], {})
            if "budget_s" not in entry:
                share = self.allowance("pretrain") / (len(todo) - i)
                if share < PRETRAIN_MIN_S:
                    self.log(f"[pretrain] {cand['name']}: its share ({share:.0f}s) is raised to {PRETRAIN_MIN_S:.0f}s: "
                             "the budget will be overrun (give a larger --budget, or --init a pretrained model)")
                entry["budget_s"] = round(max(share, PRETRAIN_MIN_S), 1)
                self.set_step("pretrain", candidates=done)
            entry.update(self._pretrain_one(cand, corpus, entry))
            self.set_step("pretrain", candidates=done)
        self.set_step("pretrain", status="done")

    def _pretrain_one(self, cand: dict[str, Any], corpus: Path, entry: dict[str, Any]) -> dict[str, Any]:
        """Pretrain the candidate ``cand`` (the plain ``lmforge tune`` search in ``DIR/pretrain-NAME``) -> what
        to record (``start``: its best checkpoint)."""
        from lmforge.search.pipeline import NoFinishedTrial, TuneOptions, run_pipeline

        pre = self.run_dir / f"pretrain-{cand['name']}"
        inner = TuneOptions(
            out=str(pre),
            data=str(corpus),
            budget=f"{max(1.0, entry['budget_s']):.1f}s",
            seed=self.opts.seed,
            overrides=[
                "--tokenizer.kind", cand["kind"],
                "--tokenizer.vocab_size", str(cand["vocab_size"]),
                "--data.block_size", str(cand["block_size"]),
            ],
            verbose=self.opts.verbose,
            progress_interval=30.0,
        )
        inner.started = time.monotonic()
        self.log(f"[pretrain] a language model on the task's text ({cand['kind']} {cand['vocab_size']}, "
                 f"context {cand['block_size']}), {format_amount(entry['budget_s'], 'time')}")
        if not entry.get("fallback"):
            try:
                summary = run_pipeline(inner)
            except NoFinishedTrial:
                entry["fallback"] = True
                self.save()
            else:
                best = summary.get("best") or {}
                return {
                    "start": str(pre / "best"),
                    "test_loss": best.get("test_loss"),
                    "config": best.get("values"),
                    "params": best.get("params"),
                }
        # the search finished no trial in its time (a tiny budget on a loaded machine): one small transformer,
        # trained for what is left of the candidate's share
        seconds = max(MIN_TRIAL_S * 2, entry["budget_s"] - (time.monotonic() - inner.started))
        self.log(f"[pretrain] the search finished no trial: a {FALLBACK_MODEL} transformer for {seconds:.0f}s instead")
        out = self.run_dir / f"pretrain-{cand['name']}-fallback"
        cfg = build_config(
            {
                "data": {"path": str(corpus), "block_size": cand["block_size"]},
                "tokenizer": {"kind": cand["kind"], "vocab_size": cand["vocab_size"]},
                "model": {"family": "transformer", **FALLBACK_MODEL},
                "optim": {"lr": 3e-3},
                "train": {"max_steps": None, "max_time": seconds, "batch_size": 8, "eval_interval": 25,
                          "eval_batches": 4, "progress": False, "resume": "auto", "seed": self.opts.seed},
                "schedule": {"name": "cosine", "horizon": "time", "warmup_steps": 10},
            }
        )
        pretrain_lm(cfg, out)
        if not (out / "best" / "COMPLETE").is_file():
            raise TaskPipelineError("pretrain: no model trained; give a larger --budget, or --init a pretrained model")
        return {"start": str(out / "best"), "config": {"model": FALLBACK_MODEL}}

    # -- step 2: search --------------------------------------------------------------------------------
    def _settings(self, params: dict[str, Any]) -> tuple[str, float]:
        """A trial's parameters -> (start candidate, learning rate). From ``--init`` the lr is searched as
        is; from a model pretrained here as a factor of that model's own pretraining lr."""
        plan = self.state["plan"]
        name = str(params.get("start", plan["candidates"][0]["name"]))
        if plan.get("init"):
            return name, float(params["lr"])
        cfg = build_config(_read_config(Path(self.start_model(name))))
        return name, float(cfg.optim.lr) * float(params["lr_factor"])

    def _study(self) -> optuna.Study:
        storage = open_storage(str(self.run_dir / "finetune.journal"))
        sampler = optuna.samplers.TPESampler(seed=self.opts.seed, n_startup_trials=3)
        return optuna.create_study(
            study_name="finetune", storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
        )

    def _step_search(self) -> None:
        study = self._study()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # killed last run
            shutil.rmtree(_trial_dir(self.run_dir, t.number), ignore_errors=True)
            self.log(f"[search] trial {t.number} was interrupted by the last run: failed")
        plan = self.state["plan"]
        names = [c["name"] for c in plan["candidates"]]
        # (parameter, low, high, first try): an absolute lr from --init, else a factor of the start's own
        lr_param = ("lr", *plan["lr_range"], plan["lr"]) if plan.get("init") else ("lr_factor", 1 / 30, 1.0, 1 / 3)
        if not study.trials:
            first = {lr_param[0]: lr_param[3], "epochs": 3, "batch_size": 8}
            study.enqueue_trial({**first, "start": names[0]} if len(names) > 1 else first)
        self.set_step("search", status="running", lr_range=[lr_param[1], lr_param[2]], lr_param=lr_param[0])
        total = self.allowance("search")
        trial_s = max(MIN_TRIAL_S, total / PLANNED_TRIALS)
        n_max = self.opts.n_trials or self.state["options"].get("n_trials")
        failed = 0
        while True:
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            left = self.allowance("search") * 0.8  # the rest: re-ranking by the task metric
            out_of_time = left < MIN_TRIAL_S and (done or failed >= MAX_FAILED_TRIALS)
            if out_of_time or (n_max is not None and len(study.trials) >= n_max) or failed >= MAX_FAILED_TRIALS * 3:
                break
            trial = study.ask()
            if len(names) > 1:
                trial.suggest_categorical("start", names)
            trial.suggest_float(lr_param[0], lr_param[1], lr_param[2], log=True)
            epochs = trial.suggest_int("epochs", 1, 6)
            batch = trial.suggest_categorical("batch_size", [4, 8, 16])
            start, lr = self._settings(trial.params)
            out = _trial_dir(self.run_dir, trial.number)
            shutil.rmtree(out, ignore_errors=True)  # a trial never resumes: it starts over
            clock = max(MIN_TRIAL_S, min(trial_s, left))
            try:
                result, value = self._finetune(out, start, lr=lr, epochs=epochs, batch=batch, max_time=clock)
            except TaskDataError:
                raise
            except Exception as err:  # a diverged or failed trial: recorded, the search goes on
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.log(f"[search] trial {trial.number} failed: {type(err).__name__}: {err}")
                failed += 1
                continue
            if not math.isfinite(value) or not (out / "best" / "COMPLETE").is_file():
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.log(f"[search] trial {trial.number} failed: no finite validation loss ({result.stop_reason})")
                failed += 1
                continue
            study.tell(trial, value)
            self.log(
                f"[search] trial {trial.number}: {start}, lr {lr:.2e}, {epochs} epochs, batch {batch}: "
                f"val completion loss {value:.4f} nats/byte ({result.stop_reason})"
            )
        complete = sorted(
            (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
            key=lambda t: math.inf if t.value is None else float(t.value),
        )
        if not complete:
            raise TaskPipelineError("search: no fine-tuning trial finished; give a larger --budget")
        rerank = dict(self.state["steps"]["search"].get("rerank") or {})
        recs = self.val_metric_records()
        key = D.primary(self.task)
        for t in complete[:RERANK_TOP]:
            if str(t.number) in rerank:
                continue
            if rerank and self.allowance("search") <= 0:
                break
            model, tok, _ = load_pretrained(_trial_dir(self.run_dir, t.number) / "best")
            agg = self._val_metric(model, tok, recs)
            rerank[str(t.number)] = {"val_loss": t.value, key: agg[key], "params": t.params}
            self.set_step("search", rerank=rerank)
            self.log(f"[search] re-rank: trial {t.number}: validation {key} {agg[key]:.2f}")
        winner = max(rerank, key=lambda n: (rerank[n][key], -rerank[n]["val_loss"]))
        self.set_step(
            "search",
            status="done",
            trials=len(study.trials),
            complete=len(complete),
            winner=int(winner),
            winner_params=rerank[winner]["params"],
            winner_dir=f"ft/{int(winner):04d}",
        )

    def _val_metric(self, model: Any, tok: Any, recs: list[dict[str, Any]]) -> dict[str, float]:
        if self.task.name == "classification":
            return _classify_metric(model, tok, self.task, recs, self.state["labels"])
        budgets = D.length_budgets(self.task, self.records("train"), tok)
        return D.score_settings(model, tok, self.task, recs, {"max_new_tokens": budgets[0]})

    def _finetune(
        self, out: Path, start: str, *, lr: float, epochs: int, batch: int, max_time: float, patience: int | None = None
    ) -> tuple[TrainResult, float]:
        """Fine-tune the start model of candidate ``start`` -> (the training result, its best validation
        completion loss in nats per byte of the references: comparable across tokenizers)."""
        model, tokenizer, model_cfg = load_pretrained(self.start_model(start))
        raw = finetune_config(model_cfg, None, [], self.state["plan"]["data"])
        block = int(self.candidates()[start]["block_size"])
        ctx = getattr(model, "max_seq_len", None)
        if ctx is not None:
            block = min(block, int(ctx))
        raw["data"]["block_size"] = block
        td = task_data_from_records(
            self.task, self.records("train"), self.records("val"), tokenizer, block, source=self.state["plan"]["data"]
        )
        n_train = len(td.train)
        steps_per_epoch = max(1, math.ceil(n_train / batch))
        raw["optim"]["lr"] = lr
        raw["train"] = {
            "batch_size": batch,
            "max_epochs": float(epochs),
            "max_steps": None,
            "max_time": max_time,
            "eval_interval": max(1, steps_per_epoch // 2),
            "eval_batches": max(1, math.ceil(len(td.val) / batch)),
            "log_interval": max(1, steps_per_epoch),
            "patience": patience,
            "keep_last": 1,
            "resume": "auto",
            "progress": False,
            "seed": self.opts.seed,
        }
        set_schedule_length(raw, n_train)
        cfg = build_config(raw)
        result = train_on_task(cfg, out, model, tokenizer, td, self.task_info(), verbose=False)
        tokens = sum(int(e.trained[1:].sum()) for e in td.val)
        n_bytes = sum(len((" " + self.task.reference(r)).encode("utf-8")) + 1 for r in self.records("val"))
        return result, result.best_val_loss * tokens / max(1, n_bytes)

    # -- step 3: final -----------------------------------------------------------------------------------
    def _step_final(self) -> None:
        s = self.state["steps"]["search"]
        p = s["winner_params"]
        allowance = self.allowance("final")
        final = self.run_dir / "final"
        trial_best = self.run_dir / s["winner_dir"] / "best"
        trial_loss = float(self.state["steps"]["search"]["rerank"][str(s["winner"])]["val_loss"])
        chosen, final_loss = trial_best, None
        start, lr = self._settings(p)
        self.set_step("final", start=start)
        if allowance >= MIN_TRIAL_S:
            self.set_step("final", status="running", max_time=round(allowance, 1))
            self.log(f"[final] trial {s['winner']}'s settings from the start model ({start}), {allowance:.0f}s")
            result, final_loss = self._finetune(
                final, start, lr=lr, epochs=p["epochs"], batch=p["batch_size"], max_time=allowance * 0.9, patience=4
            )
            if (final / "best" / "COMPLETE").is_file() and math.isfinite(final_loss) and final_loss <= trial_loss:
                chosen = final / "best"
        install_dir(chosen, self.run_dir / "best")
        write_task_file(self.run_dir, self.task_info())  # --task chat: also the trained chat template
        self.set_step(
            "final",
            status="done",
            best_from=str(chosen.relative_to(self.run_dir)),
            val_loss=final_loss if chosen != trial_best else trial_loss,
            trial_val_loss=trial_loss,
            final_val_loss=final_loss,
        )

    # -- step 4: decode ----------------------------------------------------------------------------------
    def _step_decode(self) -> None:
        best = self.run_dir / "best"
        model, tok, _ = load_pretrained(best)
        if self.task.name == "classification":
            settings = D.label_settings(self.state["labels"], tok)
            save_generation_defaults(best, settings, lmforge_chosen_by="lmforge tune --task classification: label scoring")
            self.set_step(
                "decode", status="done", settings=settings,
                reason="classification scores the label set (no free generation): nothing to search",
            )
            return
        recs = self.val_metric_records()
        key = D.primary(self.task)
        budgets = D.length_budgets(self.task, self.records("train"), tok)
        tried: dict[str, dict[str, Any]] = dict(self.state["steps"]["decode"].get("tried") or {})
        self.set_step("decode", status="running", length_budgets=budgets)
        for settings in D.candidates(budgets, tried):
            if tried and self.allowance("decode") <= 0:
                break
            agg = D.score_settings(model, tok, self.task, recs, settings)
            tried[D.settings_key(settings)] = {"settings": settings, "score": agg[key], "metrics": agg}
            self.set_step("decode", tried=tried)
            self.log(f"[decode] {settings}: validation {key} {agg[key]:.2f}")
        chosen = D.best_settings(tried)
        assert chosen is not None
        save_generation_defaults(
            best, chosen, lmforge_chosen_by=f"lmforge tune --task {self.task.name}: validation {key}"
        )
        self.set_step("decode", status="done", settings=chosen, candidates=len(tried))

    # -- step 5: evaluate --------------------------------------------------------------------------------
    def _step_evaluate(self) -> None:
        best = self.run_dir / "best"
        model, tok, _ = load_pretrained(best)
        test = self.records("test")
        labels = self.state["labels"]
        gen = None if self.task.name == "classification" else with_defaults(load_generation_defaults(best), {})
        report = evaluate_task(model, tok, self.task, test, labels=labels, config=gen)
        report.info.update(model=str(best), data=self.state["plan"]["data"], split="test")
        report.save(self.run_dir / "test_report.json")
        fit = self.records("train") + self.records("val")
        base = baselines(self.task, fit, test, labels=labels)
        key = D.primary(self.task)
        rows = [{"system": "model", **{k: v for k, v in report.metrics.items() if k != "examples"}}]
        rows += [{"system": b.name, **b.metrics} for b in base]
        examples = [
            {
                "prompt": ex["prompt"][-500:],
                "reference": ex["reference"],
                "prediction": ex["prediction"],
                **{b.name: b.predictions[ex["index"]] for b in base},
            }
            for ex in report.examples[:EXAMPLES_IN_SUMMARY]
        ]
        with self._lock:
            self.tick()
            spent = dict(self.state["spent_s"])
        summary = {
            "kind": KIND,
            "task": self.task.name,
            "metric": self.task.metric,
            "primary_metric": key,
            "records": {s: len(self.state["split"][s]) for s in ("train", "val", "test")},
            "split_seed": self.state["split"]["seed"],
            "test": report.metrics,
            "baselines": {b.name: {**b.metrics, **b.detail} for b in base},
            "beats_baselines": all(report.metrics[key] > b.metrics[key] for b in base),
            "decode": self.state["steps"]["decode"].get("settings"),
            "best": str(best),
            "start": self.start_model(),
            "pretrain": {k: v for k, v in self.state["steps"]["pretrain"].items() if k != "status"},
            "search": {k: self.state["steps"]["search"].get(k) for k in ("trials", "complete", "winner", "winner_params", "rerank")},
            "final": {k: v for k, v in self.state["steps"]["final"].items() if k != "status"},
            "steps": {s: self.state["steps"][s]["status"] for s in TASK_STEPS} | {"evaluate": "done"},
            "budget_s": self.budget_s,
            "spent_s": {k: round(v, 1) for k, v in spent.items()},
            "examples": examples,
            "leaderboard": str(self.run_dir / LEADERBOARD_FILE),
        }
        _write_leaderboard(self.run_dir / LEADERBOARD_FILE, rows)
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        if self.finish is not None:
            self.finish(self.run_dir)
        self.set_step("evaluate", status="done", **{key: report.metrics[key]})
        self.log(
            f"test {key}: model {report.metrics[key]:.2f}; "
            + ", ".join(f"{b.name} {b.metrics[key]:.2f}" for b in base)
        )


def _trial_dir(run_dir: Path, number: int) -> Path:
    return run_dir / "ft" / f"{number:04d}"


def _classify_metric(model: Any, tok: Any, task: Task, recs: list[dict[str, Any]], labels: list[str]) -> dict[str, float]:
    from lmforge.evaluate import metrics as M
    from lmforge.predict.tasks import predict_records

    preds, _ = predict_records(model, tok, task, recs, labels=labels)
    agg, _ = M.score(task.metric, preds, [task.reference(r).strip() for r in recs], labels=labels)
    return agg


def _read_config(ckpt: Path) -> dict[str, Any]:
    import yaml

    for d in (ckpt, ckpt.parent):
        f = d / "config.yaml"
        if f.is_file():
            loaded = yaml.safe_load(f.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                return loaded
    raise TaskPipelineError(f"{ckpt}: no config.yaml")


def _write_leaderboard(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(_csv(r.get(c)) for c in cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v)
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


__all__ = ["GenerationConfig", "TaskPipelineError", "TaskTuneOptions", "read_task_state", "run_task_pipeline"]
