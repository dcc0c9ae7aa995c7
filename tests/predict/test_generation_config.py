"""generation_config.json defaults: round trip, kept foreign keys, errors naming file and key, overrides win."""

from __future__ import annotations

import json

import pytest

from lmforge.predict.config import GenerationError
from lmforge.predict.generation_config import (
    GenerationDefaultsError,
    load_generation_defaults,
    save_generation_defaults,
    with_defaults,
)


def test_round_trip_keeps_token_ids(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "num_beams": 2}))
    save_generation_defaults(tmp_path, {"num_beams": 4, "length_penalty": 0.5}, lmforge_chosen_by="test")
    raw = json.loads((tmp_path / "generation_config.json").read_text())
    assert raw["eos_token_id"] == 3 and raw["num_beams"] == 4 and raw["lmforge_chosen_by"] == "test"
    assert load_generation_defaults(tmp_path) == {"num_beams": 4, "length_penalty": 0.5}


def test_run_dir_reads_best(tmp_path):
    (tmp_path / "best").mkdir()
    save_generation_defaults(tmp_path / "best", {"no_repeat_ngram_size": 3})
    assert load_generation_defaults(tmp_path) == {"no_repeat_ngram_size": 3}
    assert load_generation_defaults(tmp_path / "missing") == {}
    assert load_generation_defaults("hf:gpt2") == {}


def test_bad_file_names_file_and_key(tmp_path):
    f = tmp_path / "generation_config.json"
    f.write_text("{not json")
    with pytest.raises(GenerationDefaultsError, match="generation_config.json"):
        load_generation_defaults(tmp_path)
    f.write_text(json.dumps({"num_beams": 0}))
    with pytest.raises(GenerationDefaultsError, match="num_beams"):
        load_generation_defaults(tmp_path)
    with pytest.raises(GenerationError, match="unknown"):
        save_generation_defaults(tmp_path, {"beams": 2})


def test_overrides_win_and_none_means_unset():
    cfg = with_defaults({"num_beams": 4, "max_new_tokens": 30}, {"num_beams": 1, "max_new_tokens": None})
    assert cfg.num_beams == 1 and cfg.max_new_tokens == 30


def test_copy_bias_is_stored_under_lmforge_keys(tmp_path):
    chosen = {"copy_bias": 2.0, "source_bias": 0.5, "source_half_life": 16, "num_beams": 2}
    save_generation_defaults(tmp_path, chosen)
    raw = json.loads((tmp_path / "generation_config.json").read_text())
    assert raw["lmforge_copy_bias"] == 2.0 and raw["lmforge_source_bias"] == 0.5
    assert raw["lmforge_source_half_life"] == 16
    assert "copy_bias" not in raw and "source_bias" not in raw  # no key Hugging Face might one day claim
    assert load_generation_defaults(tmp_path) == chosen
    assert with_defaults(load_generation_defaults(tmp_path), {"copy_bias": 0.0}).copy_bias == 0.0  # a flag wins
    save_generation_defaults(tmp_path, {"num_beams": 1})  # rewritten: the old choices go
    assert load_generation_defaults(tmp_path) == {"num_beams": 1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"lmforge_copy_bias": "high"}))
    with pytest.raises(GenerationDefaultsError, match="lmforge_copy_bias"):
        load_generation_defaults(tmp_path)
