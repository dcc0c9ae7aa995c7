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
from lmforge.runs import save_checkpoint  # noqa: E402

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


def _hf_greedy_and_beam(path: Path, prompt: list[int], new: int) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    idx = torch.tensor([prompt])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    greedy = ref.generate(idx, **kw)[0, len(prompt) :].tolist()
    beam = ref.generate(idx, num_beams=3, early_stopping=False, **kw)[0, len(prompt) :].tolist()
    return greedy, beam


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_native_load_runs_hf_gpt2_and_llama_as_lmforge_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.models.transformer import TransformerModel
    from support.finetune import make_gpt2_dir

    path = save_hf_llama(tmp_path / "m")[0] if arch == "llama" else make_gpt2_dir(tmp_path / "m", TEXT * 20)
    model, tokenizer, cfg = load_pretrained(path, native=True)
    assert isinstance(model, TransformerModel) and not model.training
    assert cfg.model.family == "transformer" and cfg.tokenizer.kind == "hf" and cfg.tokenizer.path == str(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref(input_ids=idx).logits, rtol=0, atol=1e-5)
    prompt = tokenizer.encode("hello")
    greedy, beam = _hf_greedy_and_beam(path, prompt, 8)
    gen = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    assert generate(model, [prompt], gen).sequences[0][0] == greedy
    gen = GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=[])
    assert generate(model, [prompt], gen).sequences[0][0] == beam


def test_native_load_keeps_what_does_not_map_wrapped(tmp_path):
    """A GPT-2 variant lmforge's transformer does not reproduce (attention scaled by 1 / layer index)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from support.finetune import make_gpt2_dir

    path = make_gpt2_dir(tmp_path / "m", TEXT * 20)
    cfg = GPT2Config.from_pretrained(path)
    cfg.scale_attn_by_inverse_layer_idx = True
    GPT2LMHeadModel(cfg).save_pretrained(path)
    model, _, run_cfg = load_pretrained(path, native=True)
    assert isinstance(model, HFCausalLM) and run_cfg.model.family == "hf"


def test_native_load_of_a_fine_tuned_hf_checkpoint_keeps_its_weights(tmp_path):
    path, _ = save_hf_llama(tmp_path / "llama")
    model, tok, cfg = load_pretrained(path)
    with torch.no_grad():
        model.hf.lm_head.weight.add_(0.5)  # "fine-tuned"
    save_checkpoint(tmp_path / "ft", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)
    native, _, native_cfg = load_pretrained(tmp_path / "ft", native=True)
    wrapped, _, _ = load_pretrained(tmp_path / "ft")
    assert native_cfg.model.family == "transformer" and isinstance(wrapped, HFCausalLM)
    idx = torch.randint(0, tok.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(native(idx)[0], wrapped(idx)[0], rtol=0, atol=1e-5)


def test_generate_eval_and_serve_load_natively(tmp_path, monkeypatch):
    import lmforge.models.hf as hf_module
    from lmforge.cli import main
    from lmforge.serve.app import load_app

    path, _ = save_hf_llama(tmp_path / "llama")
    calls = []
    real = hf_module.native_transformer
    monkeypatch.setattr(hf_module, "native_transformer", lambda m: calls.append(1) or real(m))
    assert main(["generate", str(path), "hello", "--max-new-tokens", "3", "--quiet"]) == 0
    (tmp_path / "valid.txt").write_text(TEXT * 3, encoding="utf-8")
    assert main(["eval", str(path), "--data", str(tmp_path / "valid.txt")]) == 0
    app = load_app(path)
    assert app.state.server.model.config.family == "transformer"
    assert calls == [1, 1, 1]


def test_native_load_keeps_the_wrapped_model_when_a_copy_would_not_fit(tmp_path, monkeypatch):
    import lmforge.models.memory as memory_module

    path, _ = save_hf_llama(tmp_path / "llama")
    monkeypatch.setattr(memory_module, "free_memory", lambda device: 1000)
    with pytest.warns(RuntimeWarning, match="no room for a copy"):
        model, _, cfg = load_pretrained(path, native=True)
    assert isinstance(model, HFCausalLM) and cfg.model.family == "hf"
