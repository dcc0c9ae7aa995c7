"""Checkpoints: round trip, tied weights, checksums, atomicity under crashes, fallback, pruning, best, rng."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lmforge.runs.checkpoint as ck
from lmforge.config import RunConfig, TokenizerConfig, build_config
from lmforge.data import build_tokenizer
from lmforge.models import build_model
from lmforge.runs import (
    CheckpointError,
    CheckpointWarning,
    append_metrics,
    best_checkpoint,
    capture_rng_state,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    read_metrics,
    restore_rng_state,
    save_best,
    save_checkpoint,
    write_config,
)

V, D = 12, 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONFIG_YAML = "model:\n  family: transformer\n  d_model: 8\n"


class TiedLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(V, D)
        self.mlp = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.wte.weight


class StubTokenizer:
    """Anything with ``.save(dir)``; the real one lives in lmforge.data."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "tokenizer.json").write_text(json.dumps({"vocab": self.vocab}))


def _save(out: Path, step: int, seed: int = 0, **kw) -> Path:
    model = kw.pop("model", None) or TiedLM(seed)
    trainer_state = kw.pop("trainer_state", {"step": step, "opt": {"m": torch.full((3,), float(step))}})
    return save_checkpoint(
        checkpoint_dir(out, step),
        model=model,
        config_yaml=CONFIG_YAML,
        tokenizer=StubTokenizer(list("abc")),
        trainer_state=trainer_state,
        meta={"step": step, "tokens": step * 100, "val_loss": 1.0 / step},
        **kw,
    )


def _steps(paths: list[Path]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in paths]


def test_round_trip_with_tied_weights(tmp_path: Path) -> None:
    model = TiedLM(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.wte.weight.sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "best": float("inf"), "rng": capture_rng_state()}
    path = _save(tmp_path, 7, model=model, trainer_state=state)
    assert path == tmp_path / "checkpoints" / "step-0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "config.yaml",
        "meta.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.pt",
    ]

    loaded = load_checkpoint(path)
    assert loaded.config == {"model": {"family": "transformer", "d_model": 8}}
    assert loaded.meta["step"] == 7 and loaded.meta["tokens"] == 700 and "time" in loaded.meta
    assert loaded.step == 7
    ref = model.state_dict()
    assert set(loaded.state_dict) == set(ref)
    for k, v in ref.items():
        assert torch.equal(loaded.state_dict[k], v), k
    # stored once, loaded as one shared tensor
    assert loaded.state_dict["lm_head.weight"] is loaded.state_dict["wte.weight"]
    fresh = TiedLM(seed=5)
    fresh.load_state_dict(loaded.state_dict, strict=True)
    assert fresh.lm_head.weight is fresh.wte.weight and torch.equal(fresh.wte.weight, model.wte.weight)
    # the trainer state loads with weights_only and drives the optimizer
    ts = torch.load(path / "trainer_state.pt", weights_only=True)
    assert ts["step"] == 7 and ts["best"] == float("inf")
    torch.optim.AdamW(fresh.parameters(), lr=0.1).load_state_dict(loaded.trainer_state["optimizer"])
    assert load_checkpoint(path, load_trainer_state=False).trainer_state is None


def test_marker_holds_sha256_of_every_file(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    marker = json.loads((path / "COMPLETE").read_text())["files"]
    others = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    assert sorted(marker) == others
    for name, info in marker.items():
        data = (path / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_trainer_state_must_be_weights_only_loadable(tmp_path: Path) -> None:
    bad = {"rng": {"numpy": np.random.get_state()}}
    with pytest.raises(CheckpointError, match=r"trainer_state\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        _save(tmp_path, 1, trainer_state=bad)
    with pytest.raises(CheckpointError, match="numpy.float64"):
        _save(tmp_path, 1, trainer_state={"loss": np.float64(1.0)})
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("model.safetensors", "flip", "sha256 mismatch"),
        ("model.safetensors", "truncate", "truncated"),
        ("trainer_state.pt", "flip", "sha256 mismatch"),
        ("config.yaml", "delete", "missing"),
        ("tokenizer.json", "flip", "sha256 mismatch"),
    ],
)
def test_damage_is_detected_and_names_the_file(tmp_path: Path, name: str, damage: str, message: str) -> None:
    path = _save(tmp_path, 1)
    f = path / name
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=rf"{name}.*{message}"):
        load_checkpoint(path)


