"""Token streams cut along document boundaries: the held-out test split and the k folds of ``--cv``.

Prepared streams end every document with ``<|endoftext|>`` (``eot_id``), so documents are recovered from
the stream itself. A stream with a single document is cut into equal contiguous pieces instead.
"""

from __future__ import annotations

import numpy as np


def document_spans(tokens: np.ndarray, eot_id: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: each document with its closing end-of-text token."""
    n = len(tokens)
    if n == 0:
        return []
    if eot_id is None:
        return [(0, n)]
    ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
    bounds = [0, *ends.tolist()]
    if bounds[-1] != n:
        bounds.append(n)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _pieces(tokens: np.ndarray, eot_id: int | None, k: int, seed: int) -> list[np.ndarray]:
    """``k`` groups of whole documents (a seeded assignment balancing token counts), or ``k`` contiguous
    pieces when there are fewer than ``k`` documents."""
    spans = document_spans(tokens, eot_id)
    if len(spans) < k:
        cuts = np.linspace(0, len(tokens), k + 1).astype(np.int64)
        return [np.asarray(tokens[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    order = np.random.default_rng(seed).permutation(len(spans))
    groups: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    sizes = [0] * k
    for i in order:  # greedy: the next document goes to the smallest group
        g = int(np.argmin(sizes))
        groups[g].append(spans[i])
        sizes[g] += spans[i][1] - spans[i][0]
    return [np.concatenate([np.asarray(tokens[a:b]) for a, b in sorted(grp)]) for grp in groups]


def holdout_split(val: np.ndarray, eot_id: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The validation stream halved by documents: (validation used by the search, test used only by the
    final evaluation)."""
    a, b = _pieces(val, eot_id, 2, seed)
    return a, b


def kfold(tokens: np.ndarray, eot_id: int | None, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, validation) pairs: fold ``i`` validates on group ``i`` of the documents and trains on
    the rest."""
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got {k}")
    groups = _pieces(tokens, eot_id, k, seed)
    return [(np.concatenate([g for j, g in enumerate(groups) if j != i]), groups[i]) for i in range(k)]
