"""Step 4 of ``lmforge tune --task``, ``decode``: decoding settings searched on validation records with the
task metric (:mod:`lmforge.search.decode_search`: the copy mechanism, repeats, length budget, beams),
written to ``DIR/best/generation_config.json``: the defaults of ``lmforge generate``, ``eval``, ``serve``
and ``export``. Classification scores the label set: nothing to search. A resumed step continues with the
settings it has not tried.

The file also says ``do_sample: false``: the settings were chosen for greedy / beam decoding, and ``serve``
follows OpenAI's default (temperature 1, sampling) for a model whose file does not say otherwise."""

from __future__ import annotations

from typing import Any

from lmforge.predict.generation_config import save_generation_defaults
from lmforge.predict.loading import load_pretrained
from lmforge.search import decode_search as D
from lmforge.search.task_run import TaskRun


def step_decode(run: TaskRun) -> None:
    best = run.run_dir / "best"
    model, tok, _ = load_pretrained(best)
    if run.task.name == "classification":
        settings = D.label_settings(run.state["labels"], tok)
        save_generation_defaults(
            best, {**settings, "do_sample": False}, lmforge_chosen_by="lmforge tune --task classification: label scoring"
        )
        run.set_step(
            "decode", status="done", settings=settings,
            reason="classification scores the label set (no free generation): nothing to search",
        )
        return
    recs = run.val_metric_records(run.retrieval_k())
    key = D.primary(run.task)
    budgets = D.length_budgets(run.task, run.records("train"), tok)
    ngram = D.repeat_ngram_size(run.task, run.records("train"), tok)
    per_word = D.tokens_per_word(run.task, run.records("train"), tok)
    half_lives = [max(1, round(w * per_word)) for w in D.HALF_LIVES_WORDS]
    tried: dict[str, dict[str, Any]] = dict(run.state["steps"]["decode"].get("tried") or {})
    run.set_step("decode", status="running", length_budgets=budgets, repeat_ngram_size=ngram, half_lives=half_lives)
    for settings in D.candidates(budgets, tried, ngram, half_lives):
        if tried and run.allowance("decode") <= 0:
            break
        agg = D.score_settings(model, tok, run.task, recs, settings)
        tried[D.settings_key(settings)] = {"settings": settings, "score": agg[key], "metrics": agg}
        run.set_step("decode", tried=tried)
        run.log(f"[decode] {settings}: validation {key} {agg[key]:.2f}")
    chosen = D.best_settings(tried)
    assert chosen is not None
    save_generation_defaults(
        best, {**chosen, "do_sample": False}, lmforge_chosen_by=f"lmforge tune --task {run.task.name}: validation {key}"
    )
    run.set_step("decode", status="done", settings=chosen, candidates=len(tried))
