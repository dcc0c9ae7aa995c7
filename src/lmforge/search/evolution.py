"""Regularized evolution over trained models (``lmforge tune --strategy evolution``).

Real et al. 2019, "Regularized Evolution for Image Classifier Architecture Search": keep a population of
the ``population`` most recent members; each cycle samples ``sample`` of them at random, mutates the best of
the sample (compared at matched training tokens: :func:`matched_best`) into a child, adds the child and retires the OLDEST member (not the worst: ageing regularizes).

Here a child does not start from scratch: it starts from its parent's trained weights (``best/`` of the
parent's trial directory), mutated by :mod:`lmforge.models.mutate` (function-preserving where possible:
``add_layer`` and ``widen`` begin exactly where the parent is), and trains for an increment of
``increment_tokens`` with the one training loop. So the search both explores architectures and keeps
training the promising lineages (as population-based training does).

Everything lives in the Optuna study, like the other strategies' trials, so the leaderboard, the report,
the final training and the disk cap treat children as ordinary trials:

- the initial population are ordinary trials (random samples of the space, run by ``objective.run_trial``);
- a child is a trial with the searched values of its config as ``params`` (ranges widened where a mutation
  left the space, e.g. one layer more than the space allows; a categorical value outside its choices is left
  out), and user attributes ``parent`` (trial number), ``mutation`` (readable), ``mutation_spec`` (to redo
  it), ``generation``, ``tokens_offset`` (tokens its weights had seen before it: its curve continues the
  parent's), ``values`` (every searched path -> value) and the usual ``run_dir``, ``tokens``, ``val_loss``...;
- the population is rebuilt from the study (the last ``population`` finished trials by number), so a killed
  search continues where it stopped; an interrupted child is retried with the same parent, mutation and
  seed, resuming from its own last checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lmforge.config import RunConfig, build_config
from lmforge.data import Tokenizer
from lmforge.models import LanguageModel, mutate
from lmforge.runs import load_model
from lmforge.search.budget import budget_spent, tokens_used
from lmforge.search.context import (
    SearchContext,
    SearchData,
    fixed_val_batches,
    load_context,
    prepare_search_data,
    trial_dir,
)
from lmforge.search.curves import predict_curve
from lmforge.search.disk import enforce_disk_cap
from lmforge.search.evaluation import measure_latency
from lmforge.search.failure import failure_reason
from lmforge.search.objective import run_trial
from lmforge.search.space import SearchSpace
from lmforge.search.study import (
    SearchError,
    fail_and_retry,
    frozen,
    heartbeat,
    load,
    open_storage,
    original_number,
    process_identity,
    sampler_seed,
    trials_run,
)
from lmforge.search.worker import search_done
from lmforge.train.loop import Callback, LoopState, train

__all__ = ["MUTATIONS", "run_evolution"]

MUTATIONS = ("add_layer", "remove_layer", "widen", "connection", "lr")
"""Mutation operators; each child applies one that fits its parent's family and options."""
DEFAULT_POPULATION = 8
"""Members kept (``lmforge tune --population``): the one definition of the default."""
DEFAULT_TOURNAMENT = 3
"""Members drawn per tournament (``lmforge tune --tournament``): the one definition of the default."""
_TRIES = 12
"""Mutations tried before giving up on a parent whose every child would break the size limits."""


