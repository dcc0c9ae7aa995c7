"""Task prediction (layer 3): a record -> its prompt (the template of :mod:`lmforge.data.tasks`) -> an output.

Generative tasks decode with :func:`lmforge.predict.generate` (stopping at ``<eot>`` or, for single-line
tasks, a newline). Classification is constrained to the label set: each label's completion
``" {label}<eot>"`` is scored by its summed log-likelihood after the prompt, and the most likely label
wins (the first in label order on a tie), so the output is always a label.

Prompts are encoded exactly as in training (:func:`lmforge.data.tasks.encode_segments`), and a prompt
that does not fit the model's context is cut from the left, as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.data.tasks import EOT, Task, TokenizerLike, chat_segments, encode_segments, get_task
from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationConfig
from lmforge.predict.engine import generate

DEFAULT_MAX_NEW_TOKENS = {"summarization": 64, "translation": 64, "semantic-parsing": 64, "generation": 64, "chat": 128}


def prompt_ids(task: Task | str, record: dict[str, Any], tokenizer: TokenizerLike) -> list[int]:
    """Token ids of the prompt of ``record``, encoded as the training sequence encodes it."""
    task = get_task(task) if isinstance(task, str) else task
    if task.name == "chat":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        segs = chat_segments(msgs[:last], add_generation_prompt=True)
    else:
        segs = [(task.format_prompt(record), False)]
    return encode_segments(segs, tokenizer)[0]


def _device(model: DecodingModel) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def score_candidates(model: DecodingModel, prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
    """Summed log-probability of each candidate continuation of ``prompt`` (natural log).

    The rows ``prompt + candidate`` are scored in one right-padded forward pass. When the prompt and the
    longest candidate do not fit the model's context, the prompt is cut from the left, the same for every
    candidate, so that all are scored after the same context (candidates are kept whole)."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    max_len = getattr(model, "max_seq_len", None)
    longest = max(len(c) for c in candidates)
    prompt = list(prompt)
    if max_len is not None and len(prompt) + longest > max_len:
        prompt = prompt[len(prompt) + longest - max_len :]
    if not prompt:
        raise ValueError(f"a candidate of {longest} tokens leaves no room for the prompt (context {max_len})")
    rows = [prompt + list(c) for c in candidates]
    t = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(idx.to(_device(model)))  # (N, T, V)
    finally:
        model.train(was_training)
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = len(prompt)
    out = []
    for i, c in enumerate(candidates):
        # token c[j] sits at position p + j and is predicted by position p + j - 1
        pos = torch.arange(p - 1, p - 1 + len(c), device=logp.device)
        out.append(float(logp[i, pos, torch.tensor(list(c), device=logp.device)].sum()))
    return out


def label_ids(labels: Sequence[str], tokenizer: TokenizerLike, task: Task | str = "classification") -> list[list[int]]:
    """The completion tokens of each label (``" {label}"`` then ``<eot>``), as in training."""
    task = get_task(task) if isinstance(task, str) else task
    out = []
    for lab in labels:
        ids, _ = encode_segments([(task.completion.format(**{task.target: lab}), True), (EOT, True)], tokenizer)
        out.append(ids)
    return out


def classify(
    model: DecodingModel, tokenizer: TokenizerLike, prompts: Sequence[Sequence[int]], labels: Sequence[str]
) -> tuple[list[str], list[list[float]]]:
    """Constrained decoding: per prompt, the label with the largest log-likelihood (first on a tie) and
    the scores of all labels (in ``labels`` order)."""
    if not labels:
        raise ValueError("classification needs a non-empty label set")
    cands = label_ids(labels, tokenizer)
    preds, all_scores = [], []
    for p in prompts:
        scores = score_candidates(model, p, cands)
        best = max(range(len(labels)), key=lambda k: (scores[k], -k))
        preds.append(labels[best])
        all_scores.append(scores)
    return preds, all_scores


def predict_records(
    model: DecodingModel,
    tokenizer: TokenizerLike,
    task: Task | str,
    records: Sequence[dict[str, Any]],
    *,
    config: GenerationConfig | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 8,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Predict the output of every record -> (predictions, per-record details such as label scores).

    Generative tasks use ``config`` (default: greedy, a task-dependent ``max_new_tokens``) plus the task's
    stop strings, with prompts truncated from the left; ``max_new_tokens`` is capped at half the model's
    context. The leading space the template puts before a completion is stripped. Classification needs
    ``labels``."""
    task = get_task(task) if isinstance(task, str) else task
    prompts = [prompt_ids(task, r, tokenizer) for r in records]
    if task.name == "classification":
        if not labels:
            raise ValueError("classification needs the label set (labels=...)")
        preds, scores = classify(model, tokenizer, prompts, list(labels))
        return preds, [{"label_scores": dict(zip(labels, s, strict=True))} for s in scores]
    if config is None:
        config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS.get(task.name, 64))
    stops = list(dict.fromkeys([*(config.stop_strings or []), *task.stop]))
    update: dict[str, Any] = {"stop_strings": stops or None, "truncate_prompt": True}
    ctx = getattr(model, "max_seq_len", None)
    if ctx is not None and config.max_new_tokens is not None and config.max_new_tokens > ctx // 2:
        # a small context keeps at least half of itself for the prompt
        update["max_new_tokens"] = max(1, ctx // 2)
    config = GenerationConfig(**{**config.__dict__, **update})
    preds = []
    details: list[dict[str, Any]] = []
    for i in range(0, len(prompts), batch_size):
        out = generate(model, prompts[i : i + batch_size], config, tokenizer=tokenizer)
        assert out.texts is not None
        preds += [t[0].strip() for t in out.texts]
        details += [{"finish_reason": f[0]} for f in out.finish_reasons]
    return preds, details
