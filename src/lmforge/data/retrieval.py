"""Retrieval of training examples for task prompts (layer 2), in the spirit of neural fuzzy repair (Bulte &
Tezcan 2019) and retrieval-augmented generation: a record's ``k`` nearest training records, by TF-IDF
cosine similarity of their input field, are shown (input and output, untrained) before its own prompt.

The index is TF-IDF over character n-grams within words (``char_wb``, 2-4 characters, lower-cased,
sublinear term frequency, smoothed idf, unit-length rows: scikit-learn's ``TfidfVectorizer(analyzer=
"char_wb", ngram_range=(2, 4), sublinear_tf=True)``), kept as an inverted index in numpy. A neighbour never
has the same input text as the record it is retrieved for: a training record never sees itself (or a
duplicate of its input), which would teach "copy the neighbour's output verbatim".

The rule, written once: :func:`attach` puts the neighbours (role dicts, the nearest last) into each record
under :data:`lmforge.data.tasks.RETRIEVED`, and :meth:`lmforge.data.tasks.Task.format_prompt` writes them
before the prompt. Training, the decoding search, evaluation and ``lmforge eval`` all call :func:`attach`
with the index saved beside the model (:mod:`lmforge.runs.retrieval_file`), so they build the same prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.data.tasks import RETRIEVED, Task, TaskDataError, get_task

RETRIEVAL_TASKS = ("translation", "classification", "semantic-parsing")
"""Tasks whose prompts may hold retrieved examples (a short input, a short output)."""
NGRAM = (2, 4)
"""Character n-gram lengths of the index's features."""


def ngrams(text: str, lo: int = NGRAM[0], hi: int = NGRAM[1]) -> Counter[str]:
    """Character n-grams of each lower-cased word padded with a space on both sides (``char_wb``)."""
    out: Counter[str] = Counter()
    for word in text.lower().split():
        w = f" {word} "
        for n in range(lo, hi + 1):
            if len(w) < n:
                break
            out.update(w[i : i + n] for i in range(len(w) - n + 1))
    return out


@dataclass
class RetrievalIndex:
    """The TF-IDF index of ``records`` (role dicts of ``task``) by their input role (the task's first)."""

    task: Task
    records: list[dict[str, Any]]
    k: int = 1
    inputs: list[str] = field(init=False, repr=False)
    """Each record's input text (what a neighbour's input is compared with)."""
    vocab: dict[str, int] = field(init=False, repr=False)
    idf: np.ndarray = field(init=False, repr=False)
    indptr: np.ndarray = field(init=False, repr=False)
    docs: np.ndarray = field(init=False, repr=False)
    weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.task.name not in RETRIEVAL_TASKS:
            raise TaskDataError(f"task {self.task.name}: retrieval is for {list(RETRIEVAL_TASKS)}")
        if self.k < 1:
            raise TaskDataError(f"retrieval k must be at least 1, got {self.k}")
        if not self.records:
            raise TaskDataError("retrieval: no records to index")
        self.inputs = [str(r[self.input_role]) for r in self.records]
        self.vocab = {}
        rows, cols, tfs = [], [], []
        for d, text in enumerate(self.inputs):
            for gram, tf in ngrams(text).items():
                rows.append(d)
                cols.append(self.vocab.setdefault(gram, len(self.vocab)))
                tfs.append(tf)
        doc = np.asarray(rows, dtype=np.int64)
        feat = np.asarray(cols, dtype=np.int64)
        n = len(self.records)
        df = np.bincount(feat, minlength=len(self.vocab))
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0  # (F,)
        w = (1.0 + np.log(np.asarray(tfs, dtype=np.float64))) * self.idf[feat]
        norm = np.sqrt(np.bincount(doc, weights=w * w, minlength=n))  # (N,)
        w = w / np.maximum(norm[doc], 1e-12)
        order = np.argsort(feat, kind="stable")
        self.docs, self.weights = doc[order], w[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(feat, minlength=len(self.vocab)))])

    @property
    def input_role(self) -> str:
        return self.task.roles[0]

    def scores(self, text: str) -> np.ndarray:
        """Cosine similarity of ``text``'s input to every indexed record's (N,)."""
        grams = [(self.vocab[g], tf) for g, tf in ngrams(text).items() if g in self.vocab]
        out = np.zeros(len(self.records))
        if not grams:
            return out
        q = np.asarray([(1.0 + math.log(tf)) * self.idf[f] for f, tf in grams])
        q /= np.linalg.norm(q)
        docs = np.concatenate([self.docs[self.indptr[f] : self.indptr[f + 1]] for f, _ in grams])
        w = np.concatenate(
            [self.weights[self.indptr[f] : self.indptr[f + 1]] * qi for (f, _), qi in zip(grams, q, strict=True)]
        )
        return np.bincount(docs, weights=w, minlength=len(self.records))

    def neighbours(self, record: dict[str, Any], k: int | None = None) -> list[int]:
        """Indices of the ``k`` (default: the index's) records most similar to ``record``'s input, the most
        similar first (the lower index on a tie), never one with the same input text."""
        text = str(record[self.input_role])
        s = self.scores(text)
        order = np.argsort(-s, kind="stable")
        out: list[int] = []
        for i in order:
            if self.inputs[i] != text:
                out.append(int(i))
                if len(out) == (k or self.k):
                    break
        return out

    def examples(self, record: dict[str, Any], k: int | None = None) -> list[dict[str, Any]]:
        """The neighbours of ``record`` as role dicts, the nearest LAST (next to the record's own prompt)."""
        roles = self.task.roles
        return [{r: self.records[i][r] for r in roles} for i in reversed(self.neighbours(record, k))]

    def to_dict(self) -> dict[str, Any]:
        """What :meth:`from_dict` rebuilds the same index from (the records' roles, ``k``, the features)."""
        return {
            "task": self.task.name,
            "k": self.k,
            "features": {"analyzer": "char_wb", "ngram": list(NGRAM), "tf": "sublinear", "idf": "smooth"},
            "records": [{r: rec[r] for r in self.task.roles} for rec in self.records],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "the retrieval index") -> RetrievalIndex:
        try:
            task = get_task(str(d["task"]))
            k = int(d["k"])
            records = d["records"]
            if not isinstance(records, list) or not all(
                isinstance(r, dict) and all(isinstance(r.get(x), str) for x in task.roles) for r in records
            ):
                raise TaskDataError(f"{where}: 'records' must be a list of {{{', '.join(task.roles)}}} strings")
            if list(d.get("features", {}).get("ngram", NGRAM)) != list(NGRAM):
                raise TaskDataError(f"{where}: features {d['features']} are not this version's ({NGRAM})")
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, TaskDataError):
                raise
            raise TaskDataError(f"{where}: not a retrieval index ({type(err).__name__}: {err})") from None
        return cls(task, records, k)


def attach(
    index: RetrievalIndex | None, records: Sequence[dict[str, Any]], k: int | None = None
) -> list[dict[str, Any]]:
    """Copies of ``records`` with their retrieved examples under :data:`RETRIEVED` (``index`` None or
    ``k`` 0: the records as they are)."""
    if index is None or k == 0:
        return list(records)
    return [{**r, RETRIEVED: index.examples(r, k)} for r in records]


def build_index(task: Task | str, records: Sequence[dict[str, Any]], k: int = 1) -> RetrievalIndex:
    task = get_task(task) if isinstance(task, str) else task
    return RetrievalIndex(task, [{r: rec[r] for r in task.roles} for rec in records], k)
