"""Evaluate a model on a corpus or a task (layer 4): perplexity / bits per byte, or task metrics, with a
report that keeps every example's prompt, reference, prediction and score.

Language modelling (:func:`evaluate_lm`): every document is scored on its own as ``<eot> doc <eot>``
(the training stream puts ``<eot>`` between documents), so each of its tokens and the closing ``<eot>`` is
predicted once. A document longer than the context is cut into consecutive windows of ``block_size``
predicted tokens, each window starting afresh (no overlap, as in training). Perplexity is
``exp(total NLL / predicted tokens)``; bits per byte is ``total NLL / ln 2 / UTF-8 bytes of the documents``.

Tasks (:func:`evaluate_task`): predictions from :func:`lmforge.predict.tasks.predict_records`, scored by the
task's metric (:mod:`lmforge.evaluate.metrics`), plus the teacher-forced perplexity of the reference
completions (``completion_ppl``, the quantity fine-tuning minimizes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import IGNORE_INDEX, LmforgeError
from lmforge.data.tasks import Task, TokenizerLike, encode_example, get_task, pad_id_of, task_batches
from lmforge.evaluate import metrics as M
from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationConfig
from lmforge.predict.tasks import predict_records


class EvalError(LmforgeError):
    """An evaluation a user asked for cannot run (no data, unknown task, missing labels...)."""


@dataclass
class EvalReport:
    """Aggregate metrics and one record per example (document for ``lm``)."""

    task: str
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return p

    def table(self) -> str:
        """The metrics as an aligned two-column text table."""
        w = max(len(k) for k in self.metrics) if self.metrics else 6
        rows = [f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 10}"]
        rows += [f"{k:<{w}}  {_fmt(v)}" for k, v in self.metrics.items()]
        return "\n".join(rows)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _device(model: DecodingModel) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------ language modelling
def _windows(ids: list[int], block: int) -> list[list[int]]:
    """``ids`` -> consecutive windows of up to ``block + 1`` tokens overlapping by one (each window
    predicts its last ``len - 1`` tokens; together they predict ``ids[1:]`` once)."""
    return [ids[s : s + block + 1] for s in range(0, len(ids) - 1, block)]


@torch.no_grad()
def _window_nll(model: DecodingModel, windows: list[list[int]], batch_size: int) -> list[float]:
    """Summed NLL (nats) of each window's predicted tokens."""
    device = _device(model)
    out: list[float] = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        t = max(len(w) for w in chunk) - 1
        x = torch.zeros(len(chunk), t, dtype=torch.long)
        y = torch.full((len(chunk), t), IGNORE_INDEX, dtype=torch.long)
        for j, w in enumerate(chunk):
            x[j, : len(w) - 1] = torch.tensor(w[:-1])
            y[j, : len(w) - 1] = torch.tensor(w[1:])
        logits, _ = model(x.to(device))  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), y.to(device), ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T)
        out += [float(v) for v in nll.sum(dim=1)]
    return out


def evaluate_lm(
    model: DecodingModel,
    tokenizer: TokenizerLike,
    texts: Sequence[str],
    *,
    block_size: int | None = None,
    batch_size: int = 8,
) -> EvalReport:
    """Perplexity and bits per byte of ``texts`` (see the module docstring for the exact convention)."""
    texts = [t for t in texts if t]
    if not texts:
        raise EvalError("no text to evaluate")
    context = getattr(model, "max_seq_len", None)
    block = block_size or context or 1024
    if context is not None and block > context:
        raise EvalError(f"block size {block} exceeds the model's context ({context})")
    was_training = model.training
    model.eval()
    eot = tokenizer.eot_id
    docs = []
    all_windows: list[list[int]] = []
    for text in texts:
        ids = [eot, *tokenizer.encode(text), eot]
        ws = _windows(ids, block)
        docs.append((text, len(ids) - 1, len(ws)))
        all_windows += ws
    try:
        nlls = _window_nll(model, all_windows, batch_size)
    finally:
        model.train(was_training)
    examples, k = [], 0
    total_nll, total_tok, total_bytes = 0.0, 0, 0
    for i, (text, n_tok, n_win) in enumerate(docs):
        nll = sum(nlls[k : k + n_win])
        k += n_win
        n_bytes = len(text.encode("utf-8"))
        total_nll, total_tok, total_bytes = total_nll + nll, total_tok + n_tok, total_bytes + n_bytes
        examples.append(
            {
                "index": i,
                "text": text[:200],
                "bytes": n_bytes,
                "tokens": n_tok,
                "nll": nll,
                "ppl": M.perplexity(nll, n_tok),
                "bpb": M.bits_per_byte(nll, n_bytes),
            }
        )
    metrics = {
        "loss": total_nll / total_tok,
        "perplexity": M.perplexity(total_nll, total_tok),
        "bits_per_byte": M.bits_per_byte(total_nll, total_bytes),
        "bits_per_token": total_nll / total_tok / math.log(2),
        "tokens": total_tok,
        "bytes": total_bytes,
        "documents": len(texts),
    }
    return EvalReport(task="lm", metrics=metrics, examples=examples, info={"block_size": block})


