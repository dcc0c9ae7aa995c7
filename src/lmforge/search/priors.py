"""Start points chosen across corpora: per family, the configuration with the best mean rank, and the
leave-one-corpus-out check of that rule.

``benchmarks/derive_priors.py`` trains the same candidate configurations (per family: the hand-set grid
point and a few random ones) on several corpora and hands the losses here. Ranks, not losses, are averaged:
corpora differ in entropy by more than configurations differ on one corpus, so a mean loss would be decided
by the hardest corpus. A configuration that failed (no finite loss) ranks last on that corpus.

The start points these functions chose are written into the ``start:`` section of ``default_space.yaml``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Losses = Mapping[str, Mapping[str, float]]
"""``losses[corpus][candidate]``: a candidate's validation loss on a corpus (nan / inf when it failed)."""


def ranks(losses: Mapping[str, float]) -> dict[str, float]:
    """Rank of every candidate on one corpus (1 = lowest loss; ties share their mean rank; a non-finite
    loss ranks after every finite one)."""
    keyed = sorted(losses, key=lambda k: (0, losses[k]) if math.isfinite(losses[k]) else (1, 0.0))
    out: dict[str, float] = {}
    i = 0
    while i < len(keyed):
        j = i
        v = losses[keyed[i]]
        while j + 1 < len(keyed) and _same(losses[keyed[j + 1]], v):
            j += 1
        for k in keyed[i : j + 1]:
            out[k] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (not math.isfinite(a) and not math.isfinite(b))


def mean_ranks(losses: Losses, corpora: Sequence[str] | None = None) -> dict[str, float]:
    """Every candidate's mean rank over ``corpora`` (default: all); a candidate must have a loss on each."""
    names = list(corpora) if corpora is not None else list(losses)
    if not names:
        raise ValueError("mean_ranks needs at least one corpus")
    candidates = set(losses[names[0]])
    for c in names[1:]:
        if set(losses[c]) != candidates:
            raise ValueError(f"corpus {c!r} scored other candidates than {names[0]!r}")
    per = [ranks(losses[c]) for c in names]
    return {k: statistics.mean(r[k] for r in per) for k in sorted(candidates)}


def pick(losses: Losses, corpora: Sequence[str] | None = None) -> str:
    """The candidate with the best mean rank over ``corpora``; ties go to the lower mean loss, then the name."""
    names = list(corpora) if corpora is not None else list(losses)
    mr = mean_ranks(losses, names)

    def mean_loss(k: str) -> float:
        vals = [losses[c][k] for c in names]
        return statistics.mean(vals) if all(math.isfinite(v) for v in vals) else math.inf

    return min(mr, key=lambda k: (mr[k], mean_loss(k), k))


@dataclass(frozen=True)
class HeldOut:
    """One leave-one-corpus-out row: the pick made without ``corpus``, scored on it."""

    corpus: str
    picked: str
    picked_loss: float
    picked_rank: float
    hand_set_loss: float
    hand_set_rank: float
    random_mean: float
    """Mean loss of the random candidates (every candidate but the hand-set one) on ``corpus``."""
    random_median: float
    n_candidates: int


def leave_one_out(losses: Losses, hand_set: str) -> list[HeldOut]:
    """For every corpus X: the candidate picked on the others, its loss and rank on X, beside the hand-set
    candidate's and the random candidates' mean and median. Needs at least two corpora."""
    corpora = list(losses)
    if len(corpora) < 2:
        raise ValueError("leave-one-corpus-out needs at least two corpora")
    rows = []
    for held in corpora:
        rest = [c for c in corpora if c != held]
        chosen = pick(losses, rest)
        r = ranks(losses[held])
        rand = [v for k, v in losses[held].items() if k != hand_set]
        finite = [v for v in rand if math.isfinite(v)]
        rows.append(
            HeldOut(
                corpus=held,
                picked=chosen,
                picked_loss=losses[held][chosen],
                picked_rank=r[chosen],
                hand_set_loss=losses[held][hand_set],
                hand_set_rank=r[hand_set],
                random_mean=statistics.mean(finite) if finite else math.inf,
                random_median=statistics.median(finite) if finite else math.inf,
                n_candidates=len(r),
            )
        )
    return rows
