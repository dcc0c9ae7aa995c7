"""The first run of ``lmforge tune`` in a directory: resolve everything the study depends on (base config,
sampler and pruner, capacity plan, space), create the study with its search context, and return the
pipeline's initial state. A resumed run never comes here: it keeps what the first run resolved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, apply_overrides, build_config, load_yaml
from lmforge.search.budget import STEPS, Ledger, format_count, parse_budget
from lmforge.search.context import CONTEXT_ATTR, SearchContext, SearchData, prepare_search_data
from lmforge.search.options import DEFAULT_BUDGET, TuneOptions
from lmforge.search.plan import narrow_default_space, plan_capacity
from lmforge.search.space import load_space, parse_space
from lmforge.search.study import SearchError, create_or_load, open_storage, storage_url

STATE_VERSION = 1
"""Version of ``pipeline.json``; a run of another version is refused rather than misread."""


def start_run(opts: TuneOptions, run_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, Any], SearchData]:
    """Plan a new run in ``run_dir``: create its study (refusing one that holds another run's trials) and
    return (the initial ``pipeline.json`` state, the prepared data)."""
    o = opts
    budget = o.total_budget or parse_budget(DEFAULT_BUDGET)
    base = load_yaml(o.config) if o.config else {}
    extra = (["--data.path", o.data] if o.data else []) + list(o.overrides)
    base = apply_overrides(base, extra)
    base_cfg = build_config(base)
    if not base_cfg.data.path:
        raise ConfigError("no data: pass --data PATH|demo|hf:NAME")
    if Path(base_cfg.data.path).exists():  # workers on other machines and Ray trials run in other folders
        base.setdefault("data", {})["path"] = str(Path(base_cfg.data.path).resolve())
    objectives = o.objectives
    sampler, pruner, notes = o.sampler_and_pruner()
    if o.backend == "ray":  # refused before any data is read (also: Ray is installed)
        from lmforge.search.ray_backend import check_options, parse_resources  # optional extra: Ray

        check_options(sampler=sampler, pruner=pruner, cv=o.cv, objectives=objectives)
        parse_resources(o.trial_resources)
    space = load_space(o.space).restrict(o.override_paths())

    log(f"preparing data {base_cfg.data.path!r} ...")
    data = prepare_search_data(base, o.cv, o.seed)
    log(
        f"data: {format_count(len(data.prepared.train))} training tokens, {format_count(len(data.prepared.val))} "
        f"validation, {format_count(len(data.test))} test (vocabulary {data.tokenizer.vocab_size})"
    )
    capacity = plan_capacity(base, base_cfg, data, budget, n_jobs=o.n_jobs, trial_tokens=o.trial_tokens_count)
    fid, cap = capacity.fidelity, capacity.param_cap

    # -- the space: the user's as given, or the default one narrowed to the budget
    param_cap = None
    if o.space is None:
        space, space_notes = narrow_default_space(space, base, data, capacity)
        notes += space_notes
        param_cap = cap
    space = parse_space(space.to_spec(), source=o.space or "default space")
    if sampler == "grid":
        grid = space.grid()
        notes.append(f"grid search over {len(grid)} configurations")

    led = Ledger(budget, split=capacity.split)
    name = o.study_name or run_dir.name
    url = storage_url(o.storage, run_dir)
    ctx = SearchContext(
        run_dir=str(run_dir),
        base_config=base,
        space=space.to_spec(),
        fidelity=fid.to_dict(),
        objectives=objectives,
        sampler=sampler,
        pruner=pruner,
        seed=o.seed,
        # several workers (other machines may join a shared storage): TPE then uses the constant liar
        parallel=o.n_jobs > 1 or o.storage is not None or o.backend == "ray",
        max_params=o.max_params_count,
        param_cap=param_cap,
        cv=o.cv,
        time_share_s=(budget.amount * led.shares["search"] / 3 if budget.kind == "time" else None),
        search_tokens=int(budget.amount * led.shares["search"]) if budget.kind == "tokens" else None,
        n_trials=o.n_trials,
        disk_cap=o.disk_cap_bytes,
        report_to=list(o.report_to),
    )
    study = create_or_load(open_storage(url), name, len(objectives))
    if study.user_attrs.get(CONTEXT_ATTR) and study.get_trials(deepcopy=False):
        raise SearchError(
            f"study {name!r} in {url} already holds trials of another run; use another --study-name or --out"
        )
    study.set_user_attr(CONTEXT_ATTR, ctx.to_dict())
    if sampler == "grid":
        for params in space.grid():
            study.enqueue_trial(params, skip_if_exists=True)
    elif o.strategy == "optuna" and space.starts:  # Ray's OptunaSearch asks the same study: it sees them too
        starts = space.start_params()
        for params in starts:  # tried first; the sampler fills in what a start point leaves out
            study.enqueue_trial(params, skip_if_exists=True)
        notes.append(f"{len(starts)} start point(s) of the space tried first")
    state = {
        "version": STATE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": o.to_dict(),
        "study_name": name,
        "storage": url,
        "budget": budget.to_dict(),
        "shares": led.shares,
        "spent_s": {s: 0.0 for s in STEPS},
        "spent_tokens": {s: 0.0 for s in STEPS},
        "plan": capacity.record,
        "notes": notes,
        "steps": {s: {"status": "pending"} for s in STEPS},
    }
    log("search space:\n  " + space.describe().replace("\n", "\n  "))
    log(
        f"trials: up to {format_count(fid.max_tokens)} tokens each, rungs from "
        f"{format_count(fid.min_tokens)} (x{fid.eta}); {pruner} pruning, {sampler} sampler"
        + (f"; models up to about {format_count(cap)} parameters" if param_cap else "")
    )
    return state, data