def test_incomplete_and_stray_dirs_are_ignored_and_pruned(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    stale = root / ".tmp-step-0000005-123-abcdef01"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (root / "step-0000009").mkdir()  # no marker: never used
    (root / "notes").mkdir()
    assert _steps(list_checkpoints(tmp_path)) == [1]
    assert latest_checkpoint(tmp_path).step == 1
    prune_checkpoints(tmp_path, keep_last=3)
    assert not stale.exists()
    assert _steps(list_checkpoints(tmp_path)) == [1]


def test_exception_mid_save_leaves_previous_checkpoint_and_no_debris(tmp_path: Path) -> None:
    _save(tmp_path, 1)

    class Exploding(StubTokenizer):
        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            checkpoint_dir(tmp_path, 2), model=TiedLM(), config_yaml="", tokenizer=Exploding([]), meta={"step": 2}
        )
    assert _steps(list_checkpoints(tmp_path)) == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]


def test_hard_crash_mid_save_keeps_previous_checkpoint_loadable(tmp_path: Path) -> None:
    # a separate process dies (os._exit: no cleanup, no finally) while writing the second checkpoint
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train_checkpoint import _save
        import lmforge.runs.checkpoint as ck
        out = {str(tmp_path)!r}
        from pathlib import Path
        _save(Path(out), 1)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            os._exit(3)
        ck.torch.save = dying_save
        _save(Path(out), 2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".tmp-step-0000002-") for p in root.iterdir())
    assert _steps(list_checkpoints(tmp_path)) == [1]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.step == 1
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in root.iterdir()] == ["step-0000001"]


@pytest.mark.parametrize("exchange", [True, False])
def test_resaving_a_step_replaces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    _save(tmp_path, 3, seed=1)
    _save(tmp_path, 3, seed=2)
    loaded = load_checkpoint(checkpoint_dir(tmp_path, 3))
    assert torch.equal(loaded.state_dict["wte.weight"], TiedLM(seed=2).wte.weight)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000003"]


def test_crash_between_the_two_renames_is_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fallback path (no renameat2): old -> .old-*, [crash], .tmp-* -> target
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    _save(tmp_path, 1)
    _save(tmp_path, 2, seed=1)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:
            raise KeyboardInterrupt  # dies after moving the old checkpoint away
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, seed=2)
    monkeypatch.setattr(ck.os, "rename", real_rename)
    assert not checkpoint_dir(tmp_path, 2).exists()
    latest = latest_checkpoint(tmp_path)  # the resuming process repairs the swap
    assert latest is not None and latest.step == 2
    assert torch.equal(latest.state_dict["wte.weight"], TiedLM(seed=1).wte.weight)


