"""Fine-tuning core (layer 5): the config of a fine-tune from a pretrained model, its pretrained-start
defaults, and one training run on task records. ``lmforge finetune`` and ``lmforge tune --task`` both call it.

Pretrained-start defaults (:data:`PRETRAINED_START`) are what a Hugging Face ``Trainer`` user expects when
fine-tuning a pretrained checkpoint, not lmforge's from-scratch defaults: AdamW with a small learning rate
(5e-5), no weight decay, a linear decay to zero after a warm-up of :data:`WARMUP_FRACTION` of the steps
(when the length is known). Norms and biases never get weight decay anyway
(:func:`lmforge.train.optim.decay_groups`). A config file or ``--section.field`` flag overrides each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.config import LmforgeError, RunConfig, TrainConfig, apply_overrides, load_yaml
from lmforge.data.tasks import TaskData, pad_id_of
from lmforge.models.base import LanguageModel
from lmforge.runs import write_task_file
from lmforge.train.callbacks import TrainResult
from lmforge.train.loop import train

PRETRAINED_START: dict[str, dict[str, Any]] = {
    "optim": {"name": "adamw", "lr": 5e-5, "weight_decay": 0.0},
    "schedule": {"name": "linear"},
}
"""The ``optim``/``schedule`` defaults of a fine-tune from pretrained weights (Hugging Face Trainer's)."""
WARMUP_FRACTION = 0.06
"""Warm-up steps as a fraction of the schedule's length, unless ``schedule.warmup_steps`` is given."""


class FinetuneError(LmforgeError, ValueError):
    """A fine-tune that cannot be configured as asked (one line naming the section or field)."""


def finetune_config(model_cfg: RunConfig, config_file: str | None, overrides: list[str], data: str) -> dict[str, Any]:
    """The raw (unvalidated) config of a fine-tune: the model's own ``model``/``tokenizer`` sections and
    ``data.block_size``; :data:`PRETRAINED_START` under the user's ``data``/``optim``/``schedule``/``train``."""
    base = model_cfg.to_dict()
    raw: dict[str, Any] = {
        "model": base["model"],
        "tokenizer": base["tokenizer"],
        "data": {"block_size": base["data"]["block_size"], "path": data},
        **{k: dict(v) for k, v in PRETRAINED_START.items()},
    }
    if config_file:
        for section, values in load_yaml(config_file).items():
            raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    raw = apply_overrides(raw, ["--data.path", data, *overrides])
    for section in ("model", "tokenizer"):
        if raw.get(section) != base[section]:
            changed = sorted(
                k
                for k in set(raw.get(section) or {}) | set(base[section])
                if (raw.get(section) or {}).get(k) != base[section].get(k)
            )
            raise FinetuneError(
                f"finetune keeps the model's own {section} section; cannot change "
                f"{', '.join(f'{section}.{k}' for k in changed)}"
            )
    return raw


def set_schedule_length(raw: dict[str, Any], units: int) -> int | None:
    """With ``train.max_steps: null`` and ``train.max_epochs``: ``schedule.total_steps`` from the data
    (``ceil(max_epochs * units / (batch_size * grad_accum))``), and a warm-up of :data:`WARMUP_FRACTION` of it
    unless ``schedule.warmup_steps`` is set. Returns the steps (None when the length is not derived)."""
    tr, sch = raw.setdefault("train", {}), raw.setdefault("schedule", {})
    if "max_steps" not in tr or tr["max_steps"] is not None or sch.get("total_steps") or not tr.get("max_epochs"):
        return None
    defaults = TrainConfig.model_validate({})
    per_step = int(tr.get("batch_size", defaults.batch_size)) * int(tr.get("grad_accum", defaults.grad_accum))
    sch["total_steps"] = max(1, math.ceil(float(tr["max_epochs"]) * units / per_step))
    if "warmup_steps" not in sch:
        sch["warmup_steps"] = int(WARMUP_FRACTION * sch["total_steps"])
    return int(sch["total_steps"])


def train_on_task(
    cfg: RunConfig,
    out: Path,
    model: LanguageModel,
    tokenizer: Any,
    td: TaskData,
    info: dict[str, Any],
    *,
    verbose: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` on the examples of ``td`` into ``out`` (loss on the completions only); ``info``
    (task, fields, labels) goes to ``out/task.json`` for ``lmforge eval``."""
    tc = cfg.train
    pad = pad_id_of(tokenizer)
    write_task_file(out, info)
    return train(
        cfg,
        out,
        model=model,
        tokenizer=tokenizer,
        sampler=td.sampler(tc.batch_size, pad, tc.seed),
        val_batches=td.val_batches(tc.batch_size, pad, tc.eval_batches),
        verbose=verbose,
    )


def describe_task_data(td: TaskData, block_size: int, log: Callable[[str], None]) -> None:
    s = td.stats
    log(
        f"task {td.task.name}: {s['train_examples']} training / {s['val_examples']} validation examples"
        + (" (validation = training; set data.val_fraction or data.val_path)" if s["val_is_train"] else "")
        + (
            f"; {s['truncated_prompts']} prompts and {s['truncated_completions']} completions truncated "
            f"to data.block_size {block_size}"
            if s["truncated_prompts"] or s["truncated_completions"]
            else ""
        )
    )


def pretrain_lm(cfg: RunConfig, out: Path) -> TrainResult:
    """Train a language model of ``cfg`` from scratch on its ``data.path`` (quietly), into ``out``."""
    return train(cfg, out, verbose=False)
