"""Task metrics (layer 4, no model code): ROUGE, BLEU/chrF, accuracy/macro-F1, exact match, perplexity.

Every scorer takes parallel lists of predictions and references (strings) and returns
``(aggregate, per_example)``: ``aggregate`` maps metric names to corpus scores, ``per_example`` holds
one dict of scores per pair (kept in the evaluation report for inspection). Scores are on a 0-100
scale like the papers that report them; perplexity and bits per byte are computed from summed NLL.

ROUGE comes from ``rouge-score`` and BLEU/chrF from ``sacrebleu`` (the ``[eval]`` extra), imported when
used; neither downloads anything at run time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from lmforge.config import LmforgeError


class MetricError(LmforgeError):
    """A metric cannot be computed (missing optional dependency, mismatched inputs)."""


Scores = tuple[dict[str, float], list[dict[str, float]]]


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise MetricError("no examples to score")


# ------------------------------------------------------------------------------------------ ROUGE
def rouge(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> Scores:
    """ROUGE-1/2/L F-measure (x100), averaged over examples (as ``rouge-score`` and HF ``evaluate`` report).

    ``rouge-score`` lowercases and keeps only ``[a-z0-9]`` tokens; ``use_stemmer`` applies the Porter stemmer
    (the usual setting for news summarization)."""
    _check(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MetricError("ROUGE needs the rouge-score package: pip install 'lmforge[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    per = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)  # score(target, prediction)
        per.append({k: 100.0 * s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
    agg = {k: sum(p[k] for p in per) / len(per) for k in ("rouge1", "rouge2", "rougeL")}
    return agg, per


# ------------------------------------------------------------------------------------ BLEU / chrF
def bleu_chrf(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus BLEU (13a tokenization, exponential smoothing) and chrF (character 6-grams, beta 2) from
    ``sacrebleu``; per example, sentence BLEU with effective order and sentence chrF."""
    _check(predictions, references)
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise MetricError("BLEU/chrF need the sacrebleu package: pip install 'lmforge[eval]'") from None
    preds, refs = list(predictions), list(references)
    agg = {
        "bleu": float(BLEU().corpus_score(preds, [refs]).score),
        "chrf": float(CHRF().corpus_score(preds, [refs]).score),
    }
    sent_bleu, sent_chrf = BLEU(effective_order=True), CHRF()
    per = [
        {"bleu": float(sent_bleu.sentence_score(p, [r]).score), "chrf": float(sent_chrf.sentence_score(p, [r]).score)}
        for p, r in zip(preds, refs, strict=True)
    ]
    return agg, per


# -------------------------------------------------------------------------------- classification
def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (x100) of predictions equal to their reference label."""
    _check(predictions, references)
    return 100.0 * sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean over labels of the per-label F1 (x100).

    ``labels`` default to every label seen in the references or predictions (as scikit-learn); a label
    with no true and no predicted example has F1 = 0 (scikit-learn's ``zero_division=0``)."""
    _check(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    labels = sorted(set(references) | set(predictions)) if labels is None else list(labels)
    if not labels:
        raise MetricError("macro-F1 needs at least one label")
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in pairs)
        fp = sum(p == lab and r != lab for p, r in pairs)
        fn = sum(p != lab and r == lab for p, r in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return 100.0 * sum(f1s) / len(f1s)


def classification(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> Scores:
    """Accuracy and macro-F1 (x100); per example, ``correct`` is 100 or 0."""
    agg = {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references, labels)}
    per = [{"correct": 100.0 * (p == r)} for p, r in zip(predictions, references, strict=True)]
    return agg, per


# ----------------------------------------------------------------------------------- exact match
_EM_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_structured(text: str, *, ignore_case: bool = False) -> str:
    """Canonical form for exact match of structured output: words and single punctuation marks
    separated by one space, so ``"(add 3 4)"``, ``" ( add  3 4 ) "`` and ``"(add 3\\n4)"`` compare equal;
    ``"(add 3 4)"`` and ``"(add 34)"`` do not."""
    tokens = _EM_TOKEN.findall(text)
    out = " ".join(tokens)
    return out.lower() if ignore_case else out


def exact_match(predictions: Sequence[str], references: Sequence[str], *, ignore_case: bool = False) -> Scores:
    """Exact match (x100) after :func:`normalize_structured` on both sides."""
    _check(predictions, references)
    per = [
        {
            "exact_match": 100.0
            * (normalize_structured(p, ignore_case=ignore_case) == normalize_structured(r, ignore_case=ignore_case))
        }
        for p, r in zip(predictions, references, strict=True)
    ]
    return {"exact_match": sum(p["exact_match"] for p in per) / len(per)}, per


def rouge_and_exact(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """Open-ended generation (``generation``, ``chat``): ROUGE-1/2/L and exact match."""
    agg_r, per_r = rouge(predictions, references)
    agg_e, per_e = exact_match(predictions, references)
    return {**agg_r, **agg_e}, [{**a, **b} for a, b in zip(per_r, per_e, strict=True)]


# ------------------------------------------------------------------------------- language models
def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)`` (natural-log NLL summed over the scored tokens)."""
    if n_tokens <= 0:
        raise MetricError("perplexity of zero tokens")
    return math.exp(min(total_nll / n_tokens, 700.0))


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Summed NLL in bits divided by the UTF-8 bytes of the scored text (tokenizer-independent)."""
    if n_bytes <= 0:
        raise MetricError("bits per byte of zero bytes")
    return total_nll / math.log(2) / n_bytes


# -------------------------------------------------------------------------------------- registry
METRICS: dict[str, Callable[..., Scores]] = {
    "rouge": rouge,
    "bleu_chrf": bleu_chrf,
    "classification": classification,
    "exact_match": exact_match,
    "rouge_exact": rouge_and_exact,
}
"""Metric-set name (``Task.metric``) -> scorer."""


def score(metric: str, predictions: Sequence[str], references: Sequence[str], **kwargs: Any) -> Scores:
    """Run the scorer named ``metric`` (see :data:`METRICS`)."""
    if metric not in METRICS:
        raise MetricError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric](predictions, references, **kwargs)
