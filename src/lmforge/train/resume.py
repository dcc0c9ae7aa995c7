"""Where a run continues from, and what it must agree with: the checkpoint ``train.resume`` picks, the
checks that it belongs to the requested run (same architecture, same tokenizer, a whole trainer state) and
the best model a run directory already holds (#14.3, #14.9).

Apart from the loop because none of it runs per step: it is read once, before the first step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig, TrainConfig
from lmforge.runs import (
    BEST_DIR,
    META_FILE,
    TRAINER_FILE,
    Checkpoint,
    CheckpointError,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from lmforge.train.errors import TrainingError

TRAINER_STATE_KEYS = (
    "optimizer", "scheduler", "sampler", "rng", "step", "tokens", "elapsed_s", "best_val_loss", "best_step",
    "bad_evals",
)
"""What every checkpoint's trainer state holds (``rng_ranks`` only under data parallelism)."""
RESOLVED_MODEL_FIELDS = ("vocab_size", "max_seq_len")
"""Model fields the loop fills in from the tokenizer and ``data.block_size`` when the config leaves them empty."""


@dataclass(frozen=True)
class BestSoFar:
    """The model in ``OUT/best``: a resumed or restarted run replaces it only with a better one."""

    val_loss: float
    step: int


def resume_checkpoint(tc: TrainConfig, out: Path) -> Checkpoint | None:
    """The checkpoint to continue from under ``train.resume``; never overwrite a run by accident."""
    if tc.resume == "never":
        held = [p.name for p in list_checkpoints(out)] if out.exists() else []
        if is_complete(out / BEST_DIR):
            held.append(BEST_DIR)
        if held:
            raise TrainingError(
                f"{out} already holds a run ({', '.join(held[-3:])}); pass --train.resume auto to continue it, "
                "or choose another --out"
            )
        return None
    if tc.resume == "auto":
        return latest_checkpoint(out) if out.exists() else None
    try:
        return load_checkpoint(Path(tc.resume))
    except (CheckpointError, FileNotFoundError, OSError) as err:
        raise TrainingError(f"train.resume = {tc.resume!r}: {err}") from None


def check_resume_matches(config: RunConfig, ckpt: Checkpoint) -> None:
    """Raise :class:`TrainingError` naming every ``model``/``tokenizer`` field in which the requested run
    differs from the checkpoint's: a resumed run continues the same model with the same tokenizer (a changed
    tokenizer used to be ignored silently, a changed architecture failed deep inside torch)."""
    saved = ckpt.config if isinstance(ckpt.config, dict) else {}
    differ: list[str] = []
    for section in ("model", "tokenizer"):
        mine = getattr(config, section).model_dump(mode="json")
        theirs = saved.get(section)
        if not isinstance(theirs, dict):
            continue  # a hand-made checkpoint without the section: its weights are checked on load
        for key in sorted(set(mine) | set(theirs)):
            if section == "model" and key in RESOLVED_MODEL_FIELDS and mine.get(key) is None:
                continue
            if mine.get(key) != theirs.get(key):
                differ.append(f"{section}.{key} {theirs.get(key)!r} -> {mine.get(key)!r}")
    if differ:
        raise TrainingError(
            f"cannot resume from {ckpt.path}: the requested run differs from the checkpoint's in "
            f"{'; '.join(differ)}; resume with the checkpoint's settings, or choose another --out"
        )


def check_trainer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's trainer state, or :class:`TrainingError` naming the keys it lacks."""
    ts = ckpt.trainer_state
    assert ts is not None
    missing = [k for k in TRAINER_STATE_KEYS if k not in ts]
    if missing:
        raise TrainingError(
            f"cannot resume from {ckpt.path / TRAINER_FILE}: the trainer state lacks {', '.join(missing)}"
        )
    return ts


def best_so_far(out: Path) -> BestSoFar | None:
    """The validation loss and step recorded by a complete ``OUT/best``, or None (no best yet, or one whose
    ``meta.json`` records no finite loss: that one may be replaced)."""
    best = out / BEST_DIR
    if not is_complete(best):
        return None
    try:
        meta = json.loads((best / META_FILE).read_text(encoding="utf-8"))
        val, step = float(meta["val_loss"]), int(meta.get("step", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return BestSoFar(val, step) if math.isfinite(val) else None
