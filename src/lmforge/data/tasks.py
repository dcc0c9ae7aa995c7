"""Task datasets for fine-tuning and evaluation (layer 2): records -> prompt/completion token ids with a
loss mask -> padded batches from a seeded, resumable sampler over examples.

A :class:`Task` is a prompt template plus the metric that scores it. Every task turns a record into
text *segments*, each marked trained or not; the loss is computed only on trained tokens (the completion,
or every assistant turn of a chat), the prompt's targets are ``-100``:

=================  =======================  ==========================================  ================
task               fields (role names)      what the model sees (``|`` starts the loss)  metric
=================  =======================  ==========================================  ================
summarization      document, summary        ``{document}\\nTL;DR:| {summary}<eot>``     ROUGE-1/2/L
translation        source, target           ``{source}\\nTranslation:| {target}<eot>``  BLEU, chrF
classification     text, label              ``{text}\\nLabel:| {label}<eot>``           accuracy, macro-F1
semantic-parsing   text, parse              ``{text}\\nParse:| {parse}<eot>``           exact match
generation         prompt, completion       ``{prompt}|{completion}<eot>``              ROUGE, exact match
chat               messages                 ``User: ..\\nAssistant:| ..<eot>\\n`` turns  ROUGE, exact match
=================  =======================  ==========================================  ================

A record may carry retrieved training examples under :data:`RETRIEVED` (:mod:`lmforge.data.retrieval`):
its prompt then starts with each example's prompt and completion and a blank line, all untrained.

Records come from JSONL (one object per line), JSON (a list of objects), CSV/TSV (a header row) or
``hf:NAME[:CONFIG]``. The role names above are also the default field names; ``--fields
document=article,summary=highlights`` maps roles to other field names. A chat record holds
``messages``: a list of ``{"role": "system"|"user"|"assistant", "content": str}``.

Tokenization: the prompt and the completion are encoded separately and concatenated, so training sees
exactly the token boundary that prediction sees (a prompt encoded alone, then generated tokens).

Truncation: an example longer than ``block_size + 1`` tokens is cut from the LEFT of its prompt (the
oldest context goes first; one prompt token is always kept as the completion's context). Only when the
completion alone does not fit is it cut from the right (its end and ``<eot>`` are lost); both cases are
counted in :attr:`TaskData.stats`. Batches are padded on the right with ``pad_id`` and ``-100`` targets.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.config import IGNORE_INDEX, TASK_NAMES, LmforgeError, RunConfig
from lmforge.data.errors import DataError
from lmforge.data.sources import decode_utf8, parse_hf_spec
from lmforge.data.tokenizer import EOT as EOT_TEXT

EOT = object()
"""Segment marker: the tokenizer's end-of-text id (not a string, so it never depends on how a tokenizer
spells its special tokens)."""


class TaskDataError(LmforgeError, ValueError):
    """A task data problem a user can fix; the message names the file, line and field."""


class TokenizerLike(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def eot_id(self) -> int: ...


RETRIEVED = "retrieved"
"""Record key of retrieved training examples (role dicts, :mod:`lmforge.data.retrieval`): each is written
before the prompt as its own prompt and completion and a blank line, untrained."""

Segment = tuple[Any, bool]
"""``(text or EOT, trained)``."""


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """A prompt template and its metric. ``prompt`` and ``completion`` are ``str.format`` templates over
    the role names; ``metric`` names a scorer of :mod:`lmforge.evaluate.metrics`; generation stops at
    ``<eot>`` or at one of ``stop`` (single-line outputs)."""

    name: str
    roles: tuple[str, ...]
    prompt: str
    completion: str
    metric: str
    stop: tuple[str, ...] = ()
    description: str = ""

    @property
    def target(self) -> str:
        """The role holding the reference output."""
        return self.roles[-1]

    def format_prompt(self, record: dict[str, Any], eot_text: str = EOT_TEXT) -> str:
        """The text the model continues (for chat: the history up to the last assistant turn, each earlier
        assistant turn ending in ``eot_text``, which lmforge's tokenizers encode as their end-of-text id;
        :func:`lmforge.predict.tasks.prompt_ids` gives the exact ids for any tokenizer)."""
        if self.name == "chat":
            segs = chat_segments(record["messages"][: _last_assistant(record["messages"])], add_generation_prompt=True)
            return "".join(eot_text if s is EOT else s for s, _ in segs)
        shown = "".join(
            self.prompt.format(**ex) + self.completion.format(**ex) + "\n\n" for ex in record.get(RETRIEVED, ())
        )
        return shown + self.prompt.format(**record)

    def reference(self, record: dict[str, Any]) -> str:
        """The expected output (for chat: the last assistant turn)."""
        if self.name == "chat":
            return record["messages"][_last_assistant(record["messages"])]["content"]
        return record[self.target]

    def segments(self, record: dict[str, Any]) -> list[Segment]:
        """The training sequence of ``record`` as (text, trained) segments."""
        if self.name == "chat":
            return chat_segments(record["messages"])
        return [(self.format_prompt(record), False), (self.completion.format(**record), True), (EOT, True)]


CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_segments(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> list[Segment]:
    """lmforge's plain chat template: ``System: ..\\n``, ``User: ..\\n``, ``Assistant: ..<eot>\\n``;
    only the assistant contents and their ``<eot>`` are trained. ``add_generation_prompt`` ends with
    ``Assistant:`` for the model to continue. :mod:`lmforge.data.chat_template` writes the same format as the
    run's Jinja ``chat_template`` (serve and export use it)."""
    segs: list[Segment] = []
    for m in messages:
        head = CHAT_ROLES[m["role"]]
        if m["role"] == "assistant":
            segs += [(f"{head}:", False), (" " + m["content"], True), (EOT, True), ("\n", False)]
        else:
            segs.append((f"{head}: {m['content']}\n", False))
    if add_generation_prompt:
        segs.append(("Assistant:", False))
    return segs


