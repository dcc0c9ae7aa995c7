"""Config: typed sections, overrides, cross-field rules; every error names the field and the value."""

import pytest
import yaml

from lmforge.config import ConfigError, RecurrentConfig, RunConfig, TransformerConfig, load_config, parse_duration


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and isinstance(cfg.model, TransformerConfig)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": {"n_layer": 2, "d_model": 64}, "optim": {"lr": 1e-2}}))
    cfg = load_config(f, ["--model.n_layer", "4", "--optim.lr", "3e-3", "--train.max_time=10m"])
    assert cfg.model.n_layer == 4 and cfg.model.d_model == 64
    assert cfg.optim.lr == pytest.approx(3e-3)
    assert cfg.train.max_time == 600.0


def test_family_switch_drops_other_family_options():
    cfg = load_config(overrides=["--model.n_head", "8", "--model.family", "lstm", "--model.n_layer", "3"])
    assert isinstance(cfg.model, RecurrentConfig) and cfg.model.family == "lstm" and cfg.model.n_layer == 3


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--model.n_head", "5"], ["model", "d_model (128)", "n_head (5)"]),
        (["--model.nlayer", "4"], ["model.nlayer", "unknown key"]),
        (["--optim.lr", "-1"], ["optim.lr", "-1"]),
        (["--optim.lr", "nan"], ["optim.lr", "nan"]),
        (["--data.block_size", "256", "--model.max_seq_len", "128"], ["data.block_size (256)", "model.max_seq_len (128)"]),
        (["--model.family", "cnn"], ["model.family", "cnn"]),
        (["--model.family", "lstm", "--model.n_head", "2"], ["model.n_head", "unknown key"]),
        (["--train.max_steps", "null"], ["no stopping rule"]),
        (["--schedule.warmup_steps", "2000", "--train.max_steps", "100"], ["warmup_steps (2000)"]),
        (["--bogus.x", "1"], ["bogus"]),
        (["--model.n_layer", "0"], ["model.n_layer", "0"]),
        (["--train.max_time", "soon"], ["train.max_time", "soon"]),
    ],
)
def test_errors_name_field_and_value(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg


def test_unknown_yaml_section(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("modle:\n  n_layer: 2\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(f)


def test_bad_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)


def test_round_trip_through_yaml():
    cfg = load_config(overrides=["--model.family", "gru", "--model.residual", "true", "--train.max_time", "90s"])
    again = load_config(overrides=[], base=yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_parse_duration():
    assert parse_duration("2h") == 7200 and parse_duration("90") == 90 and parse_duration("1.5m") == 90
