"""Tiny task record sets for the ``lmforge tune --task`` tests (deterministic in their seed)."""

from __future__ import annotations

import random
from pathlib import Path

from support.finetune import write_jsonl

WORDS = "the cat sat on a mat and dog ran to big red house while small bird sang near old tree".split()


def classification_records(n: int = 60, seed: int = 0) -> list[dict]:
    """Texts whose label is given away by a cue word (``good``/``bad``), the rest random words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(WORDS) for _ in range(6)]
        words.insert(rng.randint(0, 6), "good" if label == "pos" else "bad")
        out.append({"text": " ".join(words), "label": label})
    return out


def summarization_records(n: int = 40, seed: int = 0) -> list[dict]:
    """Documents of a few sentences whose summary is their first sentence (lead-k is a strong baseline)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))) + "." for _ in range(3)]
        out.append({"document": " ".join(sents), "summary": sents[0]})
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, records)


GERMAN = (
    "der katze sass auf einer matte und hund lief zu grossem rotem haus waehrend kleiner vogel sang nahe altem baum"
)
LEXICON = dict(zip(WORDS, GERMAN.split(), strict=True))


def translation_records(n: int = 40, seed: int = 0) -> list[dict]:
    """Word-by-word "translations" of random phrases (distinct sources: retrieval never finds the same one)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        src = " ".join(words)
        if src not in seen:
            seen.add(src)
            out.append({"source": src, "target": " ".join(LEXICON[w] for w in words)})
    return out