def _last_assistant(messages: Sequence[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    raise TaskDataError("a chat record has no assistant message")


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "summarization",
            ("document", "summary"),
            "{document}\nTL;DR:",
            " {summary}",
            "rouge",
            description="document -> summary",
        ),
        Task(
            "translation",
            ("source", "target"),
            "{source}\nTranslation:",
            " {target}",
            "bleu_chrf",
            ("\n",),
            description="source -> target",
        ),
        Task(
            "classification",
            ("text", "label"),
            "{text}\nLabel:",
            " {label}",
            "classification",
            ("\n",),
            description="text -> label; prediction picks the most likely label of the label set",
        ),
        Task(
            "semantic-parsing",
            ("text", "parse"),
            "{text}\nParse:",
            " {parse}",
            "exact_match",
            ("\n",),
            description="text -> structured output",
        ),
        Task(
            "generation",
            ("prompt", "completion"),
            "{prompt}",
            "{completion}",
            "rouge_exact",
            description="prompt -> completion (no template)",
        ),
        Task("chat", ("messages",), "", "", "rouge_exact", description="multi-turn messages; loss on assistant turns"),
    ]
}
if TASK_NAMES != ("lm", *TASKS):  # the list in config (read without torch by the CLI) must match
    raise AssertionError(f"lmforge.config.TASK_NAMES {TASK_NAMES} != ('lm', *{tuple(TASKS)})")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}; known: {list(TASK_NAMES)}")
    return TASKS[name]


def parse_fields(spec: str | dict[str, str] | None, task: Task) -> dict[str, str]:
    """``"document=article,summary=highlights"`` -> ``{"document": "article", "summary": "highlights"}``,
    completed with the default (role = field) for the roles not given."""
    out = {r: r for r in task.roles}
    if not spec:
        return out
    pairs = (
        spec.items() if isinstance(spec, dict) else (p.split("=", 1) if "=" in p else (p, "") for p in spec.split(","))
    )
    for role, fld in pairs:
        role, fld = role.strip(), fld.strip()
        if role not in task.roles or not fld:
            raise TaskDataError(
                f"--fields {role}={fld}: expected ROLE=FIELD with ROLE one of {list(task.roles)} (task {task.name})"
            )
        out[role] = fld
    return out