# ------------------------------------------------------------------------------------------- entry
def run_evolution(
    study_name: str,
    storage: str | BaseStorage,
    *,
    data: SearchData | None = None,
    hook: Callable[[], None] | None = None,
    verbose: bool = False,
    population: int = DEFAULT_POPULATION,
    sample: int = DEFAULT_TOURNAMENT,
    increment_tokens: int | None = None,
    max_trials: int | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run regularized evolution on the study ``study_name`` (created by ``lmforge tune``: it carries the
    search context) until :func:`lmforge.search.worker.search_done` says stop; return the trials run.

    ``data``: the :class:`~lmforge.search.objective.SearchData` (prepared when None). ``hook`` is called
    after every evaluation and trial (the pipeline's progress and bookkeeping). ``increment_tokens``: the
    training of each child (default: a third of a full trial, at least the first rung). ``max_trials``
    bounds this call only. KeyboardInterrupt (and SIGTERM during training) re-enqueue the current trial.
    """
    if population < 2:
        raise SearchError(f"evolution population {population}: must be at least 2")
    if not 1 <= sample <= population:
        raise SearchError(f"evolution sample {sample}: must be between 1 and the population ({population})")
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if verbose else None)
    st = open_storage(storage) if isinstance(storage, str) else storage
    ctx = load_context(load(st, study_name))
    if ctx.cv >= 2:
        raise SearchError("--strategy evolution does not combine with --cv: a child continues one trained parent")
    if ctx.sampler == "grid":
        raise SearchError("--strategy evolution samples its initial population at random; drop --sampler grid")
    # the initial population is random (as in Real et al.); children are chosen by the tournament, not pruned
    # a resumed run draws new random members, not the first run's again
    seed = sampler_seed(ctx.seed, 0, trials_run(load(st, study_name)))
    study = load(st, study_name, optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner())
    if data is None:
        data = prepare_search_data(ctx.base_config, ctx.cv, ctx.seed)
    fid = ctx.fid
    inc = int(increment_tokens) if increment_tokens else max(fid.min_tokens, fid.max_tokens // max(2, fid.eta))
    evo = _Evolution(study, ctx, data, population, sample, inc, hook, verbose, say)
    give_up = 2 * population + 4
    n = failures = 0
    while max_trials is None or n < max_trials:
        why = search_done(study, ctx)
        if why is not None:
            break
        state = evo.step()
        n += 1
        failures = 0 if state == "complete" else failures + 1
        enforce_disk_cap(study, Path(ctx.run_dir), ctx.disk_cap, ctx.keep_best)
        if hook is not None:
            hook()
        if failures >= give_up:
            say(f"evolution: {failures} trials in a row did not finish; stopping (see leaderboard.csv notes)")
            break
    return n


# -------------------------------------------------------------------------------------- population
def population_of(study: optuna.Study, size: int) -> list[FrozenTrial]:
    """The current population: the ``size`` most recent finished trials (by trial number, i.e. birth
    order), oldest first. Trials that failed or were pruned never joined it."""
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE
        and t.values
        and math.isfinite(t.values[0])
        and not t.user_attrs.get("discarded")
    ]
    done.sort(key=lambda t: t.number)
    return done[-size:]


def matched_loss(t: FrozenTrial, tokens: int) -> float:
    """``t``'s validation loss at ``tokens`` lineage tokens: the last report at or below ``tokens`` when its
    curve reaches that far, else its curve extrapolated there (:func:`lmforge.search.curves.predict_curve`);
    its final value without a curve."""
    curve = {int(k): float(v) for k, v in t.intermediate_values.items() if math.isfinite(v)}
    if not curve:
        return float(t.values[0])
    if max(curve) >= tokens:
        return curve[max(k for k in curve if k <= tokens)] if min(curve) <= tokens else curve[min(curve)]
    return predict_curve(curve, tokens).mean


def matched_best(drawn: list[FrozenTrial]) -> FrozenTrial | None:
    """The tournament's winner, compared at matched training tokens: a child continues its parent's
    weights, so it has seen more tokens than a fresh member; every drawn member is scored at the most
    tokens any of them has seen (the less trained ones by their extrapolated curves)."""
    if not drawn:
        return None
    reach = max(max(t.intermediate_values, default=0) for t in drawn)
    if reach <= 0:
        return min(drawn, key=lambda t: (t.values[0], t.number))
    return min(drawn, key=lambda t: (matched_loss(t, reach), t.number))


def _has_weights(run_dir: Path, t: FrozenTrial) -> bool:
    rel = t.user_attrs.get("run_dir")
    return rel is not None and bool(rel) and (run_dir / rel / "best" / "COMPLETE").is_file()


class _Evolution:
    def __init__(
        self,
        study: optuna.Study,
        ctx: SearchContext,
        data: SearchData,
        population: int,
        sample: int,
        increment: int,
        hook: Callable[[], None] | None,
        verbose: bool,
        say: Callable[[str], Any],
    ) -> None:
        self.study = study
        self.ctx = ctx
        self.data = data
        self.population = population
        self.sample = sample
        self.increment = increment
        self.hook = hook
        self.verbose = verbose
        self.say = say
        self.run_dir = Path(ctx.run_dir)

    def step(self) -> str:
        """Run one trial: a waiting retry, a random member (population not full yet) or a child."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            trial = self.study.ask()  # the oldest waiting trial: a retry or a child created but not started
            spec, parent_number = self._spec_of(frozen(self.study, trial), trials)
            if spec is not None:
                return self._run_child(trial, spec, parent_number)
            return run_trial(self.study, trial, self.ctx, self.data, hook=self.hook, verbose=self.verbose)
        pop = population_of(self.study, self.population)
        parent = self._tournament(pop, len(trials)) if len(pop) >= self.population else None
        if parent is None:
            trial = self.study.ask()
            return run_trial(self.study, trial, self.ctx, self.data, hook=self.hook, verbose=self.verbose)
        made = self._make_child(parent, len(trials))
        if made is None:
            trial = self.study.ask()
            return run_trial(self.study, trial, self.ctx, self.data, hook=self.hook, verbose=self.verbose)
        spec, child, cfg_raw = made
        trial = self._create_child_trial(parent, spec, child, cfg_raw)
        return self._run_child(trial, spec, parent.number, prepared=(child, cfg_raw))

    # -- selection and mutation --------------------------------------------------------------------
    def _tournament(self, pop: list[FrozenTrial], birth: int) -> FrozenTrial | None:
        """The best of ``sample`` members drawn at random (only members whose weights remain)."""
        rng = random.Random(f"{self.ctx.seed}:tournament:{birth}")
        drawn = rng.sample(pop, self.sample)
        alive = [t for t in drawn if _has_weights(self.run_dir, t)]
        return matched_best(alive)

    def _make_child(
        self, parent: FrozenTrial, birth: int
    ) -> tuple[dict[str, Any], LanguageModel, dict[str, Any]] | None:
        """(mutation spec, child model, child config) for ``parent``; None when no mutation fits the limits."""
        model, _, cfg = load_model(self.run_dir / parent.user_attrs["run_dir"] / "best")
        rng = random.Random(f"{self.ctx.seed}:mutation:{birth}")
        for attempt in range(_TRIES):
            op, args = _choose(model, rng, self._space_values("model.d_model"))
            spec = {"op": op, "args": args, "seed": rng.randrange(2**31)}
            try:
                child, cfg_raw = apply_mutation(model, cfg, spec)
            except ValueError as err:  # MutationError / ConfigError: try another operator
                self.say(f"evolution: {op} {args} on trial {parent.number} does not apply: {err}")
                continue
            n_params = int(child.num_params())
            if self.ctx.max_params is not None and n_params > self.ctx.max_params:
                continue
            if self.ctx.param_cap is not None and n_params > 1.5 * self.ctx.param_cap:
                continue
            if attempt:
                spec["attempt"] = attempt
            return spec, child, cfg_raw
        return None

    def _space_values(self, path: str) -> list[Any]:
        return sorted(
            {
                c
                for d in self.ctx.search_space.dists
                if d.path == path and d.kind == "categorical"
                for c in d.choices
                if isinstance(c, (int, float)) and not isinstance(c, bool)
            }
        )

    def _spec_of(self, ft: FrozenTrial, trials: list[FrozenTrial]) -> tuple[dict[str, Any] | None, int | None]:
        """Mutation spec and parent of a waiting trial: its own attributes, or those of the first trial
        of its retry chain; (None, None) for a trial that is no child."""
        first = original_number(ft)
        origin = next((t for t in trials if t.number == first), None)
        for t in (ft, origin):
            if t is not None and t.user_attrs.get("mutation_spec") is not None:
                return t.user_attrs["mutation_spec"], int(t.user_attrs["parent"])
        return None, None

    def _create_child_trial(
        self, parent: FrozenTrial, spec: dict[str, Any], child: LanguageModel, cfg_raw: dict[str, Any]
    ) -> optuna.Trial:
        """Add the child to the study as a waiting trial with its params and lineage, and start it."""
        params, dists, values = child_params(self.ctx.search_space, cfg_raw)
        attrs = {
            "parent": parent.number,
            "mutation": describe(spec),
            "mutation_spec": spec,
            "generation": int(parent.user_attrs.get("generation", 0)) + 1,
            "tokens_offset": _lineage_tokens(self.run_dir, parent),
            "values": values,
        }
        self.study.add_trial(
            optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=dists, user_attrs=attrs)
        )
        return self.study.ask()

    # -- training a child ------------------------------------------------------------------------
    def _run_child(
        self,
        trial: optuna.Trial,
        spec: dict[str, Any],
        parent_number: int | None,
        prepared: tuple[LanguageModel, dict[str, Any]] | None = None,
    ) -> str:
        for k, v in process_identity().items():
            trial.set_user_attr(k, v)
        out = trial_dir(self.ctx, self.study, trial)
        trial.set_user_attr("run_dir", str(out.relative_to(self.run_dir)))
        t0 = time.time()
        with heartbeat(self.study, trial):
            try:
                state, values = self._train_child(trial, spec, parent_number, prepared, out)
            except KeyboardInterrupt:
                fail_and_retry(self.study, trial, "interrupted (Ctrl-C or SIGTERM); enqueued again")
                raise
            except Exception as err:  # the search goes on: record why this child failed
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
                trial.set_user_attr("fail_reason", failure_reason(err))
                trial.set_user_attr("duration_s", round(time.time() - t0, 2))
                self.study.tell(trial, state=TrialState.FAIL)
                return "fail"
        trial.set_user_attr("duration_s", round(time.time() - t0, 2))
        if state == "complete":
            self.study.tell(trial, values if self.ctx.multi_objective else values[0])
        else:
            self.study.tell(trial, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)
        if self.verbose:
            self.say(f"evolution: trial {trial.number} = {describe(spec)} of trial {parent_number}: {state}")
        return state

    def _train_child(
        self,
        trial: optuna.Trial,
        spec: dict[str, Any],
        parent_number: int | None,
        prepared: tuple[LanguageModel, dict[str, Any]] | None,
        out: Path,
    ) -> tuple[str, list[float]]:
        parent = next((t for t in self.study.get_trials(deepcopy=False) if t.number == parent_number), None)
        if parent is None or not _has_weights(self.run_dir, parent):
            trial.set_user_attr("fail_reason", f"the parent trial {parent_number} has no weights left")
            return "fail", []
        parent_best = self.run_dir / parent.user_attrs["run_dir"] / "best"
        if prepared is None:  # a retry: redo the same mutation (same spec and seed) of the same parent
            model, _, cfg = load_model(parent_best)
            child, cfg_raw = apply_mutation(model, cfg, spec)
        else:
            child, cfg_raw = prepared
        tokenizer = Tokenizer.load(parent_best)
        cfg = build_config(self._training_plan(cfg_raw))
        ua = frozen(self.study, trial).user_attrs
        offset = int(ua.get("tokens_offset", _lineage_tokens(self.run_dir, parent)))
        trial.set_user_attr("params", int(child.num_params()))
        trial.set_user_attr("family", child.config.family)
        for k in ("parent", "mutation", "mutation_spec", "generation", "tokens_offset"):
            if k not in ua:  # a retry: carry the lineage over from the first attempt
                trial.set_user_attr(
                    k,
                    {
                        "parent": parent.number,
                        "mutation": describe(spec),
                        "mutation_spec": spec,
                        "generation": int(parent.user_attrs.get("generation", 0)) + 1,
                        "tokens_offset": offset,
                    }[k],
                )
        reporter = _ChildReporter(trial, self.ctx, offset, self.hook)
        result = train(
            cfg,
            out,
            data=self.data.prepared,
            model=child,
            tokenizer=tokenizer,
            callbacks=[reporter],
            verbose=self.verbose,
            val_batches=fixed_val_batches(self.data.prepared.val, cfg, self.ctx.eval_blocks),
        )
        trial.set_user_attr("tokens", offset + int(result.tokens))
        trial.set_user_attr("tokens_trained", reporter.trained(result.tokens))
        if result.stop_reason == "sigterm":
            raise KeyboardInterrupt
        if reporter.budget_stop:
            trial.set_user_attr("stopped", f"search budget exhausted at {result.tokens:,} tokens of the increment")
            return "pruned", []
        if not math.isfinite(result.best_val_loss):
            trial.set_user_attr("fail_reason", "no finite validation loss")
            return "fail", []
        loss = float(result.best_val_loss)
        trial.set_user_attr("val_loss", loss)
        values = []
        for obj in self.ctx.objectives:
            if obj == "val_loss":
                values.append(loss)
            elif obj == "params":
                values.append(float(child.num_params()))
            elif obj == "latency":
                ms = measure_latency(out / "best")
                trial.set_user_attr("latency_ms", ms)
                values.append(ms)
        return "complete", values

    def _training_plan(self, cfg_raw: dict[str, Any]) -> dict[str, Any]:
        """The child's training: ``increment`` tokens, evaluated at the search's rung interval, resumable."""
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg_raw.items()}
        tc = raw["train"]
        tps = int(tc["batch_size"]) * int(raw["data"]["block_size"]) * int(tc.get("grad_accum", 1))
        steps = max(1, math.ceil(self.increment / tps))
        tc.update(
            max_steps=steps,
            max_tokens=None,
            max_epochs=None,
            max_time=self.ctx.time_share_s,
            patience=None,
            eval_interval=max(1, min(steps, self.ctx.fid.min_tokens // tps)),
            checkpoint_interval=None,
            keep_last=1,
            resume="auto",
            progress=False,
        )
        sched = raw["schedule"]
        sched["total_steps"] = None
        # fresh optimizer moments: a short warm-up, below the schedule length
        sched["warmup_steps"] = min(int(sched.get("warmup_steps") or 0), steps // 10)
        return raw


def _lineage_tokens(run_dir: Path, t: FrozenTrial) -> int:
    """Tokens the weights of trial ``t``'s best checkpoint have seen, its ancestors' included."""
    try:
        meta = json.loads((run_dir / t.user_attrs["run_dir"] / "best" / "meta.json").read_text(encoding="utf-8"))
        return int(t.user_attrs.get("tokens_offset") or 0) + int(meta["tokens"])
    except (OSError, KeyError, TypeError, ValueError):
        return int(t.user_attrs.get("tokens", 0) or 0)


class _ChildReporter(Callback):
    """Reports a child's evaluations at ``step = lineage tokens`` and stops it when the search budget ends."""

    def __init__(self, trial: optuna.Trial, ctx: SearchContext, offset: int, hook: Callable[[], None] | None) -> None:
        self.trial = trial
        self.ctx = ctx
        self.offset = offset
        self.hook = hook
        self.start = 0
        self.budget_stop = False
        self.used_before = 0
        """Tokens the other trials had trained when this child started (its own are added for the rule)."""

    def trained(self, tokens: int) -> int:
        return int(tokens - self.start)

    def on_train_start(self, state: LoopState) -> None:
        self.start = state.tokens  # > 0 when a retry resumed from the child's checkpoint
        if self.ctx.search_tokens is not None:
            others = [t for t in self.trial.study.get_trials(deepcopy=False) if t.number != self.trial.number]
            self.used_before = tokens_used(others)

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        tokens = self.offset + int(state.tokens)
        if math.isfinite(record["val_loss"]):
            self.trial.report(float(record["val_loss"]), step=tokens)
        self.trial.set_user_attr("tokens", tokens)
        self.trial.set_user_attr("val_loss", float(record["val_loss"]))
        self.trial.set_user_attr("tokens_trained", self.trained(state.tokens))
        if self.hook is not None:
            self.hook()
        if budget_spent(self.ctx, self.used_before + self.trained(state.tokens)) is not None:
            self.budget_stop = True
        return self.budget_stop


# ------------------------------------------------------------------------------------- mutations
def _choose(model: LanguageModel, rng: random.Random, d_model_choices: list[Any]) -> tuple[str, dict[str, Any]]:
    """A mutation operator that applies to ``model`` and its arguments, drawn with ``rng``."""
    cfg = model.config
    fam = cfg.family
    n = cfg.n_layer
    residual = fam == "transformer" or bool(getattr(cfg, "residual", False))
    ops: list[tuple[str, dict[str, Any]]] = [("lr", {"factor": rng.choice([0.5, 2.0])})]
    if residual:
        low = 1 if fam in ("lstm", "gru") else 0
        ops.append(("add_layer", {"index": rng.randint(low, n)}))
    if n >= 2:
        ops.append(("remove_layer", {"index": rng.randrange(n)}))
    if fam == "transformer":
        ops.append(("widen", {"factor": 2.0}))
        ops.append(("connection", {"layout": "parallel" if cfg.layout == "sequential" else "sequential"}))
    else:
        if fam in ("lstm", "gru"):
            bigger = [c for c in d_model_choices if c > cfg.d_model]
            width = int(bigger[0]) if bigger else int(8 * math.ceil(cfg.d_model * 1.5 / 8))
            ops.append(("widen", {"width": max(width, cfg.d_model + 1)}))
        ops.append(("connection", {"residual": not cfg.residual}))
    return rng.choice(ops)


def apply_mutation(model: LanguageModel, cfg: RunConfig, spec: dict[str, Any]) -> tuple[LanguageModel, dict[str, Any]]:
    """(child model, child run config as a raw dict) for ``spec`` = ``{"op", "args", "seed"}``; the model
    and config are the parent's (from ``load_model``). Deterministic given ``spec["seed"]``."""
    op, args = spec["op"], dict(spec.get("args") or {})
    raw = cfg.to_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.get("seed", 0)))
        if op == "add_layer":
            child = mutate.add_layer(model, args.get("index"))
        elif op == "remove_layer":
            child = mutate.remove_layer(model, args.get("index"))
        elif op == "widen":
            child = mutate.widen(model, args.get("factor"), width=args.get("width"))
        elif op == "connection":
            child = mutate.set_connection(model, **args)
        elif op == "lr":
            child = copy.deepcopy(model)  # same architecture and weights, another learning rate
            lr = float(raw["optim"]["lr"]) * float(args["factor"])
            raw["optim"]["lr"] = lr
            if float(raw["schedule"].get("min_lr") or 0.0) > lr:
                raw["schedule"]["min_lr"] = lr
        else:
            raise SearchError(f"unknown mutation {op!r}; known: {', '.join(MUTATIONS)}")
    raw["model"] = child.config.model_dump(mode="json")
    raw["train"]["seed"] = int(spec.get("seed", 0))  # its own batch order: siblings do not train identically
    return child, raw


def describe(spec: dict[str, Any]) -> str:
    """``add_layer(index=2)``: the operator and its arguments, for tables."""
    args = ", ".join(f"{k}={v}" for k, v in (spec.get("args") or {}).items())
    return f"{spec['op']}({args})"


# ---------------------------------------------------------------------------------- study params
def _get(raw: dict[str, Any], path: str) -> Any:
    section, field = path.split(".", 1)
    return (raw.get(section) or {}).get(field)


def child_params(
    space: SearchSpace, cfg_raw: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, BaseDistribution], dict[str, Any]]:
    """(Optuna params, their distributions, path -> value) of a child's config ``cfg_raw`` in ``space``.

    The blocks of the space that apply are walked as a trial would; a numeric value outside its range gets a
    widened distribution of the same kind (Optuna allows ranges to differ between trials), a categorical
    value outside its choices is not recorded as a param (only in ``values``)."""
    params: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}
    values: dict[str, Any] = {}
    for b in space.blocks:
        if not b.applies(values):
            continue
        for path, v in b.fixed.items():
            values[path] = v
        for d in b.dists:
            v = _get(cfg_raw, d.path)
            values[d.path] = v
            dist = d.optuna()
            if isinstance(dist, CategoricalDistribution):
                if v in dist.choices:
                    params[d.name], dists[d.name] = v, dist
                continue
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(dist, IntDistribution):
                if float(v) != int(v):
                    continue
                v = int(v)
                if not dist._contains(dist.to_internal_repr(v)):  # noqa: SLF001 (range and step check)
                    dist = IntDistribution(min(dist.low, v), max(dist.high, v), log=dist.log)
            else:
                v = float(v)
                if dist.log and v <= 0:
                    continue
                if not dist._contains(dist.to_internal_repr(v)):  # noqa: SLF001
                    dist = FloatDistribution(min(dist.low, v), max(dist.high, v), log=dist.log)
            params[d.name], dists[d.name] = v, dist
    return params, dists, values
