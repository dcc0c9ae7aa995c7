"""Search throughput with 1 and with 2 worker processes (``lmforge worker``) on one shared study.

The same small search both times: a fixed tiny transformer, only the learning rate searched (so every trial
costs the same), ``--trials`` trials of ``--steps`` optimizer steps, no pruning, one torch thread per worker.
The storage is a journal file (default) or a PostgreSQL/Redis URL (a fresh study each run, deleted after).
Rounds alternate 1 and 2 workers so that machine noise hits both alike. Two rates per run: trials per
minute of wall clock from starting the processes (start-up included), and while trials ran (first trial
start to last trial end, from the study's timestamps).

    python benchmarks/scale_workers.py [--trials 16] [--steps 300] [--rounds 2] [--storage postgresql://...]

Prints a table, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from optuna.trial import TrialState

from lmforge.config import apply_overrides
from lmforge.search.budget import Fidelity
from lmforge.search.context import CONTEXT_ATTR, SearchContext, prepare_search_data
from lmforge.search.space import parse_space
from lmforge.search.study import create_or_load, open_storage

BASE = ["--data.block_size", "32", "--train.batch_size", "8", "--model.family", "transformer"]
BASE += ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2"]
TPS = 8 * 32
SPACE = {"params": {"optim.lr": {"float": [1.0e-3, 1.0e-2], "log": True}}}


def write_corpus(path: Path, n_docs: int = 400) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house while small bird sang over green hill".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))}) + "\n")
    return path


def run_once(storage: str | None, workers: int, trials: int, steps: int, tmp: Path) -> dict:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    work = tmp / name
    work.mkdir()
    url = storage or str(work / "study.journal")
    if url.startswith("redis") and "prefix=" not in url:
        url += ("&" if "?" in url else "?") + f"prefix={name}"
    base = apply_overrides({}, ["--data.path", str(tmp / "corpus.jsonl"), *BASE])
    eval_steps = max(1, steps // 4)
    fid = Fidelity(min_tokens=eval_steps * TPS, max_tokens=steps * TPS, eta=3, rungs=1, tokens_per_step=TPS)
    ctx = SearchContext(
        run_dir=str(work),
        base_config=base,
        space=parse_space(SPACE, source="benchmark").to_spec(),
        fidelity=fid.to_dict(),
        sampler="random",
        pruner="none",
        parallel=True,
        n_trials=trials,
        disk_cap=None,
    )
    study = create_or_load(open_storage(url), name, 1)
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "lmforge", "worker", "--storage", url, "--study", name]
        cmd += ["--threads", "1", "--worker-id", str(i)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    for proc, log in zip(procs, logs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode}):\n{log[-2000:]}")
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    busy = (end - start).total_seconds()
    if storage and storage.startswith("postgres"):
        import optuna

        optuna.delete_study(study_name=name, storage=open_storage(url))
    elif url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url.split("?")[0])
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    return {
        "workers": workers,
        "trials": len(done),
        "wall_s": wall,
        "busy_s": busy,
        "per_min_wall": 60 * len(done) / wall,
        "per_min_busy": 60 * len(done) / busy,
        "pids": len({t.user_attrs.get("pid") for t in done}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per trial")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--storage", help="postgresql://... or redis://... (default: a journal file)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ.setdefault("LMFORGE_CACHE", str(tmp / "cache"))
        write_corpus(tmp / "corpus.jsonl")
        prepare_search_data(apply_overrides({}, ["--data.path", str(tmp / "corpus.jsonl"), *BASE]))  # cache it
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for n in (1, 2):
                runs[n].append(run_once(args.storage, n, args.trials, args.steps, tmp))

    storage = "journal file" if not args.storage else args.storage.split("://")[0]
    print(f"{args.trials} trials x {args.steps} steps, storage: {storage}, {os.cpu_count()} CPUs, {args.rounds} rounds")
    print(
        f"{'workers':>8} {'trials':>7} {'wall s':>8} {'busy s':>8} {'trials/min (wall)':>18} {'trials/min (busy)':>18}"
    )
    med: dict[int, dict[str, float]] = {}
    for n, rs in runs.items():
        med[n] = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "busy_s", "per_min_wall", "per_min_busy")}
        m = med[n]
        trials = rs[0]["trials"]
        print(
            f"{n:>8} {trials:>7} {m['wall_s']:>8.1f} {m['busy_s']:>8.1f} "
            f"{m['per_min_wall']:>18.1f} {m['per_min_busy']:>18.1f}"
        )
    speedup_wall = med[2]["per_min_wall"] / med[1]["per_min_wall"]
    speedup_busy = med[2]["per_min_busy"] / med[1]["per_min_busy"]
    print(f"2 workers / 1 worker: x{speedup_wall:.2f} (wall), x{speedup_busy:.2f} (while trials ran)")
    result = {
        "benchmark": "scale_workers",
        "storage": storage,
        "trials": args.trials,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "trials_per_min_1": round(med[1]["per_min_wall"], 2),
        "trials_per_min_2": round(med[2]["per_min_wall"], 2),
        "trials_per_min_busy_1": round(med[1]["per_min_busy"], 2),
        "trials_per_min_busy_2": round(med[2]["per_min_busy"], 2),
        "speedup_wall": round(speedup_wall, 3),
        "speedup_busy": round(speedup_busy, 3),
        "all_trials_complete": all(r["trials"] == args.trials for rs in runs.values() for r in rs),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
