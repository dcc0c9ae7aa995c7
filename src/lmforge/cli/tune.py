"""``lmforge tune``: search architecture and hyperparameters, train the best model on, evaluate it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.cli import UserError, command
from lmforge.config import TASK_NAMES

TASK_CHOICES = list(TASK_NAMES)

EPILOG = """\
steps (resumable: rerun the same command to continue a killed run):
  1 search    trials in DIR/trials/NNNN, pruned by trained tokens (promoted trials continue, never restart)
  2 final     the best trial continues from its checkpoint to convergence; DIR/best = best checkpoint
  3 decode    decoding settings (task data only)
  4 evaluate  held-out test loss, DIR/leaderboard.csv, DIR/summary.json (then DIR/report.html)

with --task T (a task model from records; see lmforge.search.task_pipeline):
  pretrain (unless --init) -> search (fine-tuning lr/epochs/batch, re-ranked by the task metric) -> final
  -> decode (decoding settings into DIR/best/generation_config.json) -> evaluate (test records vs baselines)

examples:
  lmforge tune --data demo --out runs/tune --budget 10m
  lmforge tune --data news.jsonl --task summarization --fields document=article,summary=highlights \
      --out runs/sum --budget 30m
  lmforge tune --data reviews.csv --task classification --init gpt2_dir --out runs/cls --budget 10m
  lmforge tune --data corpus.txt --out runs/t2 --budget 5Mtok --space my_space.yaml --sampler random
  lmforge tune --data demo --out runs/pareto --budget 1h --objectives val_loss,params,latency
  lmforge tune --data demo --out runs/grid --budget 30m --space grid.yaml --sampler grid --cv 3

scaling out (see `lmforge worker --help`):
  lmforge tune --data /shared/c.txt --out /shared/runs/t --storage postgresql://HOST/DB --n-jobs 2
  lmforge worker --storage postgresql://HOST/DB --study t        # on each further machine
  lmforge tune --data demo --out runs/ray --backend ray --address auto --trial-resources cpu=1,gpu=0.5
  lmforge tune --out runs/ray --backend ray --address auto --resume   # after the driver died
