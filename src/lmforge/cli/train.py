"""``lmforge train``: a corpus -> a trained, checkpointed model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli import UserError, command, config_from_args, print_sample


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a language model on a corpus",
                       description="Train a model. Any config field can be overridden as --section.field VALUE "
                                   "(e.g. --model.n_layer 4 --optim.lr 3e-3).")
    t.add_argument("--data", help="text file, folder, glob, .jsonl, hf:NAME[:CONFIG] or demo")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--config", help="YAML file with sections data/tokenizer/model/optim/schedule/train")
    t.add_argument("--sample", type=int, default=200, help="print a sample of N tokens from the best model (0: none)")
    t.add_argument("--prompt", default="\n", help="prompt of the sample")


@command("train")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.train.loop import train

    cfg = config_from_args(args, overrides)
    if not cfg.data.path:
        raise UserError("no data: pass --data PATH|demo|hf:NAME")
    result = train(cfg, args.out)
    if args.sample > 0 and (Path(args.out) / "best").exists():
        print_sample(Path(args.out) / "best", args.prompt, args.sample, cfg.train.seed)
    return 0 if result.step > 0 else 1
