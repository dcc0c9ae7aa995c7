"""``lmforge export`` and ``lmforge generate`` on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.predict import GenerationConfig, generate
from lmforge.runs import save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog.\n"


def make_run(out: Path, model_cfg: dict) -> tuple[torch.nn.Module, object]:
    """A run directory with a ``best/`` checkpoint of a random model."""
    tok = char_tokenizer([TEXT])
    cfg = build_config({"model": model_cfg, "data": {"block_size": 48}})
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    cfg = cfg.model_copy(update={"model": model.config})
    save_checkpoint(out / "best", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)
    return model.eval(), tok


GPT2 = {"family": "transformer", "n_layer": 2, "d_model": 32, "n_head": 4}


def test_generate_streams_greedy_text(tmp_path, capsys):
    model, tok = make_run(tmp_path / "run", GPT2)
    assert main(["generate", str(tmp_path / "run"), "the quick", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    ids = generate(model, [tok.encode("the quick")], GenerationConfig(max_new_tokens=12)).sequences[0][0]
    assert out == "the quick" + tok.decode(ids) + "\n"


def test_generate_beams_print_every_sequence(tmp_path, capsys):
    model, tok = make_run(tmp_path / "run", {"family": "lstm", "n_layer": 1, "d_model": 16})
    rc = main(
        [
            "generate",
            str(tmp_path / "run" / "best"),
            "fox",
            "--num-beams",
            "5",
            "--num-return-sequences",
            "3",
            "--max-new-tokens",
            "6",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    ref = generate(model, [tok.encode("fox")], GenerationConfig(max_new_tokens=6, num_beams=5, num_return_sequences=3))
    for j, ids in enumerate(ref.sequences[0]):
        assert f"--- sequence {j + 1} (score {ref.scores[0][j]:.4f}" in out
        assert "fox" + tok.decode(ids) in out


def test_generate_sampling_is_seeded_and_stops(tmp_path, capsys):
    make_run(tmp_path / "run", GPT2)
    for seed in range(20):  # a seed whose sample is long enough to hold a stop string (deterministic)
        args = [
            "generate",
            str(tmp_path / "run"),
            "the",
            "--do-sample",
            "--seed",
            str(seed),
            "--top-k",
            "5",
            "--temperature",
            "1.5",
            "--max-new-tokens",
            "20",
            "--quiet",
        ]
        assert main(args) == 0
        first = capsys.readouterr().out
        if len(first) > 6:
            break
    assert main(args) == 0
    assert capsys.readouterr().out == first
    stop = first[3:5]  # a string the sampled completion contains: generation stops before it
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == first[: first.index(stop)] + "\n"


def test_generate_user_errors(tmp_path, capsys):
    make_run(tmp_path / "run", GPT2)
    assert main(["generate", str(tmp_path / "nothing"), "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "the", "--max-new-tokens", "60"]) == 2
    err = capsys.readouterr()
    assert "--max-new-tokens" in err.err and err.out == ""
    assert main(["generate", str(tmp_path / "run"), "the", "--num-beams", "0"]) == 2
    assert "--num-beams" in capsys.readouterr().err


def test_export_command(tmp_path, capsys):
    make_run(tmp_path / "run", GPT2)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--force"]) == 0
    capsys.readouterr()
    # the exported directory generates through the hf family like the original
    pytest.importorskip("transformers")
    assert main(["generate", str(tmp_path / "hf"), "the quick", "--max-new-tokens", "12", "--quiet"]) == 0
    via_hf = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "run"), "the quick", "--max-new-tokens", "12", "--quiet"]) == 0
    assert capsys.readouterr().out == via_hf


def test_export_recurrent_says_transformers_has_no_class(tmp_path, capsys):
    make_run(tmp_path / "run", {"family": "rcnn", "n_layer": 1, "d_model": 16})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "no Hugging Face transformers class" in out and "README.md" in out
    assert main(["generate", str(tmp_path / "out"), "fox", "--max-new-tokens", "4", "--quiet"]) == 0
