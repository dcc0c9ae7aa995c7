"""``load_pretrained``: lmforge run/checkpoint directories and Hugging Face directories behind one call; an
``hf``-family checkpoint (a fine-tuned HF model) saves, reloads and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lmforge.config import build_config  # noqa: E402
from lmforge.data.tokenizer import char_tokenizer  # noqa: E402
from lmforge.export import export_model  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.models.hf import HFCausalLM  # noqa: E402
from lmforge.predict import GenerationConfig, generate  # noqa: E402
from lmforge.predict.loading import ModelLoadError, load_pretrained, resolve_checkpoint  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402

TEXT = "hello world, a tiny corpus for a tiny tokenizer.\n"


def save_hf_llama(path: Path) -> tuple[Path, object]:
    """A tiny random Llama with a tokenizers-made tokenizer saved through PreTrainedTokenizerFast (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = char_tokenizer([TEXT])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eot_token, bos_token=tok.eot_token)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size + 3,
        max_position_embeddings=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path, tok


def test_hf_dir_loads_as_hf_family(tmp_path):
    from transformers import AutoModelForCausalLM

    path, tok = save_hf_llama(tmp_path / "llama")
    model, tokenizer, cfg = load_pretrained(path)
    assert isinstance(model, HFCausalLM) and not model.training
    assert cfg.model.family == "hf" and cfg.tokenizer.kind == "hf" and cfg.tokenizer.path == str(path)
    assert cfg.data.block_size <= 40 and model.max_seq_len == 40
    assert tokenizer.eot_id == tok.eot_id and tokenizer.encode(TEXT) == tok.encode(TEXT)
    # greedy through lmforge's engine == HF's own greedy generate (the model's vocab is larger than the tokenizer's)
    prompt = tok.encode("hello")
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=10, eos_token_id=[])).sequences[0][0]
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_hf_family_checkpoint_saves_reloads_and_exports(tmp_path):
    """What fine-tuning an imported model produces: an lmforge checkpoint of family ``hf``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tok = save_hf_llama(tmp_path / "llama")
    model, tokenizer, cfg = load_pretrained(path)
    with torch.no_grad():
        model.hf.lm_head.weight.add_(0.5)  # "fine-tuned" weights that differ from the original directory
    save_checkpoint(tmp_path / "run" / "best", model=model, config_yaml=cfg.to_yaml(), tokenizer=tokenizer)
    back, tok2, cfg2 = load_pretrained(tmp_path / "run")  # a run directory resolves to best/
    assert cfg2.model.family == "hf" and tok2.encode(TEXT) == tok.encode(TEXT)
    idx = torch.tensor([tok.encode(TEXT[:20])])
    with torch.no_grad():
        expected = model(idx)[0]
        torch.testing.assert_close(back(idx)[0], expected, rtol=0, atol=0)
    result = export_model(tmp_path / "run", tmp_path / "out")
    assert result.format == "hf" and result.transformers_loadable
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, expected, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello")["input_ids"] == tok.encode("hello")


def test_run_dir_resolution(tmp_path):
    tok = char_tokenizer([TEXT])
    cfg = build_config({"model": {"family": "gru", "n_layer": 1, "d_model": 16}, "data": {"block_size": 16}})
    model = build_model(cfg.model, vocab_size=tok.vocab_size)
    cfg = cfg.model_copy(update={"model": model.config})
    for step in (10, 20):
        save_checkpoint(
            tmp_path / "run" / "checkpoints" / f"step-{step:07d}", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok
        )
    assert resolve_checkpoint(tmp_path / "run").name == "step-0000020"  # no best/: the newest checkpoint
    save_checkpoint(tmp_path / "run" / "best", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)
    assert resolve_checkpoint(tmp_path / "run").name == "best"
    loaded, _, cfg2 = load_pretrained(tmp_path / "run")
    assert cfg2.model.family == "gru" and not loaded.training


def test_user_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with pytest.raises(ModelLoadError, match="without a complete checkpoint"):
        load_pretrained(tmp_path / "run")
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_pretrained(tmp_path / "notok")
    with pytest.raises(ModelLoadError, match="hf:NAME"):
        load_pretrained("hf:")
