"""Optional C++ decoding step for the transformer (``decode.cpp``), built on first use.

At decoding sizes a transformer step is a few dozen tiny ops, and the Python interpreter between them costs
about a quarter of it on the CPU. ``decode.cpp`` runs the same ATen ops in the same order as the Python fast
path (``TransformerModel._decode_one``, the reference: tests check that both give the same logits), so it
changes speed, not results. It is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) the
first time it is needed, 10-20 s, then loaded from ``$XDG_CACHE_HOME/lmforge/native`` (default
``~/.cache/lmforge/native``); ``python -m lmforge.models.native`` builds it ahead of time.

``LMFORGE_NATIVE_DECODE`` chooses: ``auto`` (default: use it when it builds, else warn once and use Python; a
failed build is remembered in its build directory, so later processes do not try again until
``python -m lmforge.models.native``), ``1`` (required: a failed build raises), ``0`` (never).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ENV = "LMFORGE_NATIVE_DECODE"
_SOURCE = Path(__file__).with_name("decode.cpp")
_lock = threading.Lock()
_loaded: Any = None
"""``torch.ops.<name>`` of the loaded build: ``decode_step`` and ``reorder``."""
_failed: str | None = None
_warned = False
_enabled_override: bool | None = None


class NativeBuildError(RuntimeError):
    """The C++ decoding step could not be built or loaded (the message says why)."""


def _mode() -> str:
    mode = os.environ.get(ENV)
    if mode is None:
        return "auto"
    mode = mode.strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={mode!r}: use auto, 1 or 0")
    return mode


def _name() -> str:
    """Extension name: changes with the source, torch and Python, so a stale build is never loaded."""
    key = _SOURCE.read_bytes() + f"{torch.__version__} {sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}".encode()
    return f"lmforge_native_{hashlib.sha256(key).hexdigest()[:12]}"


def build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmforge" / "native" / _name()


FAILED_FILE = "FAILED"
"""Written into the build directory by a failed build: other processes in auto mode do not try again."""

STALE_LOCK_S = 600.0
"""A build lock older than this is left over from a killed build (one takes 10-20 s): it is removed, or
torch would wait on it forever."""


def _remove_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            print(f"lmforge: removed a stale build lock {lock}", file=sys.stderr)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; the ``ninja`` package installs it next to this interpreter, which is not
    on PATH when a virtual environment's programs run without activating it."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is not None or shutil.which("ninja", path=here) is None:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = here + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build(verbose: bool = False) -> Any:
    """Compile (or load the cached build of) ``decode.cpp``; return its ops, ``torch.ops.<name>``."""
    global _loaded, _failed
    with _lock:
        if _loaded is not None:
            return _loaded
        from torch.utils import cpp_extension

        where = build_dir()
        name = where.name
        if not (where / f"{name}.so").exists():
            print(f"lmforge: compiling the C++ decoding step (once, 10-20 s; {ENV}=0 skips it)", file=sys.stderr)
        try:
            where.mkdir(parents=True, exist_ok=True)
            _remove_stale_lock(where / "lock")
            with _ninja_on_path():
                cpp_extension.load(
                    name=name,
                    sources=[str(_SOURCE)],
                    build_directory=str(where),
                    extra_cflags=["-O2", f"-DLMFORGE_NAMESPACE={name}"],
                    is_python_module=False,
                    verbose=verbose,
                )
            ops = getattr(torch.ops, name)
            ops.decode_step, ops.reorder  # noqa: B018  (both registered, or this build is not usable)
        except Exception as e:  # compiler, ninja or headers missing, or a failed compile
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # a compiler's output runs to pages: keep its first error (the exception chain has the rest)
            first = next((line for line in lines if "error:" in line), lines[0] if lines else "")
            _failed = f"{type(e).__name__}: {first[:300]}"
            try:  # later processes in auto mode skip the attempt (python -m lmforge.models.native retries)
                (where / FAILED_FILE).write_text(_failed + "\n", encoding="utf-8")
            except OSError:
                pass
            raise NativeBuildError(f"building {_SOURCE.name} failed: {_failed}") from e
        (where / FAILED_FILE).unlink(missing_ok=True)
        _loaded = ops
        return _loaded


def set_enabled(enabled: bool | None) -> None:
    """Force the native step on (True) or off (False) in this process; None: back to ``LMFORGE_NATIVE_DECODE``."""
    global _enabled_override
    _enabled_override = enabled


def native_ops() -> Any:
    """The native ops (``decode_step``, ``reorder``) if they are enabled and build, else None (the caller runs
    the Python path)."""
    global _warned, _failed
    if _enabled_override is False:
        return None
    mode = "1" if _enabled_override else _mode()
    if mode == "0":
        return None
    if _loaded is not None:
        return _loaded
    if _failed is None and mode == "auto":
        marker = build_dir() / FAILED_FILE
        if marker.is_file():  # an earlier process failed to build this very source with this torch
            _failed = marker.read_text(encoding="utf-8").strip() + f" (an earlier attempt; {marker})"
    if _failed is None:
        try:
            return build()
        except NativeBuildError:
            if mode == "1":
                raise
    elif mode == "1":
        raise NativeBuildError(f"building {_SOURCE.name} failed: {_failed}")
    if not _warned:
        _warned = True
        warnings.warn(
            f"lmforge: the C++ decoding step is unavailable, decoding runs in Python ({_failed}); "
            f"set {ENV}=0 to skip the attempt",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def decode_step() -> Callable | None:
    """The native decoding step, or None (see :func:`native_ops`)."""
    ops = native_ops()
    return None if ops is None else ops.decode_step
