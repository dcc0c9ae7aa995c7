"""``lmforge worker``: join a running ``lmforge tune`` study from this machine and run its trials."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from lmforge.cli import UserError, command

EPILOG = """\
The study carries the search (data, space, budget, run directory): a worker needs only the storage and the
study name. Every machine must read the data and write the run directory at the same path (a shared
filesystem), or be told where they are mounted here (--data, --run-dir).

examples:
  # machine A: the driver (creates the study, runs 2 workers, then trains and evaluates the best model)
  lmforge tune --data /shared/corpus.txt --out /shared/runs/t1 --budget 2h --n-jobs 2 \\
      --storage postgresql://lmforge@db-host/lmforge --study-name t1
  # machines B, C, ...: more workers on the same study
  lmforge worker --storage postgresql://lmforge@db-host/lmforge --study t1
A worker that dies (kill -9, lost machine) stops beating; after the grace period another worker fails its
trial and runs it again from its last checkpoint (LMFORGE_HEARTBEAT_S, LMFORGE_GRACE_S; default 30s, 120s).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "worker",
        help="join a running lmforge tune study (shared storage) and run its trials",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument(
        "--storage", required=True, help="the study's storage: postgresql://..., redis://..., a journal file"
    )
    w.add_argument(
        "--study", required=True, help="the study name (lmforge tune --study-name; default: the name of DIR)"
    )
    w.add_argument("--run-dir", help="where the tune run directory is mounted on this machine (default: as stored)")
    w.add_argument("--data", help="where the training data is on this machine (default: as stored)")
    w.add_argument("--max-trials", type=int, help="leave after this many trials")
    w.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    w.add_argument("--worker-id", type=int, default=0, help="offsets the sampler's seed (give each worker its own)")
    w.add_argument("--no-wait", action="store_true", help="leave when no new trial can start, not when none runs")
    w.add_argument("--verbose", action="store_true", help="print the training progress of each trial")


@command("worker")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.search.context import load_context, prepare_search_data
    from lmforge.search.study import load, open_storage
    from lmforge.search.worker import run_worker, search_done

    if overrides:
        raise UserError(f"lmforge worker takes no config overrides ({' '.join(overrides)}): the study fixes them")
    if args.max_trials is not None and args.max_trials < 1:
        raise UserError(f"--max-trials {args.max_trials}: must be at least 1")
    if args.threads > 0:
        from lmforge.train.threads import set_threads

        set_threads(args.threads)
    storage = open_storage(args.storage)
    ctx = load_context(load(storage, args.study))
    run_dir = os.path.abspath(args.run_dir) if args.run_dir else ctx.run_dir
    if not os.path.isdir(run_dir):
        raise UserError(
            f"run directory {run_dir} (from study {args.study!r}) does not exist on this machine: mount the "
            "shared filesystem at that path or pass --run-dir"
        )
    base = ctx.base_config
    if args.data:
        base = {**base, "data": {**(base.get("data") or {}), "path": args.data}}
    ident = f"{socket.gethostname()}:{os.getpid()}"
    print(f"worker {ident}: study {args.study!r} in {args.storage}, run directory {run_dir}", file=sys.stderr)
    data = prepare_search_data(base, ctx.cv, ctx.seed)
    n = run_worker(
        args.study,
        storage,
        worker_id=args.worker_id,
        data=data,
        verbose=args.verbose,
        max_trials=args.max_trials,
        run_dir=run_dir,
        wait=not args.no_wait,
    )
    study = load(storage, args.study)
    why = search_done(study, load_context(study)) or "--max-trials reached"
    print(f"worker {ident}: {n} trial(s) run; {why}", file=sys.stderr)
    return 0
