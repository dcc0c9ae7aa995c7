"""``lmforge finetune`` and ``lmforge eval`` end to end on tiny checkpoints (lmforge and Hugging Face GPT-2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from support.finetune import QUIET, write_jsonl


def sentiment(n: int, offset: int = 0) -> list[dict]:
    words = ["good", "bad", "fine"]
    labels = ["pos", "neg", "pos"]
    return [{"review": f"a {words[i % 3]} film number {i + offset}", "sentiment": labels[i % 3]} for i in range(n)]


@torch.no_grad()
def brute_completion_loss(ckpt: Path, records: list[dict]) -> float:
    """Mean NLL of the completion tokens (" label" and end of text) after the prompt, per token."""
    from lmforge.runs import load_model

    model, tok, _ = load_model(ckpt)
    model.eval()
    total, count = 0.0, 0
    for r in records:
        prompt = tok.encode(f"{r['review']}\nLabel:")
        completion = tok.encode(" " + r["sentiment"]) + [tok.eot_id]
        ids = prompt + completion
        logits, _ = model(torch.tensor([ids[:-1]]))
        logp = torch.log_softmax(logits[0].double(), -1)
        for j, target in enumerate(completion):
            total -= float(logp[len(prompt) - 1 + j, target])
            count += 1
    return total / count


def test_classification_loss_is_on_completions_and_eval_reads_task(base_ckpt, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment(12))
    val_records = sentiment(5, offset=100)
    val = write_jsonl(tmp_path / "val.jsonl", val_records)
    out = tmp_path / "ft"
    # a learning rate of 1e-9 leaves the weights as they are: the first validation loss is the base
    # model's loss on the completion tokens only
    rc = main(
        [
            "finetune",
            "--model",
            str(base_ckpt),
            "--data",
            str(train),
            "--task",
            "classification",
            "--fields",
            "text=review,label=sentiment",
            "--out",
            str(out),
            "--data.val_path",
            str(val),
            "--train.max_steps",
            "1",
            "--train.batch_size",
            "4",
            "--optim.lr",
            "1e-9",
            *QUIET,
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["val_loss"] == pytest.approx(brute_completion_loss(base_ckpt, val_records), abs=1e-4)
    info = json.loads((out / "task.json").read_text())
    assert info == {
        "task": "classification",
        "fields": {"text": "review", "label": "sentiment"},
        "labels": ["neg", "pos"],
    }

    # eval without --task/--fields: both come from the run's task.json
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(val), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == "classification" and report["info"]["labels"] == ["neg", "pos"]
    assert {"accuracy", "macro_f1", "completion_ppl"} <= set(report["metrics"])
    assert len(report["examples"]) == 5
    for ex, r in zip(report["examples"], val_records, strict=True):
        assert ex["prompt"] == f"{r['review']}\nLabel:" and ex["reference"] == r["sentiment"]
        assert ex["prediction"] in ("neg", "pos") and ex["scores"]["correct"] in (0.0, 100.0)
    accuracy = 100 * sum(e["prediction"] == e["reference"] for e in report["examples"]) / 5
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert "accuracy" in capsys.readouterr().out


def test_lm_finetune_and_perplexity(base_ckpt, tmp_path, capsys):
    corpus = tmp_path / "train.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    out = tmp_path / "lm"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(base_ckpt),
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--data.block_size",
                "32",
                "--train.max_epochs",
                "1",
                "--train.max_steps",
                "null",
                "--train.batch_size",
                "8",
                "--optim.lr",
                "3e-3",
                *QUIET,
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    # one epoch of blocks, derived schedule length: (1800 chars + eot, 10% held out) -> blocks // 8 per step
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 5 <= metrics[-1]["step"] <= 7
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(corpus), "--json", str(tmp_path / "lm.json")]) == 0
    report = json.loads((tmp_path / "lm.json").read_text())
    assert report["task"] == "lm"
    m = report["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    base = tmp_path / "base.json"
    assert main(["eval", str(base_ckpt), "--data", str(corpus), "--json", str(base)]) == 0
    assert m["perplexity"] < json.loads(base.read_text())["metrics"]["perplexity"]  # fine-tuning helped


def test_user_errors_are_one_line(base_ckpt, tmp_path, capsys):
    corpus = tmp_path / "train.txt"
    corpus.write_text("abc " * 200, encoding="utf-8")

    def finetune(model, *extra: str) -> int:
        return main(["finetune", "--model", str(model), "--data", str(corpus), "--out", str(tmp_path / "x"), *extra])

    assert finetune(base_ckpt, "--model.n_layer", "3") == 2
    assert "cannot change model.n_layer" in capsys.readouterr().err
    assert finetune(base_ckpt, "--task", "classification") == 2
    assert "plain text is for --task lm" in capsys.readouterr().err
    assert finetune(tmp_path / "missing") == 2
    assert "missing" in capsys.readouterr().err


def test_cli_task_choices_match_the_task_registry():
    from lmforge.config import TASK_NAMES
    from lmforge.data.tasks import TASKS

    assert TASK_NAMES == ("lm", *TASKS)
