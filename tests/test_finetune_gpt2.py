"""The seed-style example: fine-tune a tiny Hugging Face GPT-2 on train.txt for 3 epochs (block 128, batch 4,
checkpoints every 2 steps, the last 2 kept), then a 50-token, 5-beam summary with ``lmforge generate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main

pytest.importorskip("transformers")

QUIET = ["--train.progress", "false", "--data.cache_dir"]


def make_gpt2_dir(path: Path, text: str) -> Path:
    """A tiny random GPT-2 checkpoint with a byte-level BPE tokenizer.json made by `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


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
