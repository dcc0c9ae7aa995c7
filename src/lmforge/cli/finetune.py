"""``lmforge finetune``: continue training a model (lmforge or Hugging Face) on a corpus or a task.

The model keeps its own architecture and tokenizer (``model``/``tokenizer`` sections cannot be changed);
``data``, ``optim``, ``schedule`` and ``train`` come from ``--config`` and ``--section.field`` overrides,
as for ``lmforge train``, and the run goes through the same training loop and run-directory layout.

- ``--task lm`` (the default, e.g. ``--data train.txt``): causal language modelling on the normal data path.
- ``--task summarization|translation|classification|semantic-parsing|generation|chat``: records from
  JSONL/JSON/CSV; loss on the completion only (see :mod:`lmforge.data.tasks`). ``OUT/task.json`` records
  the task, its field mapping and (classification) the label set, for ``lmforge eval``.

Optimizer and schedule start from the pretrained-start defaults of :mod:`lmforge.search.finetune` (AdamW,
lr 5e-5, no weight decay, linear decay after a 6% warm-up), as a Hugging Face Trainer user expects; the
config file and flags override them.

When ``train.max_steps`` is null and ``train.max_epochs`` is set, the schedule's length
(``schedule.total_steps``) is derived from the data: ``ceil(max_epochs * units / (batch_size * grad_accum))``
with units = blocks (lm) or examples (tasks).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.cli import UserError, command
from lmforge.config import TASK_NAMES, build_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a corpus or a task (summarization, translation, ...)",
        description="Fine-tune MODEL (an lmforge run/checkpoint or a Hugging Face directory) on --data. "
        "Override data/optim/schedule/train fields as --section.field VALUE, e.g. "
        "--data.block_size 128 --train.max_epochs 3 --train.max_steps null --optim.lr 1e-4.",
    )
    p.add_argument("--model", required=True, help="lmforge run/checkpoint directory or Hugging Face model directory")
    p.add_argument(
        "--data", required=True, help="training data: a text corpus (lm) or task records (.jsonl/.json/.csv)"
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--task", default="lm", choices=TASK_NAMES, help="what to learn (default: lm)")
    p.add_argument(
        "--fields",
        default=None,
        help="field names of the task records as ROLE=FIELD pairs, e.g. document=article,summary=highlights",
    )
    p.add_argument(
        "--labels", default=None, help="classification: the label set, comma separated (default: from the data)"
    )
    p.add_argument("--config", help="YAML file with data/optim/schedule/train sections")
    p.add_argument("--sample", type=int, default=0, help="lm: print a sample of N tokens from the best model (0: none)")
    p.add_argument("--prompt", default="\n", help="lm: prompt of the sample")


@command("finetune")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.runs import claim_run_dir

    with claim_run_dir(args.out, "finetune") as out:
        return _finetune(args, overrides, out)


def _finetune(args: argparse.Namespace, overrides: list[str], out: Path) -> int:
    """The fine-tune itself, run while this process holds ``out``."""
    from lmforge.cli.sample import print_sample
    from lmforge.predict.loading import load_pretrained
    from lmforge.runs import write_task_file
    from lmforge.search.finetune import describe_task_data, finetune_config, set_schedule_length, train_on_task
    from lmforge.train.loop import train

    # an absolute path: checkpoints of a Hugging Face model record it (model.path) and must load from anywhere
    local = Path(args.model).expanduser()
    model, tokenizer, model_cfg = load_pretrained(local.resolve() if local.exists() else args.model)
    raw = finetune_config(model_cfg, args.config, overrides, args.data)
    data_cfg = build_config({k: raw[k] for k in ("data", "tokenizer", "model") if k in raw})

    if args.task == "lm":
        from lmforge.data import num_blocks, prepare_data

        if args.fields or args.labels:
            raise UserError("--fields and --labels are for task data, not --task lm")
        data = prepare_data(data_cfg, tokenizer)
        blocks = num_blocks(len(data.train), data_cfg.data.block_size)
        _schedule_note(set_schedule_length(raw, blocks), raw, blocks, "blocks")
        cfg = build_config(raw)
        write_task_file(out, {"task": "lm"})
        result = train(cfg, out, data=data, model=model, tokenizer=tokenizer)
        if args.sample > 0 and (out / "best").exists():
            print_sample(out / "best", args.prompt, args.sample, cfg.train.seed)
        return 0 if result.step > 0 else 1

    from lmforge.data.tasks import get_task, parse_fields, prepare_task_data

    td = prepare_task_data(data_cfg, args.task, tokenizer, args.fields)
    labels = td.labels
    if args.labels:
        given = [s.strip() for s in args.labels.split(",") if s.strip()]
        missing = sorted(set(labels or []) - set(given))
        if missing:
            raise UserError(f"--labels {args.labels}: the data also has the label(s) {missing}")
        labels = given
    describe_task_data(td, data_cfg.data.block_size, print)
    _schedule_note(set_schedule_length(raw, len(td.train)), raw, len(td.train), "examples")
    cfg = build_config(raw)
    fields = parse_fields(args.fields, get_task(args.task))
    info = {"task": args.task, "fields": fields, "labels": labels}
    result = train_on_task(cfg, out, model, tokenizer, td, info)
    return 0 if result.step > 0 else 1


def _schedule_note(steps: int | None, raw: dict[str, Any], units: int, what: str) -> None:
    if steps is not None:
        print(f"{units} {what} per epoch: {float(raw['train']['max_epochs']):g} epochs = {steps} steps")
