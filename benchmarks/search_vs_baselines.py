"""Search strategies at equal wall-clock budget on Tiny Shakespeare (character level, 90/10 split).

In one run, on one machine, with the same search space (``benchmarks/search_space.yaml``) and the same
budget per run, for several seeds each:

- ``lmforge``: ``lmforge tune`` with its defaults (TPE + ASHA on trained tokens, promoted trials continue
  from their own checkpoints, then the best continues to convergence);
- ``grid``: Optuna's GridSampler over the space's grid values, every trial trained from scratch;
- ``random``: Optuna's RandomSampler, every trial trained from scratch;
- ``tpe_median``: Optuna's TPESampler with its MedianPruner, every trial trained from scratch.

Every run's best model is scored on the same whole validation split. Reported: best validation loss at the
budget (mean and spread over seeds) and the time each strategy needed to reach the loss that ``tpe_median``
reaches at the end. Then the recipe check: with a budget equal to the wall time of nanoGPT's CPU recipe
(``benchmarks/recipe_nanogpt.py``) measured in this run, ``lmforge tune`` should reach val loss <= 1.70.

    python benchmarks/search_vs_baselines.py [--budget 120] [--seeds 3] [--skip-recipe]

Prints tables, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BASE = [
    "--tokenizer.kind", "char", "--data.block_size", "64", "--data.val_fraction", "0.1",
    "--train.batch_size", "12", "--train.eval_batches", "10",
    "--optim.name", "adamw", "--optim.beta2", "0.99", "--schedule.name", "cosine",
]


def full_val_loss(model_dir: Path, data_path: str) -> float:
    """Loss of a checkpoint over the whole 10% validation split (the same for every strategy)."""
    from lmforge.data import eval_batches, prepare_data
    from lmforge.runs import load_model
    from lmforge.train.loop import evaluate_loss

    model, tok, cfg = load_model(model_dir)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": data_path, "val_fraction": 0.1})})
    data = prepare_data(cfg, tok)
    block = cfg.data.block_size
    n_blocks = max(1, (len(data.val) - 1) // block)
    batches = eval_batches(data.val, block, 64, math.ceil(n_blocks / 64))
    return evaluate_loss(model, batches, torch.device("cpu"))[0]


# ------------------------------------------------------------------------------------ baselines
def run_baseline(kind: str, seed: int, budget_s: float, data_path: str, out: Path, trial_steps: int) -> dict[str, Any]:
    """Optuna + lmforge's training loop, every trial trained from scratch, until the budget is spent."""
    import optuna

    from lmforge.config import load_config
    from lmforge.data import prepare_data
    from lmforge.search.space import apply_values, load_space, repair_config
    from lmforge.train.loop import Callback, TrainingError, train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(str(HERE / "search_space.yaml"))
    if kind == "tpe_median":
        sampler = optuna.samplers.TPESampler(seed=seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    else:  # grid: the space's grid points in a seeded order, enqueued; random: RandomSampler
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    grid = space.grid() if kind == "grid" else []
    if grid:
        import random

        random.Random(seed).shuffle(grid)
        for params in grid:
            study.enqueue_trial(params)
    base_cfg = load_config(overrides=["--data.path", data_path, *BASE, "--train.progress", "false", "--train.max_steps", str(trial_steps),
                                      "--train.eval_interval", str(max(1, trial_steps // 5))])
    data = prepare_data(base_cfg)
    t0, t_start = time.perf_counter(), time.time()
    best: tuple[float, Path | None] = (math.inf, None)

    class Report(Callback):
        def __init__(self, trial: Any) -> None:
            self.trial = trial

        def on_eval(self, state: Any, record: dict[str, Any]) -> bool:
            self.trial.report(record["val_loss"], state.step)
            return bool(self.trial.should_prune()) or time.perf_counter() - t0 > budget_s

    n = 0
    while time.perf_counter() - t0 < budget_s:
        trial = study.ask()
        values = space.suggest(trial)
        raw = apply_values(base_cfg.to_dict(), values)
        repair_config(raw)
        raw["train"]["max_time"] = max(1.0, budget_s - (time.perf_counter() - t0))
        tdir = out / f"trial-{n:04d}"
        n += 1
        try:
            from lmforge.config import build_config

            cfg = build_config(raw)
            res = train(cfg, tdir, data=data, callbacks=[Report(trial)], verbose=False)
        except (TrainingError, ValueError) as err:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"  {kind} trial {n} failed: {err}", file=sys.stderr)
            continue
        if res.stop_reason == "callback" and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, res.best_val_loss)
        if res.best_val_loss < best[0] and (tdir / "best").exists():
            best = (res.best_val_loss, tdir / "best")
        if kind == "grid" and n >= len(grid):
            break
    return {"best_dir": best[1], "trials": n, "history": best_so_far(out, t_start), "elapsed": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------- lmforge
def run_lmforge(seed: int, budget_s: float, data_path: str, out: Path, space: str | None) -> dict[str, Any]:
    from lmforge.search.pipeline import TuneOptions, run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    t0, t_start = time.perf_counter(), time.time()
    opts = TuneOptions(out=str(out), data=data_path, budget=f"{int(budget_s)}s", space=space, seed=seed,
                       overrides=list(BASE), verbose=False)
    summary = run_pipeline(opts)
    elapsed = time.perf_counter() - t0
    n_trials = len(list(out.glob("trials/*")))
    return {"best_dir": out / "best", "trials": n_trials, "history": best_so_far(out, t_start),
            "elapsed": elapsed, "summary": summary}


def best_so_far(out: Path, t_start: float) -> list[tuple[float, float]]:
    """(seconds since the run started, best validation loss so far) over every evaluation of the run (each
    metrics.jsonl record carries its wall-clock time)."""
    recs = []
    for m in out.rglob("metrics.jsonl"):
        for line in m.read_text().splitlines():
            r = json.loads(line)
            recs.append((r["time"] - t_start, r["val_loss"]))
    best, hist = math.inf, []
    for t, v in sorted(recs):
        if v < best:
            best = v
            hist.append((t, v))
    return hist


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    from recipe_nanogpt import default_data, run_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--budget", type=float, default=120.0, help="seconds per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trial-steps", type=int, default=300, help="steps of a baseline trial")
    ap.add_argument("--out", default="runs/bench-search")
    ap.add_argument("--skip-recipe", action="store_true")
    ap.add_argument("--recipe-seeds", type=int, default=3, help="seeds of lmforge tune at the recipe's wall time")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    space = str(HERE / "search_space.yaml")

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in ("lmforge", "grid", "random", "tpe_median")}
    for seed in range(args.seeds):
        for kind in results:
            out = root / f"{kind}-{seed}"
            print(f"[{time.strftime('%H:%M:%S')}] {kind} seed {seed} ({args.budget:.0f}s)", file=sys.stderr)
            if kind == "lmforge":
                r = run_lmforge(seed, args.budget, args.data, out, space)
            else:
                r = run_baseline(kind, seed, args.budget, args.data, out, args.trial_steps)
            r["val_loss"] = full_val_loss(r["best_dir"], args.data) if r["best_dir"] else math.inf
            results[kind].append(r)

    target = statistics.mean(r["val_loss"] for r in results["tpe_median"])

    def time_to(r: dict[str, Any]) -> float | None:
        return next((t for t, v in r["history"] if v <= target), None)

    print(f"\nsame space, {args.budget:.0f}s per run, {args.seeds} seeds; val loss over the whole 10% split")
    print(f"{'strategy':<12} {'mean':>8} {'std':>7} {'min':>8} {'max':>8} {'trials':>7}  time to reach {target:.4f}")
    table = {}
    for kind, rs in results.items():
        losses = [r["val_loss"] for r in rs]
        times = [time_to(r) for r in rs]
        reached = [t for t in times if t is not None]
        ttr = f"{statistics.mean(reached):.0f}s ({len(reached)}/{len(rs)} runs)" if reached else "not reached"
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"{kind:<12} {statistics.mean(losses):>8.4f} {sd:>7.4f} {min(losses):>8.4f} {max(losses):>8.4f} "
              f"{statistics.mean([r['trials'] or 0 for r in rs]):>7.1f}  {ttr}")
        table[kind] = {"mean": round(statistics.mean(losses), 4), "std": round(sd, 4), "losses": losses,
                       "time_to_target": times}

    recipe = tune = None
    if not args.skip_recipe:
        print(f"[{time.strftime('%H:%M:%S')}] nanoGPT recipe", file=sys.stderr)
        recipe = run_recipe(args.data, str(root / "recipe"), verbose=False)
        print(f"[{time.strftime('%H:%M:%S')}] lmforge tune with the recipe's wall time "
              f"({recipe['wall_s']:.0f}s)", file=sys.stderr)
        runs = []
        for seed in range(args.recipe_seeds):
            t = run_lmforge(seed, recipe["wall_s"], args.data, root / f"tune-recipe-budget-{seed}", None)
            runs.append({"seed": seed, "val_loss": full_val_loss(t["best_dir"], args.data), "wall_s": t["elapsed"],
                         "best": t["summary"].get("best", {}).get("values")})
        losses = [r["val_loss"] for r in runs]
        tune = {"runs": runs, "mean": statistics.mean(losses), "max": max(losses), "pass": max(losses) <= 1.70}
        print(f"\n{'run':<40} {'val loss':>9} {'wall s':>8}")
        print(f"{'nanoGPT recipe (lmforge train)':<40} {recipe['val_loss_full']:>9.4f} {recipe['wall_s']:>8.1f}")
        for r in runs:
            print(f"{'lmforge tune, same wall time, seed ' + str(r['seed']):<40} {r['val_loss']:>9.4f} {r['wall_s']:>8.1f}")
        print(f"goal <= 1.70 in every seed: {'PASS' if tune['pass'] else 'FAIL'} (mean {tune['mean']:.4f})")
    print("RESULT " + json.dumps({"bench": "search_vs_baselines", "budget_s": args.budget, "seeds": args.seeds,
                                  "target_loss": round(target, 4), "strategies": table,
                                  "recipe": recipe, "tune_at_recipe_time": tune}, default=str))


if __name__ == "__main__":
    main()
