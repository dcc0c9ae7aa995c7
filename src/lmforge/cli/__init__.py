"""The ``lmforge`` command line (layer 7). Each sub-command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from lmforge.config import LmforgeError, RunConfig, load_config

COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {}


class UserError(LmforgeError):
    """Anything the user can fix; printed as one line, exit status 2."""


def command(name: str) -> Callable[[Callable[[argparse.Namespace, list[str]], int]], Callable[..., int]]:
    def deco(fn: Callable[[argparse.Namespace, list[str]], int]) -> Callable[..., int]:
        COMMANDS[name] = fn
        return fn

    return deco


def config_from_args(args: argparse.Namespace, overrides: list[str], base: dict[str, Any] | None = None) -> RunConfig:
    """The run config of ``--config`` plus ``--section.field`` overrides (``--data`` is ``data.path``)."""
    extra = list(overrides)
    if getattr(args, "data", None):
        extra = ["--data.path", args.data, *extra]
    return load_config(args.config, extra, base=base)


def print_sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> None:
    """Print a sampled continuation of ``prompt`` from the model in ``model_dir`` (``train``/``finetune --sample``).

    Its imports are lazy like a command handler's: it runs only inside one, and at module level they would
    load torch for every ``lmforge`` invocation, ``--help`` included."""
    from lmforge.models.base import LanguageModel
    from lmforge.predict import GenerationConfig, generate_text
    from lmforge.runs import load_model

    loaded, tokenizer, _ = load_model(model_dir)
    model = cast(LanguageModel, loaded)  # a run directory always holds one of lmforge's models
    if model.max_seq_len is not None:  # the sample must fit in the model's context with its prompt
        max_new_tokens = min(max_new_tokens, model.max_seq_len - len(tokenizer.encode(prompt)))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50, seed=seed)
    text = generate_text(model, tokenizer, [prompt], gen)[0][0]
    print(f"\n--- sample from {model_dir} ---\n{prompt}{text}\n---")


# Each module adds its sub-command parser in ``add_parser(sub)`` and registers its handler with
# ``@command(name)``; a module imports heavy dependencies only inside its handler.
COMMAND_MODULES = ["train", "generate", "finetune", "evaluate", "export", "tune", "report", "worker", "serve"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Train, search and use language models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"lmforge.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"lmforge.cli.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and "." not in a.split("=", 1)[0]]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        return COMMANDS[args.command](args, rest)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