# ---------------------------------------------------------------------------------------- reading
def _raw_records(path: str, hf_split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for every record of ``path``; ``where`` is ``file:line`` for messages."""
    spec = str(path).strip()
    if spec.startswith("hf:"):
        yield from _hf_records(spec, hf_split)
        return
    p = Path(os.path.expanduser(spec))
    if not p.is_file():
        raise TaskDataError(f"no such data file: {spec!r}")
    try:
        text, _ = decode_utf8(p.read_bytes(), str(p), "strict")
    except DataError as err:
        raise TaskDataError(str(err)) from None
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{p}:{i}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield f"{p}:{i}", obj
    elif suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise TaskDataError(f'{p}: expected a JSON list of records (or {{"data": [...]}})')
        for i, rec in enumerate(obj):
            yield f"{p}[{i}]", rec
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        for i, rec in enumerate(reader, start=2):
            yield f"{p}:{i}", dict(rec)
    else:
        raise TaskDataError(f"{p}: task data must be .jsonl, .json, .csv, .tsv or hf:NAME; plain text is for --task lm")


def _hf_records(spec: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name, config = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"{spec!r} needs the 'datasets' package: pip install 'lmforge[hf]'") from None
    try:
        local = Path(os.path.expanduser(name))
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds: Any = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else name, config, split=split)
    except Exception as err:  # datasets raises many kinds (network, missing config, bad split)
        first = (str(err).strip().splitlines() or [""])[0]
        raise TaskDataError(f"cannot load Hugging Face dataset {spec!r} (split {split!r}): {first}") from None
    for i, row in enumerate(ds):
        yield f"{spec} row {i}", dict(row)


def _normalize(task: Task, where: str, rec: Any, fields: dict[str, str]) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise TaskDataError(f"{where}: expected a record (JSON object), got {type(rec).__name__}")
    out: dict[str, Any] = {}
    for role in task.roles:
        fld = fields[role]
        if fld not in rec:
            keys = ", ".join(repr(k) for k in list(rec)[:8])
            raise TaskDataError(
                f"{where}: no field {fld!r} (role {role!r} of task {task.name}; map it with "
                f"--fields {role}=NAME); the record has {keys or 'no fields'}"
            )
        value = rec[fld]
        if role == "messages":
            out[role] = _check_messages(where, fld, value)
        elif isinstance(value, (int, float, bool)) and task.name == "classification":
            out[role] = str(value)
        elif not isinstance(value, str):
            raise TaskDataError(f"{where}: field {fld!r} must be a string, got {type(value).__name__}")
        else:
            out[role] = value
    return out


def _check_messages(where: str, fld: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise TaskDataError(f"{where}: field {fld!r} must be a non-empty list of {{role, content}} messages")
    msgs = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise TaskDataError(
                f'{where}: {fld}[{j}] must be {{"role": one of {list(CHAT_ROLES)}, "content": str}}, got {m!r:.80}'
            )
        msgs.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise TaskDataError(f"{where}: {fld} has no assistant message to learn or predict")
    return msgs


def read_task_records(
    path: str,
    task: Task | str,
    fields: str | dict[str, str] | None = None,
    *,
    hf_split: str = "train",
    max_records: int | None = None,
) -> list[dict[str, Any]]:
    """Read and validate the records of ``path`` as role-keyed dicts (``{"document": .., "summary": ..}``)."""
    return [rec for _, rec in read_located_records(path, task, fields, hf_split=hf_split, max_records=max_records)]


def read_located_records(
    path: str,
    task: Task | str,
    fields: str | dict[str, str] | None = None,
    *,
    hf_split: str = "train",
    max_records: int | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """:func:`read_task_records` with each record's location (``file:line``, ``file[i]``, ``hf:NAME row i``)
    for messages that name the record at fault."""
    task = get_task(task) if isinstance(task, str) else task
    fmap = parse_fields(fields, task)
    out = []
    for where, rec in _raw_records(path, hf_split):
        out.append((where, _normalize(task, where, rec, fmap)))
        if max_records is not None and len(out) >= max_records:
            break
    if not out:
        raise TaskDataError(f"{path}: no records")
    return out


def task_labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """The label set of classification records (sorted)."""
    return sorted({r["label"] for r in records})


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedExample:
    """``ids`` (L,) int64 token ids; ``trained`` (L,) bool: the token is a loss target."""

    ids: np.ndarray
    trained: np.ndarray
    truncated_prompt: bool = False
    truncated_completion: bool = False

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (L-1,) and shifted targets (L-1,) with ``-100`` where the next token is not trained."""
        y = np.where(self.trained[1:], self.ids[1:], IGNORE_INDEX)
        return self.ids[:-1], y


def encode_segments(segments: Sequence[Segment], tokenizer: TokenizerLike) -> tuple[list[int], list[bool]]:
    """Encode segments, merging neighbours of the same kind so a prompt is encoded as one string."""
    merged: list[Segment] = []
    for text, trained in segments:
        if text is not EOT and text == "":
            continue
        if merged and merged[-1][1] == trained and text is not EOT and merged[-1][0] is not EOT:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in merged:
        part = [tokenizer.eot_id] if text is EOT else list(tokenizer.encode(text))
        ids += part
        mask += [trained] * len(part)
    return ids, mask


def truncate(ids: list[int], mask: list[bool], max_len: int) -> tuple[list[int], list[bool], bool, bool]:
    """Fit ``max_len`` tokens: cut the left of the prompt, keeping the last trained span (and one token of
    context before it); only then cut the right end. -> (ids, mask, prompt_cut, completion_cut)."""
    if len(ids) <= max_len:
        return ids, mask, False, False
    start = max((i for i, m in enumerate(mask) if m), default=len(mask))
    while start > 0 and mask[start - 1]:
        start -= 1
    left = min(len(ids) - max_len, max(0, start - 1))
    ids, mask = ids[left:], mask[left:]
    return ids[:max_len], mask[:max_len], left > 0, len(ids) > max_len


def encode_example(task: Task, record: dict[str, Any], tokenizer: TokenizerLike, block_size: int) -> EncodedExample:
    """One record -> at most ``block_size + 1`` tokens (inputs and targets of one block)."""
    ids, mask = encode_segments(task.segments(record), tokenizer)
    while mask and not mask[-1]:  # untrained tail (chat's final newline): no target, no use
        ids, mask = ids[:-1], mask[:-1]
    ids, mask, cut_p, cut_c = truncate(ids, mask, block_size + 1)
    return EncodedExample(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), cut_p, cut_c)