# ------------------------------------------------------------------------------------------- tasks
@torch.no_grad()
def completion_nll(
    model: DecodingModel,
    tokenizer: TokenizerLike,
    task: Task,
    records: Sequence[dict[str, Any]],
    *,
    block_size: int,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per record, (summed NLL, tokens) of its trained tokens (the reference completion and ``<eot>``),
    teacher-forced, with the same encoding and truncation as fine-tuning."""
    enc = [encode_example(task, r, tokenizer, block_size) for r in records]
    device = _device(model)
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for x, y in task_batches(enc, batch_size, pad_id_of(tokenizer)):
            logits, _ = model(x.to(device))  # (B, T, V)
            y = y.to(device)
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none"
            )  # (B, T)
            out += [(float(a), int(b)) for a, b in zip(nll.sum(1), (y != IGNORE_INDEX).sum(1), strict=True)]
    finally:
        model.train(was_training)
    return out


def evaluate_task(
    model: DecodingModel,
    tokenizer: TokenizerLike,
    task: Task | str,
    records: Sequence[dict[str, Any]],
    *,
    labels: Sequence[str] | None = None,
    config: GenerationConfig | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
) -> EvalReport:
    """Predict every record and score the predictions with the task's metric.

    ``labels`` (classification) default to the labels of ``records``; ``block_size`` (teacher-forced
    completion perplexity) defaults to the model's context minus one."""
    task = get_task(task) if isinstance(task, str) else task
    if not records:
        raise EvalError("no examples to evaluate")
    if task.name == "classification":
        labels = list(labels) if labels else sorted({r["label"] for r in records})
        unknown = sorted({r["label"] for r in records} - set(labels))
        if unknown:
            raise EvalError(f"reference labels {unknown} are not in the label set {list(labels)}")
    preds, details = predict_records(
        model, tokenizer, task, records, config=config, labels=labels, batch_size=batch_size
    )
    refs = [task.reference(r).strip() for r in records]
    kwargs = {"labels": labels} if task.name == "classification" else {}
    agg, per = M.score(task.metric, preds, refs, **kwargs)
    block = block_size or ((getattr(model, "max_seq_len", None) or 1025) - 1)
    nlls = completion_nll(model, tokenizer, task, records, block_size=block, batch_size=batch_size)
    total_nll, total_tok = sum(n for n, _ in nlls), sum(t for _, t in nlls)
    metrics = {**agg, "completion_ppl": M.perplexity(total_nll, total_tok), "examples": len(records)}
    examples = []
    for i, rec in enumerate(records):
        prompt = task.format_prompt(rec)
        examples.append(
            {
                "index": i,
                "prompt": prompt,
                "reference": refs[i],
                "prediction": preds[i],
                "scores": per[i],
                "completion_nll": nlls[i][0],
                "completion_tokens": nlls[i][1],
                **details[i],
            }
        )
    info: dict[str, Any] = {"metric": task.metric}
    if labels is not None:
        info["labels"] = list(labels)
    return EvalReport(task=task.name, metrics=metrics, examples=examples, info=info)