def test_latest_falls_back_when_the_newest_is_corrupted(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = _save(tmp_path, 3)
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(CheckpointWarning, match=r"step-0000003/model\.safetensors"):
        latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.step == 2
    assert latest.trainer_state["opt"]["m"].tolist() == [2.0, 2.0, 2.0]


def test_latest_is_none_without_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert list_checkpoints(tmp_path / "missing") == []


def test_prune_keeps_the_newest_and_best_is_separate(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10, 11):
        _save(tmp_path, step)
        if step == 2:
            save_best(
                tmp_path,
                model=TiedLM(seed=2),
                config_yaml=CONFIG_YAML,
                tokenizer=StubTokenizer(["x"]),
                trainer_state=None,
                meta={"step": 2, "val_loss": 0.5},
            )
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert _steps(deleted) == [1, 2, 3]
    assert _steps(list_checkpoints(tmp_path)) == [10, 11]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000010", "step-0000011"]
    best = best_checkpoint(tmp_path)
    assert best is not None and best.path == tmp_path / "best" and best.meta["val_loss"] == 0.5
    assert best.trainer_state is None
    assert torch.equal(best.state_dict["wte.weight"], TiedLM(seed=2).wte.weight)
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_best_is_replaced_atomically(tmp_path: Path) -> None:
    assert best_checkpoint(tmp_path) is None
    for seed, loss in ((1, 2.0), (2, 1.5)):
        save_best(tmp_path, model=TiedLM(seed), config_yaml=CONFIG_YAML, meta={"val_loss": loss})
    best = best_checkpoint(tmp_path)
    assert best.meta["val_loss"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_metrics_and_config(tmp_path: Path) -> None:
    append_metrics(tmp_path, {"step": 1, "loss": 2.5})
    append_metrics(tmp_path, {"step": 2, "loss": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # torn by a crash
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 2.5
    path = write_config(tmp_path, "train:\n  seed: 1\n")
    assert path.read_text() == "train:\n  seed: 1\n"
    write_config(tmp_path, "train:\n  seed: 2\n")
    assert path.read_text() == "train:\n  seed: 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(capture_rng_state(), tmp_path / "rng.pt")

    def draw():
        return random.random(), np.random.normal(), float(np.random.rand()), torch.rand(3).tolist()

    expected = draw()
    draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_from_and_to_a_device(tmp_path: Path, device: str) -> None:
    model = TiedLM(seed=4).to(device=device, dtype=torch.bfloat16)
    rng = capture_rng_state()
    path = _save(tmp_path, 1, model=model, trainer_state={"rng": rng, "x": torch.ones(2, device=device)})
    loaded = load_checkpoint(path, map_location=device)
    for k, v in model.state_dict().items():
        assert loaded.state_dict[k].device.type == device and loaded.state_dict[k].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict[k], v), k
    assert loaded.trainer_state["x"].device.type == device
    expected = torch.rand(2, device=device).tolist()
    restore_rng_state(loaded.trainer_state["rng"])
    assert torch.rand(2, device=device).tolist() == expected


@pytest.mark.parametrize("resolved", [True, False])
def test_load_model_rebuilds_model_and_tokenizer(tmp_path: Path, resolved: bool) -> None:
    tok = build_tokenizer(TokenizerConfig(kind="char"), ["hello world", "abc"])
    cfg = build_config(
        {
            "model": {"n_layer": 2, "d_model": 16, "n_head": 2},
            "data": {"block_size": 8},
            "train": {"max_steps": 5},
        }
    )
    model = build_model(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len)
    full = cfg.model_copy(update={"model": model.config})
    # an unresolved config (vocab_size, max_seq_len empty) rebuilds from the tokenizer and data.block_size
    path = save_checkpoint(
        tmp_path / "ckpt", model=model, config_yaml=(full if resolved else cfg).to_yaml(), tokenizer=tok, meta={}
    )
    rebuilt, tok2, rcfg = load_model(path)
    assert isinstance(rcfg, RunConfig) and rcfg == full
    assert tok2.encode("hello abc") == tok.encode("hello abc") and tok2.vocab_size == tok.vocab_size
    idx = torch.randint(0, tok.vocab_size, (2, 8))
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(idx)[0], model(idx)[0], rtol=0, atol=0)

    other = full.model_copy(update={"model": full.model.model_copy(update={"n_layer": 1})})
    (path / "config.yaml").write_text(other.to_yaml())
    marker = json.loads((path / "COMPLETE").read_text())
    data = (path / "config.yaml").read_bytes()
    marker["files"]["config.yaml"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="does not match the model built from"):
        load_model(path)
