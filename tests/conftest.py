"""Fixtures shared by several test modules."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lmforge.config import TransformerConfig, build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.runs import save_checkpoint
from lmforge.train.compile import LEDGER_FILE, cache_dir

# train.compile auto reads and writes measurements under LMFORGE_CACHE_DIR: tests keep theirs (and any
# compiled artefacts) apart from the user's cache, and each test starts without the measurements of the
# tests before it (one that compiled made `auto` compile in a later one: a cold DDP compile outlasted the
# launcher's 30-s SIGTERM grace in CI)
if "LMFORGE_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lmforge-test-cache-")
    os.environ["LMFORGE_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_compile_measurements_from_earlier_tests() -> None:
    (cache_dir() / LEDGER_FILE).unlink(missing_ok=True)

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?()\n"


@pytest.fixture()
def base_ckpt(tmp_path: Path) -> Path:
    """A tiny random lmforge transformer checkpoint with a char tokenizer (the fine-tuning tests' base)."""
    tok = char_tokenizer([ALPHABET])
    torch.manual_seed(0)
    model = build_model(TransformerConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=64), vocab_size=tok.vocab_size)
    cfg = build_config({"data": {"block_size": 64}, "model": model.config.model_dump(mode="json")})
    return save_checkpoint(tmp_path / "base", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)
