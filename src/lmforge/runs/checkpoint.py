"""Crash-safe checkpoints of a run directory (layer 2b: the run-directory format).

Layout of a run directory ``OUT``::

    OUT/config.yaml                      the resolved RunConfig
    OUT/metrics.jsonl                    one JSON record per line (appended, fsynced)
    OUT/checkpoints/step-0000123/        a checkpoint (the newest ``train.keep_last`` are kept)
    OUT/best/                            a full copy of the best checkpoint so far

A checkpoint directory holds ``model.safetensors`` (weights; tied tensors stored once, their other names
recorded as aliases in the file's metadata), ``config.yaml``, the tokenizer's files, ``trainer_state.pt``
(optional; loadable with ``torch.load(weights_only=True)``), ``meta.json`` and, written last, ``COMPLETE``:
the size and sha256 of every other file. A directory without ``COMPLETE`` is never used.

Atomicity: a checkpoint is written into a hidden sibling ``.tmp-NAME-*``, every file and the directory
are fsynced, then it is renamed into place; an existing checkpoint of the same name is swapped out
atomically (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, and an interrupted pair is
repaired by the next writer). A crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from lmforge.atomic import atomic_write_text, fsync_dir, write_durable
from lmforge.config import LmforgeError, RunConfig, build_config
from lmforge.data import Tokenizer
from lmforge.models import LanguageModel, build_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TRAINER_FILE = "trainer_state.pt"
META_FILE = "meta.json"
MARKER = "COMPLETE"
REQUIRED_FILES = ("model.safetensors", "config.yaml", "meta.json")
"""Files every checkpoint's ``COMPLETE`` must list (an empty or partial list is a corrupt marker)."""
CORRUPT_PREFIX = "corrupt-"
"""A corrupt checkpoint found on resume is renamed ``corrupt-step-NNNNNNN`` (kept for inspection, never
loaded, listed or pruned)."""
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ALIASES_KEY = "lmforge.aliases"
_FORMAT = 1


