"""A model's generation_config.json (as ``lmforge tune --task``'s decode step writes it) is the default of
``lmforge generate``, ``lmforge eval`` and ``lmforge export``; an explicit flag still overrides it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.export import export_model
from lmforge.predict.config import GenerationConfig
from lmforge.predict.generation_config import save_generation_defaults
from lmforge.predict.loading import load_pretrained
from lmforge.predict.tasks import predict_records
from support.finetune import make_gpt2_dir, write_jsonl
from support.tasks import summarization_records

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = " ".join(r["document"] for r in summarization_records(30, seed=3))
    path = make_gpt2_dir(tmp_path_factory.mktemp("hf") / "gpt2", text)
    save_generation_defaults(path, {"max_new_tokens": 3}, lmforge_chosen_by="test")
    return path


def _generated_tokens(capsys: pytest.CaptureFixture[str]) -> int:
    err = capsys.readouterr().err
    m = re.search(r"\[(\d+) tokens", err)
    assert m, err
    return int(m.group(1))


def test_generate_uses_model_defaults_and_flag_overrides(gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(gpt2), "the cat sat"]) == 0
    assert _generated_tokens(capsys) <= 3
    assert main(["generate", str(gpt2), "the cat sat", "--max-new-tokens", "9"]) == 0
    n = _generated_tokens(capsys)
    assert 3 < n <= 9


def test_eval_uses_model_defaults_and_flag_overrides(gpt2: Path, tmp_path: Path) -> None:
    records = summarization_records(4, seed=5)
    data = write_jsonl(tmp_path / "sum.jsonl", records)
    model, tok, _ = load_pretrained(gpt2, native=True)

    def reference(max_new: int) -> list[str]:
        return predict_records(model, tok, "summarization", records, config=GenerationConfig(max_new_tokens=max_new))[0]

    out = tmp_path / "report.json"
    assert main(["eval", str(gpt2), "--data", str(data), "--task", "summarization", "--json", str(out)]) == 0
    preds = [e["prediction"] for e in json.loads(out.read_text())["examples"]]
    assert preds == reference(3)
    assert main(["eval", str(gpt2), "--data", str(data), "--task", "summarization", "--json", str(out),
                 "--max-new-tokens", "8"]) == 0
    preds8 = [e["prediction"] for e in json.loads(out.read_text())["examples"]]
    assert preds8 == reference(8) and preds8 != preds


def test_export_carries_model_defaults(gpt2: Path, tmp_path: Path) -> None:
    export_model(gpt2, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert raw["max_new_tokens"] == 3
    assert "eos_token_id" in raw  # the exported model's own token ids are kept beside the defaults


def test_copy_bias_default_reaches_eval_and_export_and_a_flag_turns_it_off(gpt2: Path, tmp_path: Path) -> None:
    import shutil

    model_dir = tmp_path / "copying"
    shutil.copytree(gpt2, model_dir)
    save_generation_defaults(model_dir, {"max_new_tokens": 6, "copy_bias": 6.0, "source_bias": 1.0})
    # this random model says ":" (the prompt's last token) first; a ":" inside the document gives the copy
    # mechanism something to continue
    records = [{**r, "document": "note: " + r["document"]} for r in summarization_records(4, seed=5)]
    data = write_jsonl(tmp_path / "sum.jsonl", records)
    model, tok, _ = load_pretrained(model_dir, native=True)

    def reference(**kw: float) -> list[str]:
        return predict_records(model, tok, "summarization", records, config=GenerationConfig(max_new_tokens=6, **kw))[0]

    out = tmp_path / "report.json"
    base = ["eval", str(model_dir), "--data", str(data), "--task", "summarization", "--json", str(out)]
    assert main(base) == 0
    copied = [e["prediction"] for e in json.loads(out.read_text())["examples"]]
    assert copied == reference(copy_bias=6.0, source_bias=1.0)
    assert main([*base, "--copy-bias", "0", "--source-bias", "0"]) == 0
    plain = [e["prediction"] for e in json.loads(out.read_text())["examples"]]
    assert plain == reference() and plain != copied
    export_model(model_dir, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert raw["lmforge_copy_bias"] == 6.0 and raw["lmforge_source_bias"] == 1.0
    from transformers import GenerationConfig as HFGenerationConfig

    assert HFGenerationConfig.from_pretrained(tmp_path / "out").max_new_tokens == 6  # HF still reads the file
