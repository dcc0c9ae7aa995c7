"""``lmforge report DIR``: (re)build the HTML report of an ``lmforge tune`` run (also of one still running)."""

from __future__ import annotations

import argparse

from lmforge.cli import UserError, command


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="build DIR/report.html of a search run (figures, leaderboard, a sample)",
        description="Write DIR/report.html with figures in DIR/figures/: optimization history, learning curves, "
        "parameter importances, Pareto front, parallel coordinates, the leaderboard and a text sample "
        "from the best model. Works on a run that is still going or was interrupted.",
    )
    r.add_argument("dir", metavar="DIR", help="the run directory of lmforge tune (--out)")
    r.add_argument("--no-sample", action="store_true", help="do not load the best model to sample text")
    r.add_argument("--sample-tokens", type=int, default=200, help="tokens of the sample (default 200)")
    r.add_argument("--seed", type=int, default=0, help="seed of the sample")


@command("report")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.report import build_report

    if overrides:
        raise UserError(f"lmforge report takes no config overrides, got {' '.join(overrides)}")
    if args.sample_tokens < 1:
        raise UserError(f"--sample-tokens {args.sample_tokens}: must be at least 1")
    path = build_report(args.dir, sample=not args.no_sample, sample_tokens=args.sample_tokens, seed=args.seed)
    print(path)
    return 0
