"""#14 item 4: no code from a model folder ever runs. A Hugging Face folder whose ``config.json`` (or
``tokenizer_config.json``) has an ``auto_map`` naming a planted module is refused by ``generate``, ``eval`` and
``export`` with one line and exit status 2, before transformers sees the folder: the module, which writes a marker
file when imported, never runs, even when a user would answer "y" to transformers' prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lmforge.data.tokenizer import char_tokenizer  # noqa: E402
from lmforge.models.hf import RemoteCodeError, load_hf_causal_lm, refuse_remote_code  # noqa: E402
from lmforge.predict.loading import load_pretrained  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
TEXT = "the quick brown fox jumps over the lazy dog.\n"

PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("planted code ran")
from transformers import GPT2Config, GPT2LMHeadModel

class PlantedConfig(GPT2Config):
    model_type = "planted"

class PlantedModel(GPT2LMHeadModel):
    config_class = PlantedConfig
"""


def planted_folder(root: Path, where: str = "config.json") -> tuple[Path, Path]:
    """A tiny GPT-2 (weights, tokenizer.json) whose ``where`` maps the auto classes to ``planted.py``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, marker = root / "model", root / "MARKER"
    tok = char_tokenizer([TEXT])
    GPT2LMHeadModel(
        GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "planted.py").write_text(PLANTED.format(marker=str(marker)))
    auto_map = {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"}
    if where == "config.json":
        cfg = json.loads((folder / "config.json").read_text())
        # an architecture transformers does not know, so only the planted module could load it
        cfg.update(model_type="planted", architectures=["PlantedModel"], auto_map=auto_map)
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"auto_map": {"AutoTokenizer": ["planted.Tok", None]}})
        )
    return folder, marker


def lmforge(args: list[str], tmp: Path, stdin: str | None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "HF_HOME": str(tmp / "hf_home"),
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # only a hang on a prompt would reach it
    )


@pytest.mark.parametrize(
    ("command", "stdin"),
    [("generate", None), ("eval", None), ("export", None), ("generate", "y\n")],
    ids=["generate", "eval", "export", "generate-user-answers-y"],
)
def test_cli_refuses_a_folder_with_custom_code(tmp_path, command, stdin):
    folder, marker = planted_folder(tmp_path)
    args = {
        "generate": ["generate", str(folder), "the", "--max-new-tokens", "3"],
        "eval": ["eval", str(folder), "--data", "demo", "--max-examples", "2"],
        "export": ["export", str(folder), "--out", str(tmp_path / "exported")],
    }[command]
    proc = lmforge(args, tmp_path, stdin)
    assert not marker.exists(), "code from the model folder ran"
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "auto_map" in lines[0] and "planted.py" in lines[0], proc.stderr
    assert str(folder / "config.json") in lines[0]
    assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert not (tmp_path / "exported").exists()


def test_tokenizer_config_auto_map_is_refused_too(tmp_path):
    folder, marker = planted_folder(tmp_path, where="tokenizer_config.json")
    with pytest.raises(RemoteCodeError, match=r"tokenizer_config\.json: 'auto_map'.*planted\.py"):
        load_pretrained(folder)  # what finetune, export, generate, eval and serve load through
    with pytest.raises(RemoteCodeError):
        load_hf_causal_lm(folder)  # the hf family's own loader (an hf-family checkpoint rebuilds through it)
    assert not marker.exists()


def test_loader_never_trusts_remote_code(tmp_path, monkeypatch):
    """A clean folder loads, and transformers is told ``trust_remote_code=False`` (not left to prompt)."""
    import transformers

    folder, _ = planted_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("auto_map", "architectures"):
        cfg.pop(key)
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    refuse_remote_code(folder)  # nothing to refuse
    seen: list[object] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "not passed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_hf_causal_lm(folder)
    assert seen == [False]


def test_unreadable_config_is_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(Exception, match=r"config\.json: not readable JSON") as info:
        refuse_remote_code(folder)
    assert "\n" not in str(info.value)
