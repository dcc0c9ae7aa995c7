"""Decoding-settings search (``lmforge tune --task``'s ``decode`` step): coordinate search over the settings
of :class:`lmforge.predict.GenerationConfig` on validation records, scored by the task's metric.

Stages, each trying variations of the best settings so far (greedy first, so a tiny budget still ends with a
measured choice):

1. the copy mechanism (:class:`lmforge.predict.processors.CopyBiasProcessor`): ``copy_bias`` in
   :data:`COPY_BIASES` (0 = off, tried first): a small model trained briefly copies from its input badly,
   and summaries and translations of short messages reuse the input's words, so this comes first;
2. ``no_repeat_ngram_size`` in {0, n} (n: :func:`repeat_ngram_size`, about three words of the targets in
   tokens) and ``repetition_penalty`` in {1.0, 1.2}: a small model's usual failure is a loop, and copying
   makes loops over the input likelier;
3. ``source_bias`` in :data:`SOURCE_BIASES` (every token of the prompt), then its ``source_half_life`` in
   {0 (off)} + :data:`HALF_LIVES_WORDS` words (in tokens): a lead bias toward the input's beginning;
4. ``max_new_tokens``: the length budget, from the training targets' length distribution (median, 90th
   percentile and the longest, in tokens, plus a margin): a model that does not stop is cut short;
5. ``num_beams`` in {1, 2, 4} with ``length_penalty`` in {0.6, 1.0, 1.4} (beam search only).

Classification does not generate: it scores the label set (:func:`lmforge.predict.tasks.classify`), so
there is nothing to search; its settings are the label scoring's (``max_new_tokens`` of the longest label).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lmforge.data.tasks import Task, TokenizerLike
from lmforge.evaluate import metrics as M
from lmforge.evaluate.baselines import PRIMARY_METRIC
from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationConfig
from lmforge.predict.tasks import label_ids, predict_records

COPY_BIASES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
"""``copy_bias`` values tried (added to logits, or log-probabilities in beam search: e^bias times as likely)."""
SOURCE_BIASES = (0.0, 0.5, 1.0, 2.0, 4.0)
HALF_LIVES_WORDS = (4, 8, 32)
"""``source_half_life`` values tried besides 0, in words of the targets (converted to tokens)."""
LENGTH_MARGIN = 4
"""Tokens added to the measured target lengths (the ``<eot>`` and a little slack)."""


def primary(task: Task) -> str:
    return PRIMARY_METRIC[task.metric]


def settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)


def length_budgets(task: Task, records: Sequence[dict[str, Any]], tokenizer: TokenizerLike) -> list[int]:
    """Candidate ``max_new_tokens`` from the targets of ``records``: the 90th percentile, the median and
    the maximum (each plus :data:`LENGTH_MARGIN`), distinct, the 90th percentile first (the search's
    starting budget), the others ascending."""
    lengths = np.array([len(tokenizer.encode(" " + task.reference(r))) for r in records], dtype=float)
    p90 = int(math.ceil(float(np.percentile(lengths, 90)))) + LENGTH_MARGIN
    p50 = int(math.ceil(float(np.percentile(lengths, 50)))) + LENGTH_MARGIN
    top = int(lengths.max()) + LENGTH_MARGIN
    return [p90] + sorted({p50, top} - {p90})


def tokens_per_word(task: Task, records: Sequence[dict[str, Any]], tokenizer: TokenizerLike) -> float:
    """Tokens per whitespace-separated word in the targets of ``records`` (1-2 for BPE, ~6 for char)."""
    refs = [task.reference(r) for r in records]
    words = sum(len(r.split()) for r in refs)
    tokens = sum(len(tokenizer.encode(" " + r)) for r in refs)
    return tokens / max(1, words)


def repeat_ngram_size(task: Task, records: Sequence[dict[str, Any]], tokenizer: TokenizerLike) -> int:
    """The ``no_repeat_ngram_size`` tried: about three words of the targets of ``records`` in tokens (3 for
    a word-level tokenizer, ~15 for a character-level one, where 3 would ban every repeated syllable)."""
    return max(3, round(3 * tokens_per_word(task, records, tokenizer)))


def label_settings(labels: Sequence[str], tokenizer: TokenizerLike) -> dict[str, Any]:
    """Classification: greedy, room for the longest label (used by ``generate``; ``eval`` scores labels)."""
    return {"max_new_tokens": max(len(ids) for ids in label_ids(labels, tokenizer)), "num_beams": 1}


def score_settings(
    model: DecodingModel,
    tokenizer: TokenizerLike,
    task: Task,
    records: Sequence[dict[str, Any]],
    settings: dict[str, Any],
) -> dict[str, float]:
    """The task metric of ``records`` decoded with ``settings``."""
    preds, _ = predict_records(model, tokenizer, task, records, config=GenerationConfig(**settings))
    agg, _ = M.score(task.metric, preds, [task.reference(r).strip() for r in records])
    return agg


def _stages(
    budgets: list[int], ngram: int, half_lives: Sequence[int]
) -> list[Callable[[dict[str, Any]], list[dict[str, Any]]]]:
    def copy(best: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**best, "copy_bias": c} for c in COPY_BIASES]

    def source(best: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**best, "source_bias": c} for c in SOURCE_BIASES]

    def lead(best: dict[str, Any]) -> list[dict[str, Any]]:
        if not best["source_bias"]:
            return []  # no source bias to decay
        return [{**best, "source_half_life": h} for h in (0, *half_lives)]

    def lengths(best: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**best, "max_new_tokens": b} for b in budgets]

    def repeats(best: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {**best, "no_repeat_ngram_size": n, "repetition_penalty": r} for n in (0, ngram) for r in (1.0, 1.2)
        ]

    def beams(best: dict[str, Any]) -> list[dict[str, Any]]:
        out = [{**best, "num_beams": 1, "length_penalty": 1.0}]
        out += [{**best, "num_beams": b, "length_penalty": lp} for b in (2, 4) for lp in (1.0, 0.6, 1.4)]
        return out

    return [copy, repeats, source, lead, lengths, beams]


def candidates(
    budgets: list[int], tried: dict[str, dict[str, Any]], ngram: int = 3, half_lives: Sequence[int] = (8, 32)
) -> Iterator[dict[str, Any]]:
    """The next settings to try, stage by stage around the best of ``tried`` (key -> {settings, score}),
    skipping settings already tried (a resumed search continues where it stopped). ``budgets``: the
    length budgets (the first one to start with); ``ngram``: the no-repeat n-gram size tried;
    ``half_lives``: the source bias's half-lives tried besides 0, in tokens."""
    start = {
        "max_new_tokens": budgets[0],
        "num_beams": 1,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "repetition_penalty": 1.0,
        "copy_bias": 0.0,
        "source_bias": 0.0,
        "source_half_life": 0,
    }
    for stage in _stages(budgets, ngram, half_lives):
        best = best_settings(tried) or start
        for s in stage(best):
            if settings_key(s) not in tried:
                yield s


def best_settings(tried: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The settings with the highest score (the earliest tried on a tie: the simpler ones come first)."""
    if not tried:
        return None
    order = list(tried.values())
    best = max(range(len(order)), key=lambda i: (order[i]["score"], -i))
    return dict(order[best]["settings"])
