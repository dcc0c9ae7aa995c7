"""``lmforge tune --task``'s plan: its options, the checks of every record before ``DIR`` is created, the
tokenizer candidates and context length of a model pretrained here, the budget's shares, and the run's
state file (``DIR/pipeline.json``).

A bad input raises :class:`TaskPipelineError` (one line naming the option, file, record or field) from
:func:`validate_and_plan`, which reads and checks everything before anything is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import TASK_NAMES, TokenizerConfig
from lmforge.data.retrieval import RETRIEVAL_TASKS, attach, build_index
from lmforge.data.sources import read_documents
from lmforge.data.tasks import (
    Task,
    check_fits_context,
    check_task_records,
    get_task,
    parse_fields,
    read_located_records,
    split_records,
    task_labels,
)
from lmforge.data.tokenizer import build_tokenizer
from lmforge.predict.loading import load_pretrained
from lmforge.search.budget import parse_budget
from lmforge.search.finetune import PRETRAINED_START
from lmforge.search.study import SearchError

STATE_FILE = "pipeline.json"
STATE_VERSION = 1
KIND = "task"
TASK_STEPS = ("pretrain", "search", "final", "decode", "evaluate")
SHARES = {"pretrain": 0.40, "search": 0.25, "final": 0.25, "decode": 0.05, "evaluate": 0.05}
"""Fraction of the budget per step (from scratch). Decoding and evaluating the small models trained here
take seconds (4-minute runs spent 1-6% of the budget on the two), so the final fine-tune gets the time."""
SHARES_INIT = {"pretrain": 0.0, "search": 0.45, "final": 0.25, "decode": 0.15, "evaluate": 0.15}
"""Fraction of the budget per step with ``--init`` (no pretraining)."""
MAX_BLOCK = 512
"""The longest context a model pretrained here gets (examples are truncated from the left to it)."""
MIN_BLOCK = 64
LENGTH_SAMPLE = 2000
"""Training records (a regular sample) whose token lengths, with a retrieved example, set the context of a
model pretrained here for a task of :data:`~lmforge.data.retrieval.RETRIEVAL_TASKS`."""
BPE_CHARS_PER_TOKEN = 200
"""The BPE vocabulary grows with the training text: one token per this many characters (within bounds)."""
BPE_VOCAB = (512, 4096)
CHAR_BELOW = 100_000
PRETRAIN_WEIGHT = {"bpe": 2.0, "char": 1.0}
"""How the pretraining share splits between the tokenizer candidates: BPE gets twice char's time (its
embedding table, vocabulary x width, is tens of times char's and learns slower, while a char model's
context holds a fraction of the text; an even split left the BPE start undertrained in short budgets)."""


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


def plan_tokenizers(texts: list[str]) -> list[dict[str, Any]]:
    """The tokenizer candidates of a model pretrained here, each pretrained in turn and chosen between by
    the fine-tuning search: byte-level BPE (char-level models score badly on summarization: every token of
    context buys one character) with a vocabulary sized to the text (one token per
    :data:`BPE_CHARS_PER_TOKEN` characters, within :data:`BPE_VOCAB`), and ``char``. Below
    :data:`CHAR_BELOW` characters a BPE vocabulary's embeddings alone would outweigh what the text can
    train, so ``char`` alone (unseen characters of later records map to its unknown token). ``weight``: the
    candidate's part of the pretraining share (:data:`PRETRAIN_WEIGHT`)."""
    chars = sum(len(t) for t in texts)
    char = {"name": "char", "kind": "char", "vocab_size": 1024, "weight": PRETRAIN_WEIGHT["char"]}
    if chars < CHAR_BELOW:
        return [{**char, "why": f"{chars} characters < {CHAR_BELOW}: char only"}]
    vocab = int(min(BPE_VOCAB[1], max(BPE_VOCAB[0], chars // BPE_CHARS_PER_TOKEN)))
    return [
        {"name": "bpe", "kind": "bpe", "vocab_size": vocab, "weight": PRETRAIN_WEIGHT["bpe"],
         "why": f"{chars} characters: bpe {vocab}"},
        {**char, "why": "the character-level alternative"},
    ]


def block_size(lengths: list[int]) -> int:
    """A power of two covering the 95th percentile of the examples' token lengths, in [MIN_BLOCK, MAX_BLOCK]."""
    p95 = float(np.percentile(np.asarray(lengths, dtype=float), 95)) if lengths else MIN_BLOCK
    return int(min(MAX_BLOCK, max(MIN_BLOCK, 2 ** math.ceil(math.log2(max(p95, 1.0))))))


def record_text(task: Task, rec: dict[str, Any]) -> str:
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
        texts = [record_text(task, r) for r in train_recs] + corpus_docs
        candidates = []
        # the context covers prompts with a retrieved example when the search may choose them
        sample = train_recs
        if task.name in RETRIEVAL_TASKS:  # a regular sample: retrieving for every record takes seconds
            sample = attach(build_index(task, train_recs), train_recs[:: max(1, len(train_recs) // LENGTH_SAMPLE)], 1)
        for cand in plan_tokenizers(texts):
            tok = build_tokenizer(TokenizerConfig(kind=cand["kind"], vocab_size=cand["vocab_size"]), texts)
            check_fits_context(task, located, tok, MAX_BLOCK + 1, opts.fields)
            lengths = [
                len(tok.encode(task.format_prompt(r))) + len(tok.encode(" " + task.reference(r))) + 1 for r in sample
            ]
            candidates.append({**cand, "block_size": block_size(lengths)})
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
