"""Steps 2 and 3 of ``lmforge tune --task``: the fine-tuning search and the final fine-tune.

``search``: fine-tuning hyperparameters (the pretrained start, i.e. the tokenizer; lr, epochs, batch size)
by an Optuna TPE study (``DIR/finetune.journal``), each trial a fine-tune in ``DIR/ft/NNNN`` scored by its
best validation completion loss in nats per byte (comparable across tokenizers); the :data:`RERANK_TOP`
best are re-ranked by the task metric on validation records, because loss and metric disagree. Tasks of
:data:`~lmforge.data.retrieval.RETRIEVAL_TASKS` also search ``retrieval`` (:data:`RETRIEVAL_K`: training
examples shown in each prompt); the best trial of each setting is always re-ranked, by the best of a few
decodings with the copy mechanism (:data:`RERANK_COPY`), which is what copies from a retrieved example.

``final``: the winner's settings fine-tuned again from the start model for the rest of the fine-tuning
share (``DIR/final``, trained until its clock or an early stop, not for the trial's epochs); ``DIR/best`` is the better (validation loss) of that and the winner's trial checkpoint, with the retrieval index
its prompts need (``DIR/best/retrieval.json``, :mod:`lmforge.runs.retrieval_file`; none without retrieval).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import optuna
import yaml

from lmforge.config import build_config
from lmforge.data.tasks import TaskDataError, task_data_from_records
from lmforge.evaluate import metrics as M
from lmforge.models.base import DecodingModel
from lmforge.predict.loading import load_pretrained
from lmforge.predict.tasks import predict_records
from lmforge.runs import save_retrieval, write_task_file
from lmforge.search import decode_search as D
from lmforge.search.final import install_dir
from lmforge.search.finetune import finetune_config, set_schedule_length, train_on_task
from lmforge.search.study import open_storage
from lmforge.search.task_plan import TaskPipelineError
from lmforge.search.task_run import MIN_TRIAL_S, TaskRun
from lmforge.train.callbacks import TrainResult

RERANK_TOP = 3
"""The best trials by validation loss that are re-ranked by the task metric."""
RETRIEVAL_K = (0, 1)
"""Retrieved training examples per prompt the search chooses between (tasks of
:data:`lmforge.data.retrieval.RETRIEVAL_TASKS`); the first two trials differ only in it."""
RERANK_COPY: tuple[dict[str, float], ...] = ({}, {"copy_bias": 8.0}, {"copy_bias": 16.0, "source_bias": 0.5})
"""Decodings whose best scores a trial in the re-ranking of a task with retrieval (greedy, then the copy
mechanism of :mod:`lmforge.predict.processors`; values of the decoding search's grid)."""
PLANNED_TRIALS = 4
"""The search's time is planned for this many trials (each gets its share as its clock)."""
MAX_FAILED_TRIALS = 3
"""Failed trials after which a search out of time stops (three times as many stop it in any case)."""


def trial_dir(run_dir: Path, number: int) -> Path:
    return run_dir / "ft" / f"{number:04d}"


def _read_config(ckpt: Path) -> dict[str, Any]:
    for d in (ckpt, ckpt.parent):
        f = d / "config.yaml"
        if f.is_file():
            loaded = yaml.safe_load(f.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                return loaded
    raise TaskPipelineError(f"{ckpt}: no config.yaml")


def _settings(run: TaskRun, params: dict[str, Any]) -> tuple[str, float]:
    """A trial's parameters -> (start candidate, learning rate). From ``--init`` the lr is searched as
    is; from a model pretrained here as a factor of that model's own pretraining lr."""
    plan = run.state["plan"]
    name = str(params.get("start", plan["candidates"][0]["name"]))
    if plan.get("init"):
        return name, float(params["lr"])
    cfg = build_config(_read_config(Path(run.start_model(name))))
    return name, float(cfg.optim.lr) * float(params["lr_factor"])


def _study(run: TaskRun) -> optuna.Study:
    storage = open_storage(str(run.run_dir / "finetune.journal"))
    sampler = optuna.samplers.TPESampler(seed=run.opts.seed, n_startup_trials=3)
    return optuna.create_study(
        study_name="finetune", storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
    )


def classify_metric(
    model: DecodingModel, tok: Any, run: TaskRun, recs: list[dict[str, Any]]
) -> dict[str, float]:
    """Accuracy and macro-F1 of label scoring on ``recs``."""
    labels = run.state["labels"]
    preds, _ = predict_records(model, tok, run.task, recs, labels=labels)
    agg, _ = M.score(run.task.metric, preds, [run.task.reference(r).strip() for r in recs], labels=labels)
    return agg


def val_metric(run: TaskRun, model: DecodingModel, tok: Any, recs: list[dict[str, Any]]) -> dict[str, float]:
    """The task metric on validation records ``recs`` (generation: greedy, the shorter length budget)."""
    if run.task.name == "classification":
        return classify_metric(model, tok, run, recs)
    budgets = D.length_budgets(run.task, run.records("train"), tok)
    if not run.uses_retrieval:
        return D.score_settings(model, tok, run.task, recs, {"max_new_tokens": budgets[0]})
    # a retrieved example pays through the copy mechanism (its target's words copied): each trial is scored
    # by the best of greedy and a few copy settings, as the decoding search will then choose among them
    scored = [D.score_settings(model, tok, run.task, recs, {"max_new_tokens": budgets[0], **c}) for c in RERANK_COPY]
    return max(scored, key=lambda agg: agg[D.primary(run.task)])


def step_search(run: TaskRun) -> None:
    study = _study(run)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # killed last run
        shutil.rmtree(trial_dir(run.run_dir, t.number), ignore_errors=True)
        run.log(f"[search] trial {t.number} was interrupted by the last run: failed")
    plan = run.state["plan"]
    names = [c["name"] for c in plan["candidates"]]
    # (parameter, low, high, first try): an absolute lr from --init, else a factor of the start's own
    lr_param = ("lr", *plan["lr_range"], plan["lr"]) if plan.get("init") else ("lr_factor", 1 / 30, 1.0, 1 / 3)
    if not study.trials:
        first = {lr_param[0]: lr_param[3], "epochs": 3, "batch_size": 8}
        first = {**first, "start": names[0]} if len(names) > 1 else first
        # with retrieval, then the same settings without: the one comparison the choice rests on
        for k in RETRIEVAL_K[::-1] if run.uses_retrieval else [None]:
            study.enqueue_trial(first if k is None else {**first, "retrieval": k})
    run.set_step("search", status="running", lr_range=[lr_param[1], lr_param[2]], lr_param=lr_param[0])
    total = run.allowance("search")
    trial_s = max(MIN_TRIAL_S, total / PLANNED_TRIALS)
    n_max = run.opts.n_trials or run.state["options"].get("n_trials")
    failed = 0
    while True:
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        left = run.allowance("search") * 0.8  # the rest: re-ranking by the task metric
        out_of_time = left < MIN_TRIAL_S and (done or failed >= MAX_FAILED_TRIALS)
        if out_of_time or (n_max is not None and len(study.trials) >= n_max) or failed >= MAX_FAILED_TRIALS * 3:
            break
        trial = study.ask()
        if len(names) > 1:
            trial.suggest_categorical("start", names)
        trial.suggest_float(lr_param[0], lr_param[1], lr_param[2], log=True)
        epochs = trial.suggest_int("epochs", 1, 6)
        batch = trial.suggest_categorical("batch_size", [4, 8, 16])
        k = int(trial.suggest_categorical("retrieval", list(RETRIEVAL_K))) if run.uses_retrieval else 0
        start, lr = _settings(run, trial.params)
        out = trial_dir(run.run_dir, trial.number)
        shutil.rmtree(out, ignore_errors=True)  # a trial never resumes: it starts over
        clock = max(MIN_TRIAL_S, min(trial_s, left))
        try:
            result, value = finetune(run, out, start, lr=lr, epochs=epochs, batch=batch, max_time=clock, k=k)
        except TaskDataError:
            raise
        except Exception as err:  # a diverged or failed trial: recorded, the search goes on
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            run.log(f"[search] trial {trial.number} failed: {type(err).__name__}: {err}")
            failed += 1
            continue
        if not math.isfinite(value) or not (out / "best" / "COMPLETE").is_file():
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            run.log(f"[search] trial {trial.number} failed: no finite validation loss ({result.stop_reason})")
            failed += 1
            continue
        study.tell(trial, value)
        run.log(
            f"[search] trial {trial.number}: {start}, lr {lr:.2e}, {epochs} epochs, batch {batch}, retrieval {k}: "
            f"val completion loss {value:.4f} nats/byte ({result.stop_reason})"
        )
    complete = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: math.inf if t.value is None else float(t.value),
    )
    if not complete:
        raise TaskPipelineError("search: no fine-tuning trial finished; give a larger --budget")
    rerank = dict(run.state["steps"]["search"].get("rerank") or {})
    key = D.primary(run.task)
    must, rest = rerank_candidates(complete)
    for t in must + rest:
        if str(t.number) in rerank:
            continue
        if t in rest and rerank and run.allowance("search") <= 0:
            break
        model, tok, _ = load_pretrained(trial_dir(run.run_dir, t.number) / "best")
        agg = val_metric(run, model, tok, run.val_metric_records(int(t.params.get("retrieval", 0))))
        rerank[str(t.number)] = {"val_loss": t.value, key: agg[key], "params": t.params}
        run.set_step("search", rerank=rerank)
        run.log(f"[search] re-rank: trial {t.number}: validation {key} {agg[key]:.2f}")
    winner = max(rerank, key=lambda n: (rerank[n][key], -rerank[n]["val_loss"]))
    run.set_step(
        "search",
        status="done",
        trials=len(study.trials),
        complete=len(complete),
        winner=int(winner),
        winner_params=rerank[winner]["params"],
        winner_dir=f"ft/{int(winner):04d}",
    )


def rerank_candidates(
    complete: list[optuna.trial.FrozenTrial],
) -> tuple[list[optuna.trial.FrozenTrial], list[optuna.trial.FrozenTrial]]:
    """The trials re-ranked by the task metric, from ``complete`` (sorted by validation loss): (those re-ranked
    whatever the time: the best, or the best of each retrieval setting, so that retrieval is chosen by the
    task metric and not the loss; the rest of the :data:`RERANK_TOP` best, while the step has time)."""
    firsts = [next((t for t in complete if t.params.get("retrieval") == k), None) for k in RETRIEVAL_K]
    must = [t for t in complete if t in firsts] or complete[:1]
    return must, [t for t in complete[:RERANK_TOP] if t not in must]


def finetune(
    run: TaskRun, out: Path, start: str, *, lr: float, epochs: int, batch: int, max_time: float,
    patience: int | None = None, fill_time: bool = False, k: int = 0,
) -> tuple[TrainResult, float]:
    """Fine-tune the start model of candidate ``start`` -> (the training result, its best validation
    completion loss in nats per byte of the references: comparable across tokenizers). ``fill_time``:
    train until ``max_time`` (or ``patience``) rather than for ``epochs``, the learning rate decaying over
    the time (the warm-up as for ``epochs``). ``k``: training examples retrieved into each prompt."""
    model, tokenizer, model_cfg = load_pretrained(run.start_model(start))
    raw = finetune_config(model_cfg, None, [], run.state["plan"]["data"])
    block = int(run.candidates()[start]["block_size"])
    ctx = getattr(model, "max_seq_len", None)
    if ctx is not None:
        block = min(block, int(ctx))
    raw["data"]["block_size"] = block
    td = task_data_from_records(
        run.task, run.prompt_records("train", k), run.prompt_records("val", k), tokenizer, block,
        source=run.state["plan"]["data"],
    )
    n_train = len(td.train)
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    raw["optim"]["lr"] = lr
    raw["train"] = {
        "batch_size": batch,
        "max_epochs": float(epochs),
        "max_steps": None,
        "max_time": max_time,
        "eval_interval": max(1, steps_per_epoch // 2),
        "eval_batches": max(1, math.ceil(len(td.val) / batch)),
        "log_interval": max(1, steps_per_epoch),
        "patience": patience,
        "keep_last": 1,
        "resume": "auto",
        "progress": False,
        "seed": run.opts.seed,
    }
    set_schedule_length(raw, n_train)
    if fill_time:
        raw["train"]["max_epochs"] = None
        raw["schedule"] = {**raw["schedule"], "horizon": "time", "total_steps": None}
    cfg = build_config(raw)
    result = train_on_task(cfg, out, model, tokenizer, td, run.task_info(), verbose=False)
    tokens = sum(int(e.trained[1:].sum()) for e in td.val)
    n_bytes = sum(len((" " + run.task.reference(r)).encode("utf-8")) + 1 for r in run.records("val"))
    return result, result.best_val_loss * tokens / max(1, n_bytes)


def step_final(run: TaskRun) -> None:
    s = run.state["steps"]["search"]
    p = s["winner_params"]
    allowance = run.allowance("final")
    final = run.run_dir / "final"
    trial_best = run.run_dir / s["winner_dir"] / "best"
    trial_loss = float(s["rerank"][str(s["winner"])]["val_loss"])
    chosen, final_loss = trial_best, None
    start, lr = _settings(run, p)
    run.set_step("final", start=start)
    if allowance >= MIN_TRIAL_S:
        run.set_step("final", status="running", max_time=round(allowance, 1))
        run.log(f"[final] trial {s['winner']}'s settings from the start model ({start}), {allowance:.0f}s")
        # the whole allowance: a trial that reached its epochs early would leave time unused, and the
        # best checkpoint (by validation loss) and the early stop guard against training too long
        _, final_loss = finetune(
            run, final, start, lr=lr, epochs=p["epochs"], batch=p["batch_size"], max_time=allowance * 0.9,
            patience=4, fill_time=True, k=run.retrieval_k(),
        )
        if (final / "best" / "COMPLETE").is_file() and math.isfinite(final_loss) and final_loss <= trial_loss:
            chosen = final / "best"
    install_dir(chosen, run.run_dir / "best")
    k = run.retrieval_k()
    save_retrieval(run.run_dir / "best", run.retrieval_index(k) if k else None)  # eval builds the same prompts
    write_task_file(run.run_dir, run.task_info())  # --task chat: also the trained chat template
    run.set_step(
        "final",
        status="done",
        best_from=str(chosen.relative_to(run.run_dir)),
        val_loss=final_loss if chosen != trial_best else trial_loss,
        trial_val_loss=trial_loss,
        final_val_loss=final_loss,
        retrieval=k,
    )
