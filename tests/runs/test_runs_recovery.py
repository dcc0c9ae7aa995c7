"""Resume when checkpoints are corrupt, foreign or symlinked (#14.3, #14.9): never silently start over,
never let a corrupt checkpoint count for pruning, order by the step recorded inside a checkpoint."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.runs import (
    CheckpointError,
    CheckpointWarning,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)

CONFIG_YAML = "model:\n  family: transformer\n  d_model: 8\n"


def _save(out: Path, step: int, *, where: Path | None = None, trainer_state: dict | None = None) -> Path:
    torch.manual_seed(step)
    return save_checkpoint(
        where or checkpoint_dir(out, step),
        model=nn.Linear(4, 4),
        config_yaml=CONFIG_YAML,
        trainer_state=trainer_state if trainer_state is not None else {"step": step},
        meta={"step": step},
    )


def _corrupt(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])


def _steps(paths: list[Path]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in paths]


def test_every_checkpoint_corrupt_is_an_error_naming_the_files(tmp_path: Path) -> None:
    for step in (10, 20):
        _corrupt(_save(tmp_path, step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError) as err:
            latest_checkpoint(tmp_path)
    msg = str(err.value)
    assert "cannot resume" in msg and "step-0000010" in msg and "step-0000020" in msg
    # nothing is deleted: the corrupt ones are kept aside for inspection
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["corrupt-step-0000010", "corrupt-step-0000020"]


def test_a_corrupt_newer_checkpoint_no_longer_counts_for_pruning(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    _corrupt(_save(tmp_path, 30))
    with pytest.warns(CheckpointWarning, match="corrupt-step-0000030"):
        ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.step == 10
    _save(tmp_path, 20)  # the resumed run goes on and checkpoints at step 20
    prune_checkpoints(tmp_path, keep_last=1)
    assert _steps(list_checkpoints(tmp_path)) == [20]  # the good new one survives
    assert (tmp_path / "checkpoints" / "corrupt-step-0000030").is_dir()


def test_symlinks_and_foreign_directories_are_ignored(tmp_path: Path) -> None:
    other = tmp_path / "other-run"
    _save(other, 500)
    _save(tmp_path, 10)
    os.symlink(checkpoint_dir(other, 500), checkpoint_dir(tmp_path, 900))
    # a checkpoint copied in under another step's name: its meta.json says step 500
    _save(tmp_path, 500, where=checkpoint_dir(tmp_path, 800))
    with pytest.warns(CheckpointWarning, match="records step 500, not 800"):
        found = list_checkpoints(tmp_path)
    assert _steps(found) == [10]
    with pytest.warns(CheckpointWarning):
        ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.step == 10


def test_an_empty_or_partial_checksum_list_is_corrupt(tmp_path: Path) -> None:
    ck = _save(tmp_path, 1)
    marker = ck / "COMPLETE"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({"format": data["format"], "files": {}}))
    with pytest.raises(CheckpointError, match="lists no model.safetensors"):
        verify_checkpoint(ck)
    marker.write_text(json.dumps({"format": 1, "files": {"model.safetensors": {"size": "x"}}}))
    with pytest.raises(CheckpointError, match="not a checksum list"):
        verify_checkpoint(ck)
    escaping = dict(data["files"])
    escaping["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    marker.write_text(json.dumps({"format": 1, "files": escaping}))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        verify_checkpoint(ck)


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("pwned",))


def test_a_trainer_state_with_objects_gives_one_clean_line(tmp_path: Path) -> None:
    ck = _save(tmp_path, 1)
    # replace the trainer state by a pickle with an arbitrary object, and re-seal the checksums
    torch.save({"step": 1, "x": _Evil()}, ck / "trainer_state.pt")
    marker = json.loads((ck / "COMPLETE").read_text())
    import hashlib

    f = ck / "trainer_state.pt"
    marker["files"]["trainer_state.pt"] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ck / "COMPLETE").write_text(json.dumps(marker))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch warning reaches the user
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(ck)
    msg = str(err.value)
    assert "trainer_state.pt" in msg and "weights_only=False" not in msg and "\n" not in msg
