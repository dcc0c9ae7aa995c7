"""Trial overhead: how much of a search's time is optimizer steps, and what the search gets done per minute.

1. ``lmforge tune --budget 3m`` on Tiny Shakespeare with this tree: the trials' wall time by phase, as the
   trials recorded it (``phases`` and ``duration_s`` in the study; :mod:`lmforge.report.overhead`), and the
   share that is optimizer steps (goal >= 95%). With ``--base``, the same search of the base tree runs at
   the same time (side by side), and both tables are printed.
2. ``make demo``'s search (``lmforge tune --data demo --budget 3m``), before (``--base``: the ``src`` folder
   of another checkout, e.g. ``git worktree add /tmp/perf-base 9b05ad3``) and after (this tree), same seed,
   run side by side (at the same time, so that machine load hits both alike): trials per minute of the
   search step and the final model's test loss.

    python benchmarks/trial_overhead.py [--budget 3m] [--seed 0] [--base /tmp/perf-base/src] [--data PATH]
                                        [--no-demo]

Prints the tables, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lmforge.report.overhead import overhead, overhead_text
from lmforge.report.run import load_run

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _data_path(given: str | None) -> Path:
    candidates = [Path(given)] if given else [ROOT.parent / "shared/data/tinyshakespeare.txt",
                                              ROOT.parent.parent / "shared/data/tinyshakespeare.txt"]
    for p in candidates:
        if p.is_file():
            return p
    sys.exit(f"Tiny Shakespeare not found (tried {', '.join(map(str, candidates))}); pass --data")


def tune(src: Path, data: str, out: Path, budget: str, seed: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "lmforge", "tune", "--data", data, "--out", str(out), "--budget", budget,
           "--seed", str(seed), "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "wb"))


def outcome(out: Path) -> dict[str, Any]:
    """Trials finished per minute of the search step, and the final model's test loss."""
    state = json.loads((out / "pipeline.json").read_text())
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    run = load_run(out)
    done = [t for t in run.trials if t.state.name in ("COMPLETE", "PRUNED")]
    search_min = float(state["spent_s"].get("search", 0.0)) / 60
    best = summary.get("best") or {}
    return {"trials": len(done), "search_min": round(search_min, 2),
            "trials_per_min": round(len(done) / search_min, 2) if search_min > 0 else None,
            "test_loss": best.get("test_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="3m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", help="src folder of the 'before' checkout (skip part 2 without it)")
    ap.add_argument("--data", help="Tiny Shakespeare (default: ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--work", help="where the runs go (default: a new temporary folder)")
    ap.add_argument("--no-demo", action="store_true", help="skip part 2 (make demo's search)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-trial-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"bench": "trial_overhead", "budget": args.budget, "seed": args.seed}

    data = str(_data_path(args.data))
    sides = {"after": (SRC, work / "tinyshakespeare")}
    if args.base:
        sides["before"] = (Path(args.base), work / "tinyshakespeare-before")
    procs = {k: tune(src, data, out, args.budget, args.seed) for k, (src, out) in sides.items()}
    codes = {k: p.wait() for k, p in procs.items()}
    for k in ("before", "after"):
        if k not in sides:
            continue
        ov = overhead(load_run(sides[k][1]))
        print(f"== 1. lmforge tune --budget {args.budget} on Tiny Shakespeare, {k} (exit {codes[k]}): "
              "where the time went ==")
        if ov is None:
            print("no trial recorded phases")
            continue
        print(overhead_text(ov))
        prefix = "" if k == "after" else "before_"
        result[f"{prefix}optimizer_step_share"] = round(ov.train_share, 4)
        result[f"{prefix}trials"] = ov.trials
        result[f"{prefix}phases_s"] = {name: round(s, 2) for name, s in ov.rows}

    if args.base and not args.no_demo:
        print(f"\n== 2. make demo's search (--budget {args.budget}, seed {args.seed}): before and after, side by side ==")
        runs = {"before": (Path(args.base), work / "demo-before"), "after": (SRC, work / "demo-after")}
        procs = {k: tune(src, "demo", out, args.budget, args.seed) for k, (src, out) in runs.items()}
        codes = {k: p.wait() for k, p in procs.items()}
        print(f"{'side':<8} {'exit':>4} {'trials':>7} {'search min':>11} {'trials/min':>11} {'test loss':>10}")
        for k, (_, out) in runs.items():
            o = outcome(out)
            result[f"demo_{k}"] = o
            print(f"{k:<8} {codes[k]:>4} {o['trials']:>7} {o['search_min']:>11} {o['trials_per_min']!s:>11} "
                  f"{o['test_loss']!s:>10}")
    print(f"(runs in {work})")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
