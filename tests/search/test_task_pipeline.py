"""``lmforge tune --task``: the task pipeline end to end (from a tiny local GPT-2 with --init, and from scratch
with pretraining), its resume after a kill, and its refusal of bad input before anything is written."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.tasks import TaskDataError
from lmforge.evaluate import metrics as M
from lmforge.predict.generation_config import load_generation_defaults
from lmforge.report import build_report
from lmforge.search.task_pipeline import TaskPipelineError, TaskTuneOptions, run_task_pipeline
from support.finetune import make_gpt2_dir
from support.tasks import classification_records, summarization_records, translation_records, write_records

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    text = " ".join(r["text"] + " " + r["label"] for r in classification_records(80, seed=1))
    return make_gpt2_dir(tmp_path_factory.mktemp("hf") / "gpt2", text + " Label: TL;DR: pos neg")


def _run(opts: TaskTuneOptions) -> dict:
    """The pipeline with the report the CLI builds (lmforge.report delegates a task run to its task page)."""
    return run_task_pipeline(opts, finish=lambda run_dir: build_report(run_dir))


def _opts(out: Path, data: Path, task: str, budget: str, **kw) -> TaskTuneOptions:
    return TaskTuneOptions(out=str(out), task=task, data=str(data), budget=budget, verbose=False, **kw)


def _check_outputs(run: Path, records: list[dict], task: str) -> dict:
    """What every finished run must hold, checked against the records independently of the pipeline."""
    state = json.loads((run / "pipeline.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    split = state["split"]
    # the split is a partition of the records, the test part never used for fitting
    all_idx = split["train"] + split["val"] + split["test"]
    assert sorted(all_idx) == list(range(len(records)))
    assert set(split["test"]).isdisjoint(split["train"] + split["val"])
    assert summary["records"] == {s: len(split[s]) for s in ("train", "val", "test")}
    assert all(state["steps"][s]["status"] in ("done", "skipped") for s in state["steps"])
    assert (run / "best" / "COMPLETE").is_file()
    assert (run / "best" / "generation_config.json").is_file()
    with open(run / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["system"] == "model"
    assert {r["system"] for r in rows[1:]} == set(summary["baselines"])
    assert "Example predictions" in (run / "report.html").read_text()
    assert json.loads((run / "task.json").read_text())["task"] == task
    return summary


def test_tune_task_classification_from_gpt2_init(tmp_path: Path, gpt2_dir: Path) -> None:
    records = classification_records(40)
    data = write_records(tmp_path / "cls.jsonl", records)
    run = tmp_path / "run"
    _run(_opts(run, data, "classification", "12s", init=str(gpt2_dir)))
    summary = _check_outputs(run, records, "classification")
    state = json.loads((run / "pipeline.json").read_text())
    assert state["steps"]["pretrain"]["status"] == "skipped"
    # the majority baseline, recomputed here from the split: most frequent train+val label, scored on test
    fit = [records[i]["label"] for i in state["split"]["train"] + state["split"]["val"]]
    majority = min(Counter(fit).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    test_labels = [records[i]["label"] for i in state["split"]["test"]]
    expected = 100.0 * sum(lab == majority for lab in test_labels) / len(test_labels)
    assert summary["baselines"]["majority-label"]["accuracy"] == pytest.approx(expected)
    # the model's test accuracy is its predictions' (test_report.json) against the references
    report = json.loads((run / "test_report.json").read_text())
    preds = [e["prediction"] for e in report["examples"]]
    assert [e["reference"] for e in report["examples"]] == test_labels
    assert summary["test"]["accuracy"] == pytest.approx(M.accuracy(preds, test_labels))
    assert set(preds) <= {"pos", "neg"}  # label scoring: always a label
    # the fine-tuning started from the pretrained-start defaults (a small lr, linear decay)
    assert state["steps"]["search"]["lr_range"] == [1e-5, 5e-4]


def test_tune_task_translation_with_retrieval(tmp_path: Path, gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts with a retrieved training example: the model directory keeps the index, and ``lmforge eval``
    of the run directory builds the same test prompts and reproduces the pipeline's test metric."""
    import lmforge.search.task_search as ts
    from lmforge.cli import main

    monkeypatch.setattr(ts, "RETRIEVAL_K", (1,))  # the choice itself is the search's: here it is forced
    records = translation_records(40)
    data = write_records(tmp_path / "tr.jsonl", records)
    run = tmp_path / "run"
    summary = _run(_opts(run, data, "translation", "15s", init=str(gpt2_dir)))
    _check_outputs(run, records, "translation")
    state = json.loads((run / "pipeline.json").read_text())
    assert state["steps"]["search"]["winner_params"]["retrieval"] == 1
    assert summary["retrieval"] == {"k": 1, "searched": True} and state["steps"]["final"]["retrieval"] == 1
    saved = json.loads((run / "best" / "retrieval.json").read_text())
    # the index holds the training records only: no validation or test record can be retrieved
    assert saved["records"] == [records[i] for i in state["split"]["train"]]
    test = [records[i] for i in state["split"]["test"]]
    report = json.loads((run / "test_report.json").read_text())
    for ex, rec in zip(report["examples"], test, strict=True):
        shown, own = ex["prompt"].rsplit("\n\n", 1)
        assert own == f"{rec['source']}\nTranslation:"
        src, tgt = shown.split("\nTranslation: ")
        assert {"source": src, "target": tgt} in saved["records"] and src != rec["source"]
    test_file = write_records(tmp_path / "test.jsonl", test)
    assert main(["eval", str(run), "--data", str(test_file), "--json", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [e["prompt"] for e in again["examples"]] == [e["prompt"] for e in report["examples"]]
    assert again["metrics"]["bleu"] == pytest.approx(summary["test"]["bleu"])
    # an exported model keeps its index
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "retrieval.json").read_text()) == saved


