"""The ``lmforge`` command line (layer 6). Each sub-command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError

COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {}


class UserError(Exception):
    """Anything the user can fix; printed as one line, exit status 2."""


def command(name: str) -> Callable[[Callable[[argparse.Namespace, list[str]], int]], Callable[..., int]]:
    def deco(fn: Callable[[argparse.Namespace, list[str]], int]) -> Callable[..., int]:
        COMMANDS[name] = fn
        return fn

    return deco


def _config_from_args(args: argparse.Namespace, overrides: list[str], base: dict[str, Any] | None = None):
    from lmforge.config import load_config

    extra = list(overrides)
    if getattr(args, "data", None):
        extra = ["--data.path", args.data, *extra]
    return load_config(args.config, extra, base=base)


def _print_sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> None:
    from lmforge.predict import GenerationConfig, generate_text
    from lmforge.train.checkpoint import load_model

    model, tokenizer, _ = load_model(model_dir)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50, seed=seed)
    text = generate_text(model, tokenizer, [prompt], gen)[0][0]
    print(f"\n--- sample from {model_dir} ---\n{prompt}{text}\n---")


@command("train")
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.train.loop import train

    cfg = _config_from_args(args, overrides)
    if not cfg.data.path:
        raise UserError("no data: pass --data PATH|demo|hf:NAME")
    result = train(cfg, args.out)
    if args.sample > 0:
        _print_sample(Path(args.out) / "best", args.prompt, args.sample, cfg.train.seed)
    return 0 if result.step > 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Train, search and use language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a language model on a corpus",
                       description="Train a model. Any config field can be overridden as --section.field VALUE "
                                   "(e.g. --model.n_layer 4 --optim.lr 3e-3).")
    t.add_argument("--data", help="text file, folder, glob, .jsonl, hf:NAME[:CONFIG] or demo")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--config", help="YAML file with sections data/tokenizer/model/optim/schedule/train")
    t.add_argument("--sample", type=int, default=200, help="print a sample of N tokens from the best model (0: none)")
    t.add_argument("--prompt", default="\n", help="prompt of the sample")
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
    except (ConfigError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user-facing errors from lower layers carry their own clear message
        name = type(err).__name__
        if name in {"DataError", "TrainingError", "CheckpointError", "GenerationError", "ModelError"}:
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
