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
