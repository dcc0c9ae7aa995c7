"""The ``lmforge`` command line (layer 7). Each sub-command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

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


ALIASES = {"--data": "data.path"}
"""Command options that set a config field (``train``, ``finetune``, ``tune``, ``worker``)."""


def refuse_repeated_options(argv: list[str], args: argparse.Namespace) -> None:
    """Raise :class:`UserError` naming both values when an option or a ``--section.field`` override is given
    twice, or an option and the override of the same field (``--data X --data.path Y``): "last one wins"
    would silently drop one of two things the user asked for. Options that collect a list
    (``action="append"``) may repeat."""
    seen: dict[str, tuple[str, str]] = {}  # option or dotted field -> (as given, value)
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if not tok.startswith("--"):
            continue
        name, eq, inline = tok.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if "." in name:
            key = name[2:]
        else:
            dest = name[2:].replace("-", "_")
            if not hasattr(args, dest) or isinstance(getattr(args, dest), list):
                continue
            key = ALIASES.get(name, name) if hasattr(args, "config") else name
        if key in seen:
            first, first_value = seen[key]
            if first == name:
                raise UserError(f"{name} is given twice ({first_value!r} and {value!r}); give it once")
            raise UserError(f"{first} {first_value} and {name} {value} both set {key.lstrip('-')}; give one of them")
        seen[key] = (name, value)


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
        refuse_repeated_options(argv, args)
        return COMMANDS[args.command](args, rest)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
