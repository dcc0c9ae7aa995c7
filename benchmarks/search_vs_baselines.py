"""Search strategies at equal wall-clock budget, each followed by the same final training and scored by the
same evaluator on the same held-out test split (issue #13).

For every corpus, budget and seed, in one process, one after the other:

- ``lmforge``: ``lmforge tune`` (curve-predicting ASHA, warmup-stable trials that continue when promoted, the
  final choice by predicted final loss re-scored on the whole validation split);
- ``random``: Optuna's RandomSampler, every trial trained to the trial length from scratch;
- ``tpe_hyperband``: Optuna's TPESampler with its HyperbandPruner on trained tokens;
- ``topk_1epoch``: the one-pass top-K baseline (arXiv 2307.15422): random configurations trained briefly
  for half the search time, then the best K=3 continue for the other half, the best of those is chosen;
- ``default``: one default configuration (no search) trained alone for the whole budget.

Same rules for all: the same search space (``benchmarks/search_space.yaml``), the same trial setup
(:func:`lmforge.search.context.trial_config`: warmup-stable trials, validation on the search's fixed
blocks), the search's share of the budget (the ledger's split, :class:`lmforge.search.budget.Ledger`), and
then THE SAME final step: :func:`lmforge.search.final.plan_final` + :func:`~lmforge.search.final.train_final`
continue the strategy's chosen trial for the final share and decay once. ``lmforge`` runs its own pipeline,
whose final step is those same functions (its start-up, data preparation and throughput measurement count
against its budget; the baselines' do not). Every strategy's final model is scored by
:func:`lmforge.search.evaluation.evaluate_best` on the test half of the validation documents, which no
strategy reads (the search and the final training read the other half).

Start points: ``lmforge`` searches the shared space plus the default space's start points of the families
the shared space has (``--lmforge-starts default``; derived by ``benchmarks/derive_priors.py`` on corpora no
benchmark uses, see ``local_corpora.py``), as ``lmforge tune`` does; ``--lmforge-starts none`` gives it the
bare shared space like the baselines. The baselines are the off-the-shelf methods, with no start points.

Corpora: ``ts`` (Tiny Shakespeare, ``../shared/data``), ``demo`` (the built-in corpus: standard-library
docstrings) and ``info`` (GNU Texinfo manuals shipped in /usr/share/info, GNU FDL; built by
``local_corpora.py``), or paths.

    python benchmarks/search_vs_baselines.py --corpora ts,demo,info --budget 90 --seeds 3
    python benchmarks/search_vs_baselines.py --merge LOG1 LOG2 ...   # one table and win table from several runs

Prints one table per corpus and budget (mean, spread, per-seed test losses), a win table, and a ``RESULT``
JSON line.
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
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import local_corpora  # noqa: E402

SPACE = HERE / "search_space.yaml"
CORPORA = {"ts": str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"), "demo": "demo"}
LOCAL = ("info",)
"""Corpora built from this machine's files by local_corpora.py (never one that derive_priors.py reads)."""
BASE = ["--tokenizer.kind", "char", "--data.block_size", "64", "--data.val_fraction", "0.1", "--train.batch_size", "12"]
STRATEGIES = ("lmforge", "random", "tpe_hyperband", "topk_1epoch", "default")
TOPK = 3


# ------------------------------------------------------------------------------------------- setup
class Setup:
    """Data, base config and budget split shared by every strategy of one (corpus, budget, seed)."""

    def __init__(self, data_path: str, budget_s: float, seed: int, root: Path) -> None:
        from lmforge.config import apply_overrides, build_config
        from lmforge.search.budget import Budget, Ledger
        from lmforge.search.context import prepare_search_data

        base = apply_overrides({}, ["--data.path", data_path, *BASE, "--train.seed", str(seed)])
        cfg = build_config(base)
        if Path(cfg.data.path).exists():
            base["data"]["path"] = str(Path(cfg.data.path).resolve())
        self.base = base
        self.seed = seed
        self.data = prepare_search_data(base, 0, seed)
        led = Ledger(Budget(seconds=budget_s))
        self.budget_s = budget_s
        self.search_s = budget_s * led.shares["search"]
        self.final_s = budget_s * led.shares["final"]
        self.root = root
        tps = cfg.train.batch_size * cfg.data.block_size
        # trial lengths for the baselines: about what lmforge's plan gives its longest trial on this machine
        self.trial_tokens = 48 * tps
        self.min_tokens = 6 * tps


def trial_cfg(setup: Setup, values: dict[str, Any], max_tokens: int, max_time: float) -> Any:
    from lmforge.search.budget import Fidelity
    from lmforge.search.context import trial_config

    tps = 12 * 64
    fid = Fidelity(min_tokens=setup.min_tokens, max_tokens=max_tokens, eta=3, rungs=2, tokens_per_step=tps)
    cfg, _ = trial_config(setup.base, values, fid, max(1.0, max_time))
    return cfg


