"""lmforge.evaluate (layer 4): metrics and evaluation runs.

- ``metrics``: ROUGE (rouge-score), BLEU/chrF (sacrebleu), accuracy, macro-F1, exact match, perplexity,
  bits per byte; each scorer returns ``(aggregate, per_example)``.
- ``runner``: :func:`evaluate_lm` (perplexity, bits per byte of a corpus) and :func:`evaluate_task`
  (predictions of a task scored by its metric), both returning an :class:`EvalReport`.
"""

from lmforge.evaluate.metrics import (
    METRICS,
    MetricError,
    accuracy,
    bits_per_byte,
    bleu_chrf,
    classification,
    exact_match,
    macro_f1,
    normalize_structured,
    perplexity,
    rouge,
    score,
)
from lmforge.evaluate.runner import EvalError, EvalReport, evaluate_lm, evaluate_task

__all__ = [
    "METRICS",
    "EvalError",
    "EvalReport",
    "MetricError",
    "accuracy",
    "bits_per_byte",
    "bleu_chrf",
    "classification",
    "evaluate_lm",
    "evaluate_task",
    "exact_match",
    "macro_f1",
    "normalize_structured",
    "perplexity",
    "rouge",
    "score",
]
