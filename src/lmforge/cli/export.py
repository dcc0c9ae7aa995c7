"""``lmforge export MODEL --out DIR``: write a Hugging Face directory (or, for families transformers has no
class for, an lmforge checkpoint with a README saying so)."""

from __future__ import annotations

import argparse

from lmforge.cli import UserError, command


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="export a model as a Hugging Face directory",
        description="Export MODEL (an lmforge run or checkpoint directory) to DIR: GPT-2- or "
        "Llama-format Hugging Face files for transformers that map exactly; model "
        "weights plus lmforge config files for lstm/gru/rcnn.",
    )
    e.add_argument("model", metavar="MODEL", help="run dir (uses best/) or checkpoint dir")
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument("--force", action="store_true", help="replace DIR if it exists")
    e.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast the weights (default: as trained)",
    )


@command("export")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.export import export_model

    if overrides:
        raise UserError(f"unexpected arguments: {' '.join(overrides)}")
    result = export_model(args.model, args.out, overwrite=args.force, dtype=args.dtype)
    print(result.message)
    if not result.transformers_loadable:
        print("note: Hugging Face transformers has no model class for this family; see README.md in the export")
    return 0
