"""The built-in offline corpus ``demo``: docstrings of the Python standard library.

Every Python installation ships its standard library as ``.py`` sources, so this corpus needs no network
and no download. Docstrings (module, class and function) are read with :mod:`ast` (nothing is imported),
one document each, files in sorted path order and docstrings in source order, so the corpus is the same
on every run with the same Python. Test packages are left out: they are 60% of the source bytes but carry
few docstrings, and parsing them would triple the time. The result is memoized per process.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import warnings
from pathlib import Path

from lmforge.data.errors import DataError

DEMO_MAX_BYTES = 3_000_000
"""Stop adding docstrings once this many UTF-8 bytes are collected (CPython 3.11 has about 1.8 MB in all)."""

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files outside test packages, sorted by relative path."""
    root = root or stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                full = Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full))
    return [p for _, p in sorted(found)]


def docstrings(source: bytes) -> list[str]:
    """Docstrings of a module's source in source order (module, classes, functions, nested ones too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences etc. in old sources
        tree = ast.parse(source)
    out: list[str] = []
    _collect(tree, out)
    return out


def _collect(node: ast.AST, out: list[str]) -> None:
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
    # only statement bodies can hold definitions: skip expressions (most of the tree) for speed
    for name in _BODY_FIELDS:
        for child in getattr(node, name, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                _collect(child, out)


def demo_documents(max_bytes: int = DEMO_MAX_BYTES) -> list[str]:
    """The ``demo`` corpus: standard-library docstrings, about ``max_bytes`` UTF-8 bytes at most."""
    docs = _demo(stdlib_dir(), max_bytes)
    if not docs:
        raise DataError(f"demo corpus: no standard-library sources with docstrings found under {stdlib_dir()}")
    return list(docs)


@functools.lru_cache(maxsize=4)
def _demo(root: Path, max_bytes: int) -> tuple[str, ...]:
    docs: list[str] = []
    total = 0
    for path in stdlib_sources(root):
        try:
            found = docstrings(path.read_bytes())
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue  # a few sources are deliberately broken or unreadable; they are not part of the corpus
        for doc in found:
            try:
                size = len(doc.encode("utf-8"))
            except UnicodeEncodeError:
                continue  # a lone surrogate written as an escape: not encodable text
            docs.append(doc)
            total += size
            if total >= max_bytes:
                return tuple(docs)
    return tuple(docs)
