"""Step 1 of ``lmforge tune --task``, ``pretrain``: a language model on the task's own text.

Without ``--init``: every field of the training records (one document per record) plus any ``--corpus``,
searched and trained by the plain ``lmforge tune`` pipeline in ``DIR/pretrain-NAME`` (its own resumable
run) for each tokenizer candidate NAME of the plan (:func:`lmforge.search.task_plan.plan_tokenizers`), the
step's share split between them by their ``weight`` (time one leaves passes to the next). With ``--init``: skipped, the fine-tuning starts from that checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.config import build_config
from lmforge.data.sources import read_documents
from lmforge.search.budget import format_amount
from lmforge.search.finetune import pretrain_lm
from lmforge.search.pipeline import NoFinishedTrial, TuneOptions, run_pipeline
from lmforge.search.task_plan import TaskPipelineError, record_text
from lmforge.search.task_run import MIN_TRIAL_S, TaskRun

PRETRAIN_MIN_S = 30.0
"""The shortest pretraining search that finishes a trial on a loaded 2-core machine (data preparation and
the search's own start-up come first); a smaller share is raised to it, overrunning a tiny budget."""
FALLBACK_MODEL = {"n_layer": 2, "d_model": 64, "n_head": 4}
"""The pretrained model when the pretraining search finishes no trial in its time."""


def step_pretrain(run: TaskRun) -> None:
    plan = run.state["plan"]
    if plan.get("init"):
        run.set_step("pretrain", status="skipped", reason=f"--init {plan['init']}")
        return
    corpus = run.run_dir / "pretrain_corpus.jsonl"
    if not corpus.is_file():
        docs = [record_text(run.task, r) for r in run.records("train")]
        for c in plan["corpus"]:
            docs += read_documents(c).texts
        atomic_write_text(corpus, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    run.set_step("pretrain", status="running")
    done: dict[str, dict[str, Any]] = dict(run.state["steps"]["pretrain"].get("candidates") or {})
    todo = [c for c in plan["candidates"] if "start" not in done.get(c["name"], {})]
    for i, cand in enumerate(todo):
        entry = done.setdefault(cand["name"], {})
        if "budget_s" not in entry:
            weights = [float(c.get("weight", 1.0)) for c in todo[i:]]
            share = run.allowance("pretrain") * weights[0] / sum(weights)
            if share < PRETRAIN_MIN_S:
                run.log(
                    f"[pretrain] {cand['name']}: its share ({share:.0f}s) is raised to {PRETRAIN_MIN_S:.0f}s: "
                    "the budget will be overrun (give a larger --budget, or --init a pretrained model)"
                )
            entry["budget_s"] = round(max(share, PRETRAIN_MIN_S), 1)
            run.set_step("pretrain", candidates=done)
        entry.update(_pretrain_one(run, cand, corpus, entry))
        run.set_step("pretrain", candidates=done)
    run.set_step("pretrain", status="done")


def _pretrain_one(run: TaskRun, cand: dict[str, Any], corpus: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Pretrain the candidate ``cand`` (the plain ``lmforge tune`` search in ``DIR/pretrain-NAME``) -> what
    to record (``start``: its best checkpoint)."""
    pre = run.run_dir / f"pretrain-{cand['name']}"
    inner = TuneOptions(
        out=str(pre),
        data=str(corpus),
        budget=f"{max(1.0, entry['budget_s']):.1f}s",
        seed=run.opts.seed,
        overrides=[
            "--tokenizer.kind", cand["kind"],
            "--tokenizer.vocab_size", str(cand["vocab_size"]),
            "--data.block_size", str(cand["block_size"]),
        ],
        verbose=run.opts.verbose,
        progress_interval=30.0,
    )
    inner.started = time.monotonic()
    run.log(
        f"[pretrain] a language model on the task's text ({cand['kind']} {cand['vocab_size']}, "
        f"context {cand['block_size']}), {format_amount(entry['budget_s'], 'time')}"
    )
    if not entry.get("fallback"):
        try:
            summary = run_pipeline(inner)
        except NoFinishedTrial:
            entry["fallback"] = True
            run.save()
        else:
            best = summary.get("best") or {}
            return {
                "start": str(pre / "best"),
                "test_loss": best.get("test_loss"),
                "config": best.get("values"),
                "params": best.get("params"),
            }
    # the search finished no trial in its time (a tiny budget on a loaded machine): one small transformer,
    # trained for what is left of the candidate's share
    seconds = max(MIN_TRIAL_S * 2, entry["budget_s"] - (time.monotonic() - inner.started))
    run.log(f"[pretrain] the search finished no trial: a {FALLBACK_MODEL} transformer for {seconds:.0f}s instead")
    out = run.run_dir / f"pretrain-{cand['name']}-fallback"
    cfg = build_config(
        {
            "data": {"path": str(corpus), "block_size": cand["block_size"]},
            "tokenizer": {"kind": cand["kind"], "vocab_size": cand["vocab_size"]},
            "model": {"family": "transformer", **FALLBACK_MODEL},
            "optim": {"lr": 3e-3},
            "train": {"max_steps": None, "max_time": seconds, "batch_size": 8, "eval_interval": 25,
                      "eval_batches": 4, "progress": False, "resume": "auto", "seed": run.opts.seed},
            "schedule": {"name": "cosine", "horizon": "time", "warmup_steps": 10},
        }
    )
    pretrain_lm(cfg, out)
    if not (out / "best" / "COMPLETE").is_file():
        raise TaskPipelineError("pretrain: no model trained; give a larger --budget, or --init a pretrained model")
    return {"start": str(out / "best"), "config": {"model": FALLBACK_MODEL}}
