"""Files written whole or not at all (layer 1: no torch, nothing of ours).

Every writer of a file that another process may read while it is written (run state, config, reports,
figures, cache entries) goes through :func:`atomic_write`: a uniquely named hidden sibling is written,
flushed and fsynced, then renamed over the target, so a reader sees the old file or the new one, never a
torn one, and a killed writer leaves at most a stray temporary file. :func:`read_json_object` reads such a
JSON file back with one rule for a file that is missing its object.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (not atomically) and fsync it: for files inside a directory that is
    itself installed atomically."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temporary_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (``.kind-NAME-xxxxxxxx``)."""
    path = Path(path)
    return path.with_name(f".{kind}-{path.name}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], T], *, durable: bool = True) -> T:
    """Call ``write(f)`` on a temporary sibling of ``path``, then rename it over ``path``.

    ``durable`` fsyncs the file and its directory (skip it for caches that can be rebuilt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            result = write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return result


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> None:
    """``obj`` as JSON (non-JSON values through ``str``), newline-terminated."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json_object(path: str | Path, error: Callable[[str], Exception]) -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file, bad JSON or another JSON value raises ``error(message)``
    with a one-line message naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
