"""The seed-style example: fine-tune a tiny Hugging Face GPT-2 on train.txt for 3 epochs (block 128, batch 4,
checkpoints every 2 steps, the last 2 kept), then a 50-token, 5-beam summary with ``lmforge generate``."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.cli import main
from support.finetune import make_gpt2_dir

pytest.importorskip("transformers")

QUIET = ["--train.progress", "false", "--data.cache_dir"]




def test_seed_example_gpt2_finetune_then_beam_summary(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    animals, places = ["fox", "cat", "dog", "owl", "bee", "cow"], ["park", "garden", "forest", "street", "field"]
    text = "".join(
        f"The {animals[i % 6]} number {i} jumped over the {animals[(i + 1) % 6]} in the {places[i % 5]} "
        f"on a sunny day.\nTL;DR: {animals[i % 6]} {i} jumped.\n\n"
        for i in range(50)
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    make_gpt2_dir(tmp_path / "gpt2-dir", text)
    rc = main(
        [
            "finetune",
            "--model",
            "gpt2-dir",
            "--data",
            "train.txt",
            "--out",
            "ft",
            "--data.block_size",
            "128",
            "--train.max_epochs",
            "3",
            "--train.max_steps",
            "null",
            "--train.batch_size",
            "4",
            "--train.checkpoint_interval",
            "2",
            "--train.keep_last",
            "2",
            *QUIET,
            "cache",
        ]
    )
    assert rc == 0
    from lmforge.data import num_blocks, prepare_data
    from lmforge.predict.loading import load_pretrained

    _, tok, cfg = load_pretrained(tmp_path / "gpt2-dir")
    blocks = num_blocks(
        len(
            prepare_data(
                cfg.model_copy(
                    update={"data": cfg.data.model_copy(update={"path": "train.txt", "cache_dir": "cache"})}
                ),
                tok,
            ).train
        ),
        128,
    )
    steps = math.ceil(3 * blocks / 4)
    ckpts = sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir())
    last_even = steps - steps % 2 if steps % 2 else steps - 2
    assert ckpts == [f"step-{last_even:07d}", f"step-{steps:07d}"]  # keep_last 2; the final step is saved too
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == steps

    capsys.readouterr()
    rc = main(
        [
            "generate",
            "ft",
            "The fox number 7 jumped over the dog in the park on a sunny day.\nTL;DR:",
            "--num-beams",
            "5",
            "--max-new-tokens",
            "50",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "--- sequence 1" in out and "TL;DR:" in out
