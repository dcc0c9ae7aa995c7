"""``lmforge export``: transformers load the exported directory and agree with lmforge (logits, greedy and
beam-search tokens, tokenizer); recurrent families come back through lmforge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lmforge.config import build_config  # noqa: E402
from lmforge.data.tokenizer import bpe_tokenizer, byte_tokenizer, char_tokenizer  # noqa: E402
from lmforge.export import ExportError, export_model  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.predict import GenerationConfig, generate  # noqa: E402
from lmforge.predict.loading import load_pretrained  # noqa: E402
from lmforge.runs import load_model, save_checkpoint  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs!\n"

GPT2 = {"family": "transformer", "n_layer": 2, "d_model": 32, "n_head": 4}
LLAMA = {
    "family": "transformer",
    "n_layer": 2,
    "d_model": 32,
    "n_head": 4,
    "n_kv_head": 2,
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "bias": False,
    "tie_embeddings": False,
}
FORMATS = {"gpt2": GPT2, "llama": LLAMA}


def make_checkpoint(path: Path, model_cfg: dict, tokenizer=None, block_size: int = 40, seed: int = 0):
    """An lmforge checkpoint of a random model whose logits are far from ties (weights scaled up)."""
    tokenizer = tokenizer or char_tokenizer([TEXT])
    cfg = build_config({"model": model_cfg, "data": {"block_size": block_size}})
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0)  # peaky next-token distributions: argmax decisions are not decided by rounding
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    cfg = cfg.model_copy(update={"model": model.config})
    save_checkpoint(path, model=model, config_yaml=cfg.to_yaml(), tokenizer=tokenizer)
    return model.eval(), tokenizer


@pytest.fixture(scope="module", params=list(FORMATS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model, tok = make_checkpoint(root / "ckpt", FORMATS[request.param])
    result = export_model(root / "ckpt", root / "hf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    return request.param, result, model, tok, hf


def test_files_and_format(exported):
    fmt, result, model, tok, hf = exported
    assert result.format == fmt and result.transformers_loadable
    names = {p.name for p in result.path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[fmt]
    gen = json.loads((result.path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == gen["pad_token_id"] == tok.eot_id


def test_logits_match(exported):
    _, _, model, tok, hf = exported
    idx = torch.randint(0, tok.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx)[0], rtol=0, atol=1e-5)


def _hf_generate(hf, prompt: list[int], eos: int, num_beams: int) -> tuple[list[list[int]], list[float] | None]:
    """HF's new tokens per returned sequence, cut before the first eos, and its beam scores."""
    out = hf.generate(
        torch.tensor([prompt]),
        eos_token_id=eos,
        pad_token_id=eos,
        do_sample=False,
        max_new_tokens=12,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        length_penalty=1.0,
        early_stopping=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    seqs = [row[: row.index(eos)] if eos in row else row for row in out.sequences[:, len(prompt) :].tolist()]
    scores = out.sequences_scores.tolist() if num_beams > 1 else None
    return seqs, scores


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_generate_matches_hf(exported, num_beams):
    _, _, model, tok, hf = exported
    prompts = [tok.encode("the quick"), tok.encode("pack my box with")]
    # end-of-sequence tokens the model actually produces, so that both stop (or finish beams) on them
    free = generate(
        model,
        prompts,
        GenerationConfig(max_new_tokens=12, num_beams=num_beams, num_return_sequences=num_beams, eos_token_id=[]),
    ).sequences
    ended = 0
    for eos in (tok.eot_id, free[0][0][5], free[1][-1][3]):
        # lmforge decodes both prompts in one left-padded batch; HF one prompt at a time
        ours = generate(
            model,
            prompts,
            GenerationConfig(max_new_tokens=12, num_beams=num_beams, num_return_sequences=num_beams, eos_token_id=eos),
        )
        for i, prompt in enumerate(prompts):
            seqs, scores = _hf_generate(hf, prompt, eos, num_beams)
            assert ours.sequences[i] == seqs, f"eos={eos} prompt={i}"
            if scores is not None:
                assert ours.scores[i] == pytest.approx(scores, abs=1e-4)
            ended += ours.finish_reasons[i].count("eos")
    assert ended > 0  # the eos path was exercised


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    samples = [TEXT, "the lazy dog\n\nquick  fox", "unseen: Zürich ✓", "fox<|endoftext|>dog", ""]
    kinds = (("char", char_tokenizer([TEXT])), ("byte", byte_tokenizer()), ("bpe", bpe_tokenizer([TEXT * 3], 280)))
    for kind, tok in kinds:
        make_checkpoint(tmp_path / kind, GPT2, tok)
        export_model(tmp_path / kind, tmp_path / f"{kind}_hf")
        auto = AutoTokenizer.from_pretrained(tmp_path / f"{kind}_hf")
        assert auto.eos_token_id == auto.bos_token_id == auto.pad_token_id == tok.eot_id
        for s in samples:
            ids = tok.encode(s)
            assert auto(s)["input_ids"] == ids, (kind, s)
            assert auto.decode(ids) == tok.decode(ids), (kind, s)


@pytest.mark.parametrize("family", ["lstm", "gru", "rcnn"])
def test_recurrent_export_loads_back_in_lmforge(tmp_path, family):
    model, tok = make_checkpoint(tmp_path / "ckpt", {"family": family, "n_layer": 2, "d_model": 24})
    result = export_model(tmp_path / "ckpt", tmp_path / "out")
    assert result.format == "lmforge" and not result.transformers_loadable
    assert "no Hugging Face transformers class" in result.message
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "transformers has no model class" in readme and family in readme
    back, tok2, cfg = load_model(tmp_path / "out")
    assert cfg.model.family == family and tok2.encode(TEXT) == tok.encode(TEXT)
    idx = torch.tensor([tok.encode(TEXT[:30])])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_unmappable_transformer_falls_back_to_lmforge_files(tmp_path):
    make_checkpoint(tmp_path / "ckpt", {**GPT2, "layout": "parallel"})
    result = export_model(tmp_path / "ckpt", tmp_path / "out")
    assert result.format == "lmforge" and "parallel" in result.message
    load_model(tmp_path / "out")


def test_existing_output_and_bad_dtype(tmp_path):
    make_checkpoint(tmp_path / "ckpt", GPT2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_model(tmp_path / "ckpt", tmp_path / "out")
    with pytest.raises(ExportError, match="dtype"):
        export_model(tmp_path / "ckpt", tmp_path / "out2", dtype="int8")
    export_model(tmp_path / "ckpt", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bfloat16_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = make_checkpoint(tmp_path / "ckpt", LLAMA)
    export_model(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_exported_dir_imports_back_as_hf_family(exported):
    """An exported directory loads through lmforge's ``hf`` family; its engine output equals the native model's."""
    _, result, model, tok, _ = exported
    wrapped, tok2, cfg = load_pretrained(result.path)
    assert cfg.model.family == "hf" and cfg.tokenizer.kind == "hf" and tok2.eot_id == tok.eot_id
    prompts = [tok.encode("the quick"), tok.encode("a"), tok.encode("pack my box")]
    for gen in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, num_beams=3)):
        assert generate(wrapped, prompts, gen).sequences == generate(model, prompts, gen).sequences