# ----------------------------------------------------------------------------------------- batches
def collate(examples: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: x (B, T) with ``pad_id``, y (B, T) with ``-100``."""
    pairs = [e.xy() for e in examples]
    t = max(len(x) for x, _ in pairs)
    x = torch.full((len(pairs), t), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), t), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : len(xi)] = torch.from_numpy(xi)
        y[i, : len(yi)] = torch.from_numpy(yi)
    return x, y


class ExampleSampler:
    """Seeded, resumable batches over examples, epoch after epoch.

    Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(n)``; a batch that
    reaches the end of an epoch is filled from the next one, so every batch has ``batch_size`` rows.
    The whole position is one counter, so ``state_dict()`` is two plain integers.
    """

    def __init__(self, examples: Sequence[EncodedExample], batch_size: int, pad_id: int, seed: int = 0) -> None:
        if not examples:
            raise TaskDataError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.consumed = 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> float:
        """Passes over the examples so far (fractional)."""
        return self.consumed / len(self.examples)

    def _perm(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def next_indices(self) -> list[int]:
        n = len(self.examples)
        out = []
        for _ in range(self.batch_size):
            ep, pos = divmod(self.consumed, n)
            out.append(int(self._perm(ep)[pos]))
            self.consumed += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.examples[i] for i in self.next_indices()], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.consumed = int(state["seed"]), int(state["consumed"])
        self._order = None


def task_batches(
    examples: Sequence[EncodedExample], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All of ``examples`` in order, in padded batches (validation)."""
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


# ------------------------------------------------------------------------------------ preparation
@dataclass
class TaskData:
    """Encoded train/validation examples of a task and what preparing them reported."""

    task: Task
    train: list[EncodedExample]
    val: list[EncodedExample]
    train_records: list[dict[str, Any]]
    val_records: list[dict[str, Any]]
    labels: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def sampler(self, batch_size: int, pad_id: int, seed: int) -> ExampleSampler:
        return ExampleSampler(self.train, batch_size, pad_id, seed)

    def val_batches(
        self, batch_size: int, pad_id: int, max_batches: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = task_batches(self.val, batch_size, pad_id)
        return batches[:max_batches] if max_batches else batches


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding id, or its end-of-text id when it has none (padding is never a target)."""
    pad = getattr(tokenizer, "pad_id", None)
    return int(tokenizer.eot_id if pad is None else pad)


def prepare_task_data(
    config: RunConfig, task: Task | str, tokenizer: TokenizerLike, fields: str | dict[str, str] | None = None
) -> TaskData:
    """Read ``config.data.path`` (and ``data.val_path``) as ``task`` records and encode them for blocks of
    ``config.data.block_size``. Without ``val_path`` a seeded ``data.val_fraction`` of the records is held
    out (at least one when there are two or more); with ``val_fraction: 0`` the training records are
    also the validation records."""
    task = get_task(task) if isinstance(task, str) else task
    dc = config.data
    if not dc.path:
        raise TaskDataError("no data: pass --data FILE")
    records = read_task_records(dc.path, task, fields, hf_split=dc.hf_split, max_records=dc.max_documents)
    if dc.val_path:
        train_recs = records
        val_recs = read_task_records(dc.val_path, task, fields, hf_split=dc.hf_split)
    else:
        n = len(records)
        n_val = max(1, round(n * dc.val_fraction)) if (n >= 2 and dc.val_fraction > 0) else 0
        perm = np.random.default_rng(dc.seed).permutation(n)
        val_idx = set(perm[:n_val].tolist())
        train_recs = [r for i, r in enumerate(records) if i not in val_idx]
        val_recs = [r for i, r in enumerate(records) if i in val_idx] or train_recs
    return task_data_from_records(task, train_recs, val_recs, tokenizer, dc.block_size, source=str(dc.path))


def task_data_from_records(
    task: Task | str,
    train_recs: list[dict[str, Any]],
    val_recs: list[dict[str, Any]],
    tokenizer: TokenizerLike,
    block_size: int,
    *,
    source: str = "the data",
) -> TaskData:
    """Encode given training and validation records (``val_recs is train_recs``: validation = training)."""
    task = get_task(task) if isinstance(task, str) else task
    enc_train = [encode_example(task, r, tokenizer, block_size) for r in train_recs]
    enc_val = [encode_example(task, r, tokenizer, block_size) for r in val_recs]
    stats = {
        "train_examples": len(enc_train),
        "val_examples": len(enc_val),
        "train_tokens": int(sum(len(e.ids) for e in enc_train)),
        "train_target_tokens": int(sum(e.trained[1:].sum() for e in enc_train)),
        "truncated_prompts": sum(e.truncated_prompt for e in enc_train + enc_val),
        "truncated_completions": sum(e.truncated_completion for e in enc_train + enc_val),
        "val_is_train": val_recs is train_recs,
    }
    for name, enc in (("training", enc_train), ("validation", enc_val)):
        if not any(e.trained[1:].any() for e in enc):
            raise TaskDataError(f"the {name} examples of {source} have no completion tokens to learn")
    labels = (
        task_labels(train_recs + ([] if val_recs is train_recs else val_recs))
        if task.name == "classification"
        else None
    )
    return TaskData(task, enc_train, enc_val, train_recs, val_recs, labels, stats)


# ------------------------------------------------------------------------------ checks and splits
SPLITS = ("train", "val", "test")
MIN_SPLIT_RECORDS = {"train": 4, "val": 2, "test": 2}
"""The fewest records each split of :func:`split_records` may get (a smaller data set is refused)."""
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}
SPLIT_CAPS = {"val": 200, "test": 1000}
"""The most records validation (scored at every evaluation of every trial) and test get from a large set."""


def split_records(n: int, seed: int, fractions: dict[str, float] | None = None) -> dict[str, list[int]]:
    """Indices of ``n`` records split into train/val/test, deterministic in ``seed``: a seeded permutation,
    the first ``round(n * val)`` (at least :data:`MIN_SPLIT_RECORDS`, at most :data:`SPLIT_CAPS`) to validation, the next to test, the
    rest to training (each list sorted). Raises :class:`TaskDataError` when ``n`` is too small."""
    f = {**SPLIT_FRACTIONS, **(fractions or {})}
    n_val = max(MIN_SPLIT_RECORDS["val"], min(SPLIT_CAPS["val"], round(n * f["val"])))
    n_test = max(MIN_SPLIT_RECORDS["test"], min(SPLIT_CAPS["test"], round(n * f["test"])))
    if n - n_val - n_test < MIN_SPLIT_RECORDS["train"]:
        raise TaskDataError(f"{n} records are too few to split into train/validation/test (need {min_records()})")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return {
        "train": sorted(perm[n_val + n_test :]),
        "val": sorted(perm[:n_val]),
        "test": sorted(perm[n_val : n_val + n_test]),
    }


def min_records() -> int:
    return sum(MIN_SPLIT_RECORDS.values())


def check_task_records(
    path: str,
    task: Task | str,
    located: Sequence[tuple[str, dict[str, Any]]],
    fields: str | dict[str, str] | None = None,
    train_indices: Sequence[int] | None = None,
) -> None:
    """Refuse records a task cannot learn from, with a one-line message naming the file, record and field:
    too few records to split into train/val/test, an empty target, and for classification a label set of
    one or more labels than training records. (:func:`read_located_records` already refused a record
    without a role's field.)"""
    task = get_task(task) if isinstance(task, str) else task
    fmap = parse_fields(fields, task)
    if len(located) < min_records():
        raise TaskDataError(
            f"{path}: {len(located)} records are too few to split into train/validation/test "
            f"(need at least {min_records()})"
        )
    for where, rec in located:
        if task.name == "chat":
            if not task.reference(rec).strip():
                raise TaskDataError(f"{where}: field {fmap['messages']!r} has an empty last assistant message")
            continue
        if not str(rec[task.target]).strip():
            raise TaskDataError(
                f"{where}: field {fmap[task.target]!r} (role {task.target!r}) is empty: every record needs a target"
            )
    if task.name == "classification":
        fld = fmap["label"]
        labels = sorted({rec["label"] for _, rec in located})
        if len(labels) < 2:
            raise TaskDataError(
                f"{path}: field {fld!r} (role 'label') has the single label {labels[0]!r} in all "
                f"{len(located)} records (first {located[0][0]}): classification needs at least two labels"
            )
        n_train = len(train_indices) if train_indices is not None else len(located)
        if len(labels) > n_train:
            raise TaskDataError(
                f"{path}: field {fld!r} (role 'label') has {len(labels)} different labels for {n_train} training "
                f"records (e.g. {located[0][0]}: {located[0][1]['label']!r}): is --fields label= the right field?"
            )


def check_fits_context(
    task: Task | str,
    located: Sequence[tuple[str, dict[str, Any]]],
    tokenizer: TokenizerLike,
    context: int,
    fields: str | dict[str, str] | None = None,
) -> int:
    """Refuse a record whose target (with ``<eot>`` and one prompt token) does not fit ``context`` tokens,
    naming the record and field; return the longest target in tokens."""
    task = get_task(task) if isinstance(task, str) else task
    fmap = parse_fields(fields, task)
    fld = fmap[task.target]
    longest = 0
    for where, rec in located:
        n = len(tokenizer.encode(task.completion.format(**{task.target: task.reference(rec)}) if task.name != "chat"
                                 else " " + task.reference(rec)))
        longest = max(longest, n)
        if n + 2 > context:
            raise TaskDataError(
                f"{where}: field {fld!r} (role {task.target!r}) is {n} tokens: with <eot> and one prompt token it "
                f"does not fit the model's context of {context} tokens"
            )
    return longest
