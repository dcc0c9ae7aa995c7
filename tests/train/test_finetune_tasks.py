"""``lmforge finetune``: every task runs and evaluates; an interrupted fine-tune resumes exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from lmforge.cli import main

# the base checkpoint fixture is in conftest.py; these helpers are shared with the CLI tests
from support.finetune import QUIET, write_jsonl


def test_resume_equals_uninterrupted(base_ckpt, tmp_path):
    data = write_jsonl(
        tmp_path / "train.jsonl", [{"text": f"add {i} and {i % 4}", "parse": f"(add {i} {i % 4})"} for i in range(10)]
    )
    common = [
        "--model",
        str(base_ckpt),
        "--data",
        str(data),
        "--task",
        "semantic-parsing",
        "--train.batch_size",
        "3",
        "--train.eval_interval",
        "2",
        "--train.deterministic",
        "true",
        "--schedule.total_steps",
        "6",
        "--schedule.warmup_steps",
        "1",
        *QUIET,
        str(tmp_path / "cache"),
    ]
    assert main(["finetune", *common, "--out", str(tmp_path / "a"), "--train.max_steps", "6"]) == 0
    assert main(["finetune", *common, "--out", str(tmp_path / "b"), "--train.max_steps", "3"]) == 0
    assert (
        main(["finetune", *common, "--out", str(tmp_path / "b"), "--train.max_steps", "6", "--train.resume", "auto"])
        == 0
    )
    wa = load_file(tmp_path / "a" / "checkpoints" / "step-0000006" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoints" / "step-0000006" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(base_ckpt / "model.safetensors")
    assert not all(torch.equal(base[k], wa[k]) for k in wa)  # it did train


def test_every_task_runs_and_evaluates(base_ckpt, tmp_path):
    data = {
        "summarization": [{"document": f"the cat {i} sat on the mat.", "summary": f"cat {i} sat"} for i in range(6)],
        "translation": [{"source": f"hello {i}", "target": f"ellohay {i}"} for i in range(6)],
        "generation": [{"prompt": f"count {i}:", "completion": f" {i + 1}"} for i in range(6)],
        "chat": [
            {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(6)
        ],
    }
    expected = {"summarization": "rougeL", "translation": "chrf", "generation": "exact_match", "chat": "rouge1"}
    for task, records in data.items():
        path = write_jsonl(tmp_path / f"{task}.jsonl", records)
        out = tmp_path / task
        assert (
            main(
                [
                    "finetune",
                    "--model",
                    str(base_ckpt),
                    "--data",
                    str(path),
                    "--task",
                    task,
                    "--out",
                    str(out),
                    "--train.max_steps",
                    "2",
                    "--train.batch_size",
                    "2",
                    *QUIET,
                    str(tmp_path / "cache"),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "eval",
                    str(out),
                    "--data",
                    str(path),
                    "--max-examples",
                    "2",
                    "--max-new-tokens",
                    "6",
                    "--json",
                    str(out / "r.json"),
                ]
            )
            == 0
        )
        report = json.loads((out / "r.json").read_text())
        assert report["task"] == task and expected[task] in report["metrics"], task
        assert all({"prompt", "reference", "prediction", "scores"} <= set(e) for e in report["examples"])