@pytest.mark.slow
def test_tune_task_classification_from_scratch(tmp_path: Path) -> None:
    records = classification_records(60)
    data = write_records(tmp_path / "cls.jsonl", records)
    run = tmp_path / "run"
    _run(_opts(run, data, "classification", "45s"))
    _check_outputs(run, records, "classification")
    state = json.loads((run / "pipeline.json").read_text())
    assert state["steps"]["pretrain"]["status"] == "done"
    (start,) = state["steps"]["pretrain"]["candidates"].values()  # a tiny corpus: char only
    assert Path(start["start"], "COMPLETE").is_file()
    # the pretraining corpus holds the training records' text only: no test record leaks into it
    corpus = (run / "pretrain_corpus.jsonl").read_text()
    assert corpus.count("\n") == len(state["split"]["train"])


@pytest.mark.slow
def test_tune_task_searches_the_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text above CHAR_BELOW: a BPE and a char model are pretrained; the fine-tuning search picks between them."""
    import lmforge.search.task_plan as tp

    monkeypatch.setattr(tp, "CHAR_BELOW", 100)
    records = summarization_records(40)
    data = write_records(tmp_path / "sum.jsonl", records)
    run = tmp_path / "run"
    _run(_opts(run, data, "summarization", "60s"))
    _check_outputs(run, records, "summarization")
    state = json.loads((run / "pipeline.json").read_text())
    assert [c["kind"] for c in state["plan"]["candidates"]] == ["bpe", "char"]
    starts = state["steps"]["pretrain"]["candidates"]
    assert set(starts) == {"bpe", "char"} and all(Path(v["start"], "COMPLETE").is_file() for v in starts.values())
    assert state["steps"]["search"]["winner_params"]["start"] in starts
    assert state["steps"]["final"]["start"] == state["steps"]["search"]["winner_params"]["start"]
    # DIR/best holds the winner's tokenizer
    assert json.loads((run / "best" / "lmforge_tokenizer.json").read_text())["kind"] == state["steps"]["final"]["start"]


@pytest.mark.slow
def test_tune_task_summarization_from_scratch_decode_settings(tmp_path: Path) -> None:
    records = summarization_records(40)
    data = write_records(tmp_path / "sum.jsonl", records)
    run = tmp_path / "run"
    summary = _run(_opts(run, data, "summarization", "45s"))
    _check_outputs(run, records, "summarization")
    assert {"rouge1", "rouge2", "rougeL"} <= set(summary["test"])
    assert {"lead-k", "copy-source", "most-frequent-output"} == set(summary["baselines"])
    state = json.loads((run / "pipeline.json").read_text())
    tried = state["steps"]["decode"]["tried"]
    assert tried, "the decode step scored at least one setting"
    chosen = json.loads((run / "best" / "generation_config.json").read_text())
    best = max(tried.values(), key=lambda v: v["score"])
    assert best["score"] == max(v["score"] for v in tried.values())
    assert load_generation_defaults(run / "best") == {**best["settings"], "do_sample": False}  # serve: no sampling
    assert "lmforge_copy_bias" in chosen and "lmforge_source_bias" in chosen  # the copy mechanism was searched
    assert chosen["max_new_tokens"] in state["steps"]["decode"]["length_budgets"]


@pytest.mark.slow
def test_tune_task_resumes_after_kill(tmp_path: Path, gpt2_dir: Path) -> None:
    """SIGKILL while the search step runs; the same command then finishes the run with the same split."""
    data = write_records(tmp_path / "cls.jsonl", classification_records(40))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "tune", "--task", "classification", "--data", str(data),
           "--init", str(gpt2_dir), "--out", str(run), "--budget", "40s", "--quiet"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            state_file = run / "pipeline.json"
            if state_file.is_file() and (run / "ft").is_dir():
                state = json.loads(state_file.read_text())
                if state["steps"]["search"]["status"] == "running":
                    break
            assert proc.poll() is None, "the run ended before the search step started"
            time.sleep(0.2)
        else:
            pytest.fail("the search step never started")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = json.loads((run / "pipeline.json").read_text())
    assert first["steps"]["search"]["status"] == "running"
    assert not (run / "summary.json").exists()
    rc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-2000:]
    state = json.loads((run / "pipeline.json").read_text())
    assert state["split"] == first["split"]
    assert state["spent_s"]["search"] >= first["spent_s"]["search"]  # the killed run's time still counts
    assert json.loads(rc.stdout)["steps"]["evaluate"] == "done"


# ------------------------------------------------------------------------------------- bad input
def _refused(tmp_path: Path, records: list[dict], task: str, err: type[Exception] = TaskDataError) -> str:
    data = write_records(tmp_path / "bad.jsonl", records)
    out = tmp_path / "run"
    with pytest.raises(err) as info:
        run_task_pipeline(_opts(out, data, task, "20s"))
    assert not out.exists(), "a refused input leaves no run directory behind"
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_refuses_record_without_role_field(tmp_path: Path) -> None:
    recs = classification_records(20)
    del recs[2]["label"]
    msg = _refused(tmp_path, recs, "classification")
    assert "bad.jsonl:3" in msg and "'label'" in msg


def test_refuses_empty_target(tmp_path: Path) -> None:
    recs = summarization_records(20)
    recs[4]["summary"] = "  "
    msg = _refused(tmp_path, recs, "summarization")
    assert "bad.jsonl:5" in msg and "'summary'" in msg and "empty" in msg


def test_refuses_single_label(tmp_path: Path) -> None:
    recs = [{"text": f"text {i}", "label": "pos"} for i in range(20)]
    msg = _refused(tmp_path, recs, "classification")
    assert "bad.jsonl" in msg and "'label'" in msg and "single label 'pos'" in msg


def test_refuses_more_labels_than_records(tmp_path: Path) -> None:
    recs = [{"text": f"text {i}", "label": f"label {i}"} for i in range(20)]
    msg = _refused(tmp_path, recs, "classification")
    assert "bad.jsonl" in msg and "'label'" in msg and "20 different labels" in msg


def test_refuses_too_few_records_to_split(tmp_path: Path) -> None:
    msg = _refused(tmp_path, classification_records(6), "classification")
    assert "bad.jsonl" in msg and "6 records are too few" in msg


def test_refuses_target_longer_than_context(tmp_path: Path) -> None:
    recs = summarization_records(20)
    recs[7]["summary"] = "a long summary " * 60  # 900 characters: no char-level context of 512 holds it
    msg = _refused(tmp_path, recs, "summarization")
    assert "bad.jsonl:8" in msg and "'summary'" in msg and "context" in msg


def test_refuses_target_longer_than_init_context(tmp_path: Path, gpt2_dir: Path) -> None:
    recs = classification_records(20)
    recs[0]["label"] = " ".join(f"w{i}" for i in range(300))  # GPT-2 dir: 256 positions
    data = write_records(tmp_path / "bad.jsonl", recs)
    out = tmp_path / "run"
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:1: field 'label'.*context of 256"):
        run_task_pipeline(_opts(out, data, "classification", "20s", init=str(gpt2_dir)))
    assert not out.exists()


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    recs = classification_records(20)
    recs[1] = {"text": "no label here"}
    data = write_records(tmp_path / "bad.jsonl", recs)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rc = subprocess.run(
        [sys.executable, "-m", "lmforge", "tune", "--task", "classification", "--data", str(data), "--out", str(out),
         "--budget", "20s"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert rc.returncode != 0
    lines = [ln for ln in rc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.jsonl:2" in lines[0] and "'label'" in lines[0]
    assert not out.exists()


def test_task_options_refuse_token_budget(tmp_path: Path) -> None:
    data = write_records(tmp_path / "cls.jsonl", classification_records(20))
    with pytest.raises(TaskPipelineError, match="time budget"):
        run_task_pipeline(_opts(tmp_path / "run", data, "classification", "50ktok"))
    assert not (tmp_path / "run").exists()