def train_trial(setup: Setup, cfg: Any, out: Path, callbacks: list[Any] | None = None) -> Any:
    from lmforge.search.context import EVAL_BLOCKS, fixed_val_batches
    from lmforge.train.loop import train

    return train(
        cfg,
        out,
        data=setup.data.prepared,
        callbacks=callbacks or [],
        verbose=False,
        val_batches=fixed_val_batches(setup.data.prepared.val, cfg, EVAL_BLOCKS),
    )


def common_final(setup: Setup, src: Path, out: Path, allowance: float) -> Path:
    """The same final step for every baseline: continue ``src``'s last checkpoint for ``allowance`` s."""
    from lmforge.search.context import SearchContext
    from lmforge.search.final import plan_final, train_final

    plan = plan_final(src, 0, cv=0, allowance=allowance, budget_kind="time", reference_tokens_per_s=1e4)
    ctx = SearchContext(run_dir=str(out), base_config=setup.base, space={}, fidelity={})
    if plan["max_steps"] > plan["start_step"]:
        train_final(plan, src, out / "final", ctx, setup.data, False)
    best = out / "final" / "best"
    return best if (best / "COMPLETE").is_file() else src / "best"


def test_loss(setup: Setup, best: Path) -> float:
    from lmforge.search.evaluation import evaluate_best

    return float(evaluate_best(best, setup.data)["test_loss"])


# -------------------------------------------------------------------------------------- strategies
def optuna_search(setup: Setup, kind: str, out: Path) -> tuple[Path | None, int]:
    """random / tpe_hyperband: trials until the search share is spent; the lowest validation loss wins."""
    import optuna

    from lmforge.search.space import load_space
    from lmforge.train.loop import Callback

    space = load_space(str(SPACE))
    if kind == "random":
        sampler, pruner = optuna.samplers.RandomSampler(seed=setup.seed), optuna.pruners.NopPruner()
    else:
        sampler = optuna.samplers.TPESampler(seed=setup.seed, multivariate=True, group=True)
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=setup.min_tokens, max_resource=setup.trial_tokens, reduction_factor=3
        )
    study = optuna.create_study(sampler=sampler, pruner=pruner)
    t0 = time.perf_counter()

    class Report(Callback):
        def __init__(self, trial: Any) -> None:
            self.trial, self.pruned = trial, False

        def on_eval(self, state: Any, record: dict[str, Any]) -> bool:
            if math.isfinite(record["val_loss"]):
                self.trial.report(record["val_loss"], int(state.tokens))
            self.pruned = state.tokens < setup.trial_tokens and self.trial.should_prune()
            return self.pruned

    best: tuple[float, Path | None] = (math.inf, None)
    n = 0
    while (left := setup.search_s - (time.perf_counter() - t0)) > 1.0:
        trial = study.ask()
        values = space.suggest(trial)
        tdir = out / f"trial-{n:04d}"
        n += 1
        try:
            cfg = trial_cfg(setup, values, setup.trial_tokens, left)
            rep = Report(trial)
            res = train_trial(setup, cfg, tdir, [rep])
        except Exception as err:  # a failed configuration (NaN, invalid) costs its time, like in lmforge
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"  {kind} trial {n} failed: {str(err)[:120]}", file=sys.stderr)
            continue
        if rep.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif math.isfinite(res.best_val_loss):
            study.tell(trial, res.best_val_loss)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not rep.pruned and res.final_val_loss < best[0]:
            best = (res.final_val_loss, tdir)
    return best[1], n