Any config field can be fixed as --section.field VALUE (it is then removed from the space).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "tune",
        help="search models and hyperparameters within a budget, then train the best",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--data", help="text file, folder, glob, .jsonl, hf:NAME[:CONFIG] or demo")
    t.add_argument("--out", required=True, help="run directory (an existing one is resumed)")
    t.add_argument(
        "--task",
        default="lm",
        choices=TASK_CHOICES,
        help="lm (default): a language model of the corpus; else a task model from records (.jsonl/.json/.csv, "
        "hf:NAME), as lmforge finetune reads them",
    )
    t.add_argument("--fields", help="task: field names as ROLE=FIELD pairs, e.g. document=article,summary=highlights")
    t.add_argument(
        "--corpus", action="append", default=[], metavar="TEXT", help="task: more text for pretraining (repeatable)"
    )
    t.add_argument("--init", help="task: start from this model (lmforge run, Hugging Face dir or hf:NAME): no pretraining")
    t.add_argument("--budget", help="wall clock (90s, 10m, 2h) or tokens (500ktok, 5Mtok) for all steps (default 10m)")
    t.add_argument("--space", help="search space YAML (default: the shipped space, scaled to the budget)")
    t.add_argument(
        "--sampler",
        choices=["tpe", "random", "grid", "cmaes", "gp", "nsga2"],
        help="default tpe (one objective) or nsga2 (several)",
    )
    t.add_argument(
        "--pruner",
        choices=["asha", "sha", "successive_halving", "hyperband", "median", "none"],
        help="default asha (none with several objectives or --cv)",
    )
    t.add_argument(
        "--objectives",
        default="val_loss",
        help="comma-separated: val_loss[,params][,latency] (several: a Pareto front)",
    )
    t.add_argument("--max-params", help="constraint on the chosen model, e.g. 2M")
    t.add_argument("--cv", type=int, default=0, help="k-fold cross-validation over documents (k >= 2)")
    t.add_argument("--n-jobs", default="1",
                   help="trials in parallel (worker processes), or auto: the fastest layout, measured at start-up")
    t.add_argument("--n-trials", type=int, help="stop the search after this many trials")
    t.add_argument("--trial-tokens", help="longest trial in tokens (default: from the budget), e.g. 200k")
    t.add_argument(
        "--storage",
        help="study storage: sqlite:///f.db, postgresql://..., redis://..., or a journal "
        "file (default DIR/study.journal)",
    )
    t.add_argument("--study-name", help="default: the name of DIR")
    t.add_argument(
        "--backend",
        choices=["embedded", "ray"],
        default="embedded",
        help="embedded: worker processes on the study (default); ray: Ray Tune trials (pip install 'lmforge[ray]')",
    )
    t.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local Ray)")
    t.add_argument("--trial-resources", help="Ray resources per trial, e.g. cpu=1,gpu=0.5 (default cpu=1)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (with Ray: Tuner.restore)")
    t.add_argument(
        "--strategy",
        choices=["optuna", "evolution"],
        default="optuna",
        help="optuna: the sampler proposes trials; evolution: regularized evolution of trained networks "
        "(children continue from mutated parents: add/remove a layer, widen, connections)",
    )
    # defaults None: TuneOptions holds them (lmforge.search.evolution defines them once)
    t.add_argument("--population", type=int, help="evolution: population size (default 8)")
    t.add_argument("--tournament", type=int, help="evolution: tournament size (default 3)")
    t.add_argument("--sample", type=int, dest="sample_deprecated", help=argparse.SUPPRESS)
    t.add_argument("--disk-cap", default="2GB", help="delete checkpoints of stopped trials above this (default 2GB)")
    t.add_argument("--report-to", default="", help="live trial curves: tensorboard, mlflow (comma-separated)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--config", help="base config YAML (the space's values are set on top)")
    t.add_argument("--progress-interval", type=float, default=15.0, help="seconds between progress tables")
    t.add_argument("--quiet", action="store_true", help="print only the final summary (JSON)")


