"""build_model and the family registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.config import ConfigError, RCNNConfig, RecurrentConfig, TransformerConfig
from lmforge.models import _REGISTRY as REGISTRY
from lmforge.models import (
    LanguageModel,
    RCNNModel,
    RecurrentModel,
    TransformerModel,
    available_families,
    build_model,
    register_model,
)


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        (TransformerConfig(n_layer=1, d_model=16, n_head=2), TransformerModel),
        (RecurrentConfig(family="lstm", n_layer=1, d_model=16), RecurrentModel),
        (RecurrentConfig(family="gru", n_layer=1, d_model=16), RecurrentModel),
        (RCNNConfig(n_layer=1, d_model=16), RCNNModel),
    ],
)
def test_builds_each_family_and_resolves_the_config(cfg, cls):
    m = build_model(cfg, vocab_size=40, max_seq_len=12)
    assert isinstance(m, cls)
    assert m.config.vocab_size == 40 and cfg.vocab_size is None  # the caller's config is not mutated
    assert getattr(m.config, "max_seq_len", 12) == 12
    again = build_model(m.config)
    assert again.config == m.config
    again.load_state_dict(m.state_dict())


def test_config_vocab_size_wins_when_larger_and_errors_when_smaller():
    cfg = TransformerConfig(n_layer=1, d_model=16, n_head=2, vocab_size=64, max_seq_len=8)
    assert build_model(cfg, vocab_size=50).wte.num_embeddings == 64
    with pytest.raises(ConfigError, match=r"model.vocab_size = 64 .* \(65\)"):
        build_model(cfg, vocab_size=65)


def test_missing_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_model(RecurrentConfig(d_model=8))
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        build_model(TransformerConfig(n_layer=1, d_model=16, n_head=2), vocab_size=10)


def test_dict_configs_are_validated():
    m = build_model({"family": "gru", "n_layer": 1, "d_model": 8}, vocab_size=10)
    assert isinstance(m, RecurrentModel) and m.config.family == "gru"
    assert isinstance(
        build_model({"n_layer": 1, "d_model": 8, "n_head": 2}, vocab_size=10, max_seq_len=4), TransformerModel
    )
    with pytest.raises(ConfigError, match="n_head"):
        build_model({"n_layer": 1, "d_model": 10, "n_head": 3}, vocab_size=10, max_seq_len=4)


def test_register_a_new_family():
    class Bigram(LanguageModel):
        def __init__(self, cfg):
            super().__init__()
            self.config = cfg
            self.table = torch.nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    saved = REGISTRY.get("gru")
    try:
        assert register_model("gru")(Bigram) is Bigram
        m = build_model(RecurrentConfig(family="gru"), vocab_size=7)
        assert isinstance(m, Bigram) and m.config.vocab_size == 7
    finally:
        REGISTRY["gru"] = saved


def test_unknown_family_is_a_config_error():
    cfg = RecurrentConfig().model_copy(update={"family": "nope"})  # model_copy skips validation
    with pytest.raises(ConfigError, match="model.family = 'nope': unknown"):
        build_model(cfg, vocab_size=3)


def test_hf_family_is_lazy_and_models_do_not_import_transformers():
    assert "hf" in available_families()
    code = "import sys, lmforge.models, lmforge.models.hf_mapping; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