class CheckpointError(LmforgeError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted; the message names the file."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (e.g. corrupted) and an older one used instead."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    """The run config (parsed ``config.yaml``)."""
    state_dict: dict[str, torch.Tensor]
    """Model weights; tied names share one tensor."""
    trainer_state: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.meta.get("step")


# ------------------------------------------------------------------------------------ fs helpers
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _hidden(target: Path, kind: str) -> Path:
    return target.with_name(f".{kind}-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _siblings(target: Path, kind: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = f".{kind}-{target.name}-"
    return sorted(p for p in target.parent.iterdir() if p.is_dir() and p.name.startswith(prefix))


def _remove_dir(path: Path) -> None:
    """Delete a directory so that it is never seen half-deleted: rename it away first."""
    trash = _hidden(path, "trash")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _recover(target: Path) -> None:
    """Repair an interrupted two-rename replacement of ``target`` (non-Linux fallback): if ``target``
    is missing, move back the newest complete staged copy (new content first, then the old one)."""
    if target.exists():
        return
    for kind in ("tmp", "old"):
        for cand in reversed(_siblings(target, kind)):
            if (cand / MARKER).is_file():
                os.rename(cand, target)
                fsync_dir(target.parent)
                return


# ----------------------------------------------------------------------------------- validation
_PLAIN = (str, int, float, bool, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise CheckpointError naming the first value ``torch.load(weights_only=True)`` would refuse."""
    t = type(obj)
    if t in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {t.__module__}.{t.__qualname__}, which torch.load(weights_only=True) refuses; "
        "store tensors and plain python values (see capture_rng_state for numpy RNG state)"
    )


# --------------------------------------------------------------------------------------- weights
def _unwrap(model: nn.Module) -> nn.Module:
    """The module behind torch.compile / DataParallel / DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return model


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once: ``alias -> kept name`` for tensors identical in storage, offset, shape
    and stride (tied weights); other tensors that overlap a storage are cloned (safetensors refuses sharing)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"model tensor {name!r} is on the meta device (not materialised)")
        skey = (t.device, t.untyped_storage().data_ptr())
        vkey = (*skey, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if vkey in by_view and t.numel() > 0:
            aliases[name] = by_view[vkey]
            continue
        by_view[vkey] = name
        if skey in storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        storages.add(skey)
        kept[name] = t.cpu()
    return kept, aliases


def _save_weights(model: nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    state = model if isinstance(model, dict) else _unwrap(model).state_dict()
    kept, aliases = _dedupe(state)
    save_file(kept, str(path), metadata={_ALIASES_KEY: json.dumps(aliases), "format": "pt"})


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights on the CPU that later training does not change (a best model kept in
    memory until it is written): tensors that are the same view (tied weights) stay one tensor, so the
    file written from the copy is the one :func:`save_checkpoint` writes from the model."""
    copies: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in _unwrap(model).state_dict().items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in copies or t.numel() == 0:
            copies[key] = t.to("cpu", copy=True)
        out[name] = copies[key]
    return out


def _load_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except Exception as err:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read {path}: {err}") from None
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


# --------------------------------------------------------------------------------------- saving
def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """``OUT/checkpoints/step-NNNNNNN``."""
    return Path(out_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    config_yaml: str,
    tokenizer: Any = None,
    trainer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint at ``path`` atomically (replacing an existing one) and return ``path``.

    ``tokenizer`` is any object with ``.save(directory)``; ``trainer_state`` must hold only tensors and
    plain python values; ``meta`` (step, tokens, val_loss, ...) goes to ``meta.json`` with ``time`` added.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    if trainer_state is not None:
        _check_weights_only(trainer_state, "trainer_state")
    meta = {"format": _FORMAT, "time": time.time(), **(meta or {})}
    tmp = _hidden(path, "tmp")
    tmp.mkdir()
    try:
        _save_weights(model, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        files = {}
        for f in _files(tmp):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        for d in sorted({f.parent for f in _files(tmp)}, reverse=True):
            fsync_dir(d)
        marker = {"format": _FORMAT, "files": files}
        write_durable(tmp / MARKER, (json.dumps(marker, indent=1) + "\n").encode("utf-8"))
        fsync_dir(tmp)
        _install(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _install(tmp: Path, path: Path) -> None:
    """Move the complete ``tmp`` to ``path``; an existing ``path`` is replaced without a moment in
    which neither a complete old nor a complete new checkpoint is at ``path`` (Linux) or recoverable."""
    if path.exists():
        if _exchange(tmp, path):
            fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
            return
        old = _hidden(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, path)
    fsync_dir(path.parent)


def save_best(out_dir: str | Path, **kwargs: Any) -> Path:
    """:func:`save_checkpoint` into ``OUT/best`` (same arguments, atomically replaced)."""
    return save_checkpoint(Path(out_dir) / BEST_DIR, **kwargs)


def write_config(out_dir: str | Path, config_yaml: str) -> Path:
    """Write ``OUT/config.yaml`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, config_yaml)
    return out / CONFIG_FILE


# -------------------------------------------------------------------------------------- loading
def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def recorded_step(path: str | Path) -> int | None:
    """The step a checkpoint records in its ``meta.json`` (``None`` when unreadable or absent)."""
    try:
        step = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run directory, oldest first (never modifies anything).

    Ordered by the step each one records in ``meta.json`` (the directory name when that is unreadable:
    verification will then reject it). Symlinks are ignored (a checkpoint of this run is a real
    directory written here), and so is a directory whose name and recorded step disagree (a copy from
    another run or a renamed directory): the order never depends on a name alone."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m or p.is_symlink() or not p.is_dir() or not is_complete(p):
            continue
        named, recorded = int(m.group(1)), recorded_step(p)
        if recorded is not None and recorded != named:
            warnings.warn(
                f"ignoring {p}: its meta.json records step {recorded}, not {named} (copied from another run?)",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        found.append((named if recorded is None else recorded, p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file against the sizes and sha256 sums in ``COMPLETE``; return the marker.

    Raises :class:`CheckpointError` naming the first missing, truncated or corrupted file.
    """
    path = Path(path)
    marker_path = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = marker["files"]
        well_formed = isinstance(files, dict) and all(
            isinstance(rel, str)
            and isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
            for rel, info in files.items()
        )
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
        well_formed = False
    if not well_formed:
        raise CheckpointError(f"{marker_path} is corrupted (not a checksum list)")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise CheckpointError(f"{marker_path} is corrupted: it lists no {', '.join(missing)}")
    for rel, info in files.items():
        if rel in skip:
            continue
        f = path / rel
        if f.resolve().parent != path.resolve() and path.resolve() not in f.resolve().parents:
            raise CheckpointError(f"{marker_path} is corrupted: {rel!r} points outside the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f} is truncated or corrupted: {size} bytes, expected {info['size']}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f} is corrupted (sha256 mismatch)")
    return marker


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", load_trainer_state: bool = True
) -> Checkpoint:
    """Verify and load a checkpoint directory; :class:`CheckpointError` names a bad file."""
    path = Path(path)
    marker = verify_checkpoint(path, skip=() if load_trainer_state else (TRAINER_FILE,))
    state = _load_weights(path / MODEL_FILE, map_location)
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {err}") from None
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path / META_FILE}: {err}") from None
    trainer_state = None
    if load_trainer_state and TRAINER_FILE in marker["files"]:
        try:
            with warnings.catch_warnings():  # torch's advice to load with weights_only=False is not for users
                warnings.simplefilter("ignore")
                trainer_state = torch.load(path / TRAINER_FILE, map_location=map_location, weights_only=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                first = "it holds objects other than tensors and plain values (refusing to unpickle them)"
            raise CheckpointError(f"cannot read {path / TRAINER_FILE}: {first}") from None
        if not isinstance(trainer_state, dict):
            raise CheckpointError(f"cannot read {path / TRAINER_FILE}: not a dictionary of trainer state")
    return Checkpoint(path=path, config=config, state_dict=state, trainer_state=trainer_state, meta=meta)


def latest_checkpoint(
    out_dir: str | Path, *, map_location: str | torch.device = "cpu", load_trainer_state: bool = True
) -> Checkpoint | None:
    """The newest complete checkpoint that loads; corrupted ones are skipped with a
    :class:`CheckpointWarning` naming the file. ``None`` when there is none.

    Meant for the process that resumes the run: it first repairs an interrupted replacement.
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for p in root.iterdir():
            m = re.match(r"^\.(?:tmp|old)-(step-\d+)-", p.name)
            if m:
                _recover(root / m.group(1))
    bad: list[str] = []
    skipped: list[str] = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            ckpt = load_checkpoint(path, map_location=map_location, load_trainer_state=load_trainer_state)
        except CheckpointError as err:
            bad.append(str(err))
            # moved aside (not deleted), so that it neither counts for pruning nor hides the good ones
            aside = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
            if not aside.exists():
                with contextlib.suppress(OSError):  # a read-only run directory: skip it in place
                    os.rename(path, aside)
                    fsync_dir(path.parent)
            skipped.append(f"skipping checkpoint (kept as {aside.name}): {err}")
            continue
        # warned only when an older one loads: when none does, the error below names them all in one line
        for message in skipped:
            warnings.warn(message, CheckpointWarning, stacklevel=2)
        return ckpt
    if bad:
        raise CheckpointError(
            f"no checkpoint of {out_dir} can be loaded, so the run cannot resume: {'; '.join(bad)}. "
            "The corrupt checkpoints were kept as checkpoints/corrupt-step-*; to start again, use a new --out"
        )
    return None


def best_checkpoint(
    out_dir: str | Path, *, map_location: str | torch.device = "cpu", load_trainer_state: bool = False
) -> Checkpoint | None:
    """``OUT/best`` loaded, or ``None`` when no best has been saved."""
    best = Path(out_dir) / BEST_DIR
    _recover(best)
    if not is_complete(best):
        return None
    return load_checkpoint(best, map_location=map_location, load_trainer_state=load_trainer_state)


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete step checkpoints, and leftover hidden
    ``.tmp-``/``.old-``/``.trash-`` directories of the run; return the deleted checkpoints.

    Call it from the (single) process writing the run, not while another one saves into it.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    out = Path(out_dir)
    root = out / CHECKPOINTS_DIR
    for parent in (root, out):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            m = re.match(r"^\.(?:tmp|old)-(.+)-\d+-[0-9a-f]{8}$", p.name)
            if m:
                _recover(parent / m.group(1))
    for parent in (root, out):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if re.match(r"^\.(?:tmp|old|trash)-.+-\d+-[0-9a-f]{8}$", p.name):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    complete = list_checkpoints(out)
    doomed = complete[:-keep_last]
    for p in doomed:
        _remove_dir(p)
    if doomed:
        fsync_dir(root)
    return doomed


# ------------------------------------------------------------------------------------------- rng
def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA when available), weights_only-loadable."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA state is restored only when CUDA is available)."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------------------ rebuild
def load_model(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[LanguageModel, Tokenizer, RunConfig]:
    """Rebuild ``(model, tokenizer, RunConfig)`` from a checkpoint directory (weights loaded strictly)."""
    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location, load_trainer_state=False)
    cfg = build_config(ckpt.config)
    tokenizer = Tokenizer.load(path)
    # a config saved before resolution still rebuilds: sizes come from the tokenizer and data.block_size
    model = build_model(cfg.model, vocab_size=getattr(tokenizer, "vocab_size", None), max_seq_len=cfg.max_seq_len)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{path / MODEL_FILE} does not match the model built from {path / CONFIG_FILE}: "
            + " ".join(line.strip() for line in first[:3])
        ) from None
    model.to(map_location)
    resolved = getattr(model, "config", None)
    if type(resolved) is type(cfg.model):
        cfg = cfg.model_copy(update={"model": resolved})
    return model, tokenizer, cfg