@command("tune")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.search.worker import process_age_s  # lazy, as every command handler's imports

    # the budget's clock starts with the process: its start-up (Python, torch, optuna) is spent time too
    started = time.monotonic() - process_age_s()
    if args.task == "lm" and _stored_task(args.out):  # a task run resumed without its --task
        args.task = _stored_task(args.out)
    if args.task != "lm":
        return _run_task(args, overrides, started)
    if args.fields or args.corpus or args.init:
        raise UserError("--fields, --corpus and --init are for --task T (a task model), not --task lm")
    from lmforge.search.pipeline import NoFinishedTrial, TuneOptions, read_state, run_pipeline

    if args.sample_deprecated is not None:
        print(
            "warning: lmforge tune --sample is deprecated; use --tournament (evolution tournament size)",
            file=sys.stderr,
        )
        if args.tournament is None:
            args.tournament = args.sample_deprecated
    evolution = {k: v for k, v in (("population", args.population), ("sample", args.tournament)) if v is not None}
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError("--backend ray needs Ray: pip install 'lmforge[ray]' (or pip install 'ray[tune]')")
    if not args.data and read_state(args.out) is None and not args.resume:
        raise UserError("no data: pass --data PATH|demo|hf:NAME")
    n_jobs = _n_jobs(args.n_jobs, args.config, overrides, verbose=not args.quiet)
    opts = TuneOptions(
        out=args.out,
        data=args.data,
        budget=args.budget,
        space=args.space,
        sampler=args.sampler,
        pruner=args.pruner,
        objectives=args.objectives.split(","),
        max_params=args.max_params,
        cv=args.cv,
        n_jobs=n_jobs,
        storage=args.storage,
        study_name=args.study_name,
        disk_cap=args.disk_cap,
        seed=args.seed,
        n_trials=args.n_trials,
        trial_tokens=args.trial_tokens,
        config=args.config,
        overrides=list(overrides),
        verbose=not args.quiet,
        progress_interval=args.progress_interval,
        backend=args.backend,
        address=args.address,
        trial_resources=args.trial_resources,
        resume=args.resume,
        strategy=args.strategy,
        report_to=[t for t in args.report_to.split(",") if t],
        **evolution,
    )
    from lmforge.models import native

    build = time.monotonic()
    native.decode_step()  # a first build of the C++ decoding step happens now, not on the budget's clock
    opts.started = started + (time.monotonic() - build)
    try:
        # the report is built inside the evaluation step, on the budget's clock
        summary = run_pipeline(opts, finish=lambda run_dir: _report(str(run_dir), verbose=not args.quiet))
    except NoFinishedTrial:
        _report(args.out, verbose=not args.quiet)  # the leaderboard's fail reasons, as a page
        raise
    if args.quiet:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def _stored_task(out: str) -> str | None:
    """The task of the ``lmforge tune --task`` run in ``out`` (None: no run there, or a plain one)."""
    try:
        state = json.loads((Path(out) / "pipeline.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(state["task"]) if isinstance(state, dict) and state.get("kind") == "task" else None


def _run_task(args: argparse.Namespace, overrides: list[str], started: float) -> int:
    """``lmforge tune --task T``: the task pipeline (:mod:`lmforge.search.task_pipeline`)."""
    from lmforge.search.task_pipeline import TaskTuneOptions, run_task_pipeline

    if overrides:
        raise UserError(f"--task {args.task}: unexpected arguments {' '.join(overrides)} (the pipeline sets them)")
    if args.data is None and not (Path(args.out) / "pipeline.json").is_file():
        raise UserError("no data: pass --data RECORDS (.jsonl/.json/.csv or hf:NAME)")
    opts = TaskTuneOptions(
        out=args.out,
        task=args.task,
        data=args.data,
        fields=args.fields,
        corpus=list(args.corpus),
        init=args.init,
        budget=args.budget,
        seed=args.seed,
        n_trials=args.n_trials,
        verbose=not args.quiet,
        started=started,
    )
    summary = run_task_pipeline(opts, finish=lambda run_dir: _report(str(run_dir), verbose=not args.quiet))
    if args.quiet:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def _report(out: str, *, verbose: bool) -> None:
    """Build DIR/report.html from the files the pipeline wrote. The report is an extra: its failure must not
    lose the run's results, so it is a warning."""
    from lmforge.report import build_report  # lazy, as every command handler's imports

    try:
        path = build_report(out)
    except Exception as err:
        if verbose:
            print(f"warning: the HTML report failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return
    if verbose:
        print(f"report: {path}", file=sys.stderr, flush=True)


def _n_jobs(value: str, config: str | None, overrides: list[str], *, verbose: bool) -> int:
    """``--n-jobs N``, or ``auto``: the processes x threads layout with the highest measured throughput for the
    base config's model (:func:`lmforge.train.threads.fastest_layout`, cached per machine and shape). With
    one process, its threads are set here, once (several worker processes set theirs)."""
    from lmforge.train.threads import ProbeSpec, fastest_layout, set_threads, threads_per_process

    if value != "auto":
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"--n-jobs {value!r}: a whole number or auto") from None
    else:
        from lmforge.config import load_config

        cfg = load_config(config, overrides)
        spec = ProbeSpec(model=cfg.model.model_dump(mode="json"), vocab=cfg.model.vocab_size or 256,
                         block=cfg.data.block_size, batch=cfg.train.batch_size)
        n, threads, rates = fastest_layout(spec)
        if verbose:
            table = ", ".join(f"{k}: {v:,.0f} tok/s" for k, v in rates.items())
            print(f"--n-jobs auto: {n} process(es) x {threads} thread(s) ({table})", file=sys.stderr)
    if n == 1:
        set_threads(threads_per_process(1))
    return n