def topk_search(setup: Setup, out: Path) -> tuple[Path | None, int]:
    """One short pass over many random configurations (half the search time), then the best K continue
    from their checkpoints with the other half shared equally; the lowest last validation loss wins."""
    import optuna

    from lmforge.search.space import load_space

    space = load_space(str(SPACE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=setup.seed))
    t0 = time.perf_counter()
    short: list[tuple[float, Path, dict[str, Any]]] = []
    n = 0
    while (left := setup.search_s / 2 - (time.perf_counter() - t0)) > 1.0:
        trial = study.ask()
        values = space.suggest(trial)
        tdir = out / f"trial-{n:04d}"
        n += 1
        try:
            res = train_trial(setup, trial_cfg(setup, values, setup.trial_tokens // 4, left), tdir)
        except Exception as err:
            print(f"  topk trial {n} failed: {str(err)[:120]}", file=sys.stderr)
            continue
        if math.isfinite(res.final_val_loss):
            short.append((res.final_val_loss, tdir, values))
    top = sorted(short, key=lambda r: r[0])[:TOPK]
    best: tuple[float, Path | None] = (math.inf, None)
    for i, (_, tdir, values) in enumerate(top):
        share = (setup.search_s - (time.perf_counter() - t0)) / (len(top) - i)
        if share <= 1.0:
            break
        # the same trial setup at the full trial length, resumed from its short run's checkpoint
        cfg = trial_cfg(setup, values, setup.trial_tokens, _elapsed(tdir) + share)
        try:
            res = train_trial(setup, cfg, tdir)
        except Exception as err:
            print(f"  topk continuation failed: {str(err)[:120]}", file=sys.stderr)
            continue
        if res.final_val_loss < best[0]:
            best = (res.final_val_loss, tdir)
    return best[1], n


def _elapsed(run: Path) -> float:
    from lmforge.runs import list_checkpoints, load_checkpoint

    ck = list_checkpoints(run)
    return float(load_checkpoint(ck[-1], load_trainer_state=False).meta.get("elapsed_s", 0.0)) if ck else 0.0


def default_run(setup: Setup, out: Path) -> Path:
    """The default configuration alone: lmforge's defaults with the benchmark's base options, trained for
    the whole budget (search and final shares) with one warmup-stable-decay over its clock."""
    from lmforge.config import apply_overrides, build_config
    from lmforge.search.context import EVAL_BLOCKS, fixed_val_batches
    from lmforge.train.loop import train

    seconds = setup.search_s + setup.final_s
    raw = apply_overrides(
        setup.base,
        [
            "--schedule.name", "wsd", "--schedule.horizon", "time", "--schedule.warmup_steps", "16",
            "--train.max_time", str(seconds), "--train.max_steps", "1000000", "--train.eval_interval", "50",
            "--train.progress", "false",
        ],
    )  # fmt: skip
    cfg = build_config(raw)
    train(cfg, out, data=setup.data.prepared, verbose=False,
          val_batches=fixed_val_batches(setup.data.prepared.val, cfg, EVAL_BLOCKS))  # fmt: skip
    return out / "best"


def lmforge_space(out: Path, starts: str) -> Path:
    """The shared space, plus (``starts == "default"``) the default space's start points of the families
    the shared space searches, written to ``out/space.yaml``."""
    from lmforge.search.space import load_space

    spec = yaml.safe_load(SPACE.read_text(encoding="utf-8"))
    if starts == "default":
        fams = set(load_space(str(SPACE)).blocks[0].dists[0].choices)
        spec["start"] = [p for p in load_space().starts if p.get("model.family") in fams]
    path = out / "space.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_lmforge(setup: Setup, out: Path, starts: str) -> tuple[Path, int]:
    from lmforge.search.pipeline import TuneOptions, run_pipeline

    data_path = setup.base["data"]["path"]
    overrides = [*BASE, "--train.seed", str(setup.seed)]
    space = lmforge_space(setup.root, starts)
    opts = TuneOptions(out=str(out), data=data_path, budget=f"{int(setup.budget_s)}s", space=str(space),
                       seed=setup.seed, overrides=overrides, verbose=False)  # fmt: skip
    run_pipeline(opts)
    return out / "best", len(list(out.glob("trials/*")))


def run_strategy(kind: str, setup: Setup, starts: str = "default") -> dict[str, Any]:
    out = setup.root / kind
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    if kind == "lmforge":
        best, n = run_lmforge(setup, out, starts)
    elif kind == "default":
        best, n = default_run(setup, out), 1
    else:
        src, n = optuna_search(setup, kind, out) if kind != "topk_1epoch" else topk_search(setup, out)
        if src is None:
            return {"test_loss": math.inf, "trials": n, "wall_s": time.perf_counter() - t0}
        allowance = setup.budget_s - (time.perf_counter() - t0) - setup.budget_s * 0.05
        best = common_final(setup, src, out, max(0.0, allowance))
    wall = time.perf_counter() - t0
    return {"test_loss": test_loss(setup, best), "trials": n, "wall_s": round(wall, 1)}


# ------------------------------------------------------------------------------------------- tables
def print_table(key: str, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean, spread and per-seed test losses of every strategy for one corpus and budget."""
    corpus, budget = key.rsplit("@", 1)
    n_seeds = max(len(rs) for rs in rows.values())
    print(f"\n{corpus}: {budget} per run, {n_seeds} seed(s); test loss (nats/char), same final step")
    print(f"{'strategy':<15} {'mean':>8} {'std':>7} {'trials':>7} {'wall s':>7}  per seed")
    table = {}
    for kind, rs in rows.items():
        losses = [r["test_loss"] for r in rs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        mean = statistics.mean(losses)
        print(
            f"{kind:<15} {mean:>8.4f} {sd:>7.4f} {statistics.mean(r['trials'] for r in rs):>7.1f} "
            f"{statistics.mean(r['wall_s'] for r in rs):>7.1f}  {' '.join(f'{v:.4f}' for v in losses)}"
        )
        table[kind] = {"mean": round(mean, 4), "std": round(sd, 4), "losses": losses,
                       "trials": [r["trials"] for r in rs], "wall_s": [r["wall_s"] for r in rs]}  # fmt: skip
    return table


def win_table(report: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per corpus and budget: which strategy had the lowest test loss in each seed, and lmforge against each
    other strategy seed by seed (wins-losses) and by mean (the difference, negative: lmforge lower)."""
    print("\nwins: lowest test loss per seed; lmforge vs each strategy, seed by seed (W-L) and mean difference")
    out: dict[str, Any] = {}
    for key, table in report.items():
        kinds = list(table)
        n = min(len(t["losses"]) for t in table.values())
        firsts = {k: 0 for k in kinds}
        for i in range(n):
            firsts[min(kinds, key=lambda k: table[k]["losses"][i])] += 1
        vs = {}
        if "lmforge" in table:
            lm = table["lmforge"]
            for k in kinds:
                if k == "lmforge":
                    continue
                w = sum(lm["losses"][i] < table[k]["losses"][i] for i in range(n))
                vs[k] = {"wins": w, "losses": n - w, "mean_diff": round(lm["mean"] - table[k]["mean"], 4)}
        print(f"{key}: seeds won " + ", ".join(f"{k} {v}" for k, v in firsts.items()) + (
            "; lmforge vs " + ", ".join(f"{k} {v['wins']}-{v['losses']} ({v['mean_diff']:+.4f})" for k, v in vs.items())
            if vs else ""))  # fmt: skip
        out[key] = {"seeds_won": firsts, "lmforge_vs": vs}
    return out


def merge(logs: list[str]) -> None:
    """One table per corpus and budget from the RESULT lines of several runs (e.g. one process per corpus or
    seed); rows of the same corpus, budget and strategy are joined in seed order."""
    rows: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for log in logs:
        for line in Path(log).read_text(encoding="utf-8").splitlines():
            if not line.startswith("RESULT "):
                continue
            res = json.loads(line[len("RESULT ") :])
            first = int(res.get("first_seed", 0))
            for key, table in res["results"].items():
                for kind, t in table.items():
                    for i, loss in enumerate(t["losses"]):
                        r = {
                            "test_loss": loss,
                            "trials": t.get("trials", [0] * 99)[i],
                            "wall_s": t.get("wall_s", [0] * 99)[i],
                        }
                        rows.setdefault(key, {}).setdefault(kind, []).append((first + i, r))
    report = {}
    for key, kinds in rows.items():
        report[key] = print_table(key, {k: [r for _, r in sorted(v, key=lambda x: x[0])] for k, v in kinds.items()})
    wins = win_table(report)
    print("RESULT " + json.dumps({"bench": "search_vs_baselines", "merged": logs, "results": report, "wins": wins}))


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", default="ts,demo", help="names (ts, demo) or paths, comma-separated")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--lmforge-starts", choices=("default", "none"), default="default")
    ap.add_argument("--merge", nargs="+", metavar="LOG", help="only merge the RESULT lines of these logs")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-search")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge)
        return
    torch.set_num_threads(args.threads)
    from lmforge.search.study import quiet_optuna

    quiet_optuna()
    root = Path(args.out)
    kinds = args.strategies.split(",")
    report: dict[str, Any] = {}
    for corpus in args.corpora.split(","):
        path = str(local_corpora.build(corpus, root / "corpora")) if corpus in LOCAL else CORPORA.get(corpus, corpus)
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            setup = Setup(path, args.budget, seed, root / f"{Path(corpus).name}-{int(args.budget)}s-{seed}")
            for kind in kinds:
                print(f"[{time.strftime('%H:%M:%S')}] {corpus} {args.budget:.0f}s seed {seed}: {kind}", file=sys.stderr)
                r = run_strategy(kind, setup, args.lmforge_starts)
                print(f"    test loss {r['test_loss']:.4f}, {r['trials']} trials, {r['wall_s']}s", file=sys.stderr)
                rows[kind].append(r)
        key = f"{Path(corpus).name}@{int(args.budget)}s"
        report[key] = print_table(key, rows)
    wins = win_table(report)
    print("RESULT " + json.dumps({"bench": "search_vs_baselines", "budget_s": args.budget, "seeds": args.seeds,
                                  "first_seed": args.first_seed, "lmforge_starts": args.lmforge_starts,
                                  "results": report, "wins": wins}))  # fmt: skip


if __name__ == "__main__":
    main()
