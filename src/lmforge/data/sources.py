"""Read documents from a data source: text files, folders, globs, JSONL, Hugging Face datasets, the demo corpus.

A document is one text file, one JSONL line, one dataset row or one docstring (``demo``). Empty documents
are dropped. Every problem a user can cause (missing path, invalid UTF-8, bad JSONL line, unknown dataset
field) is a :class:`DataError` with a one-line message naming the file (and line or byte offset).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.data.demo import demo_documents
from lmforge.data.errors import DataError

EncodingErrors = Literal["strict", "replace"]

_GLOB_CHARS = set("*?[")
_SKIP_DIRS = {"__pycache__"}
_BINARY_PROBE = 8192

__all__ = ["DataError", "Documents", "EncodingErrors", "decode_utf8", "parse_hf_spec", "read_documents"]


@dataclass
class Documents:
    """The documents of one source, in a deterministic order, with what reading them reported."""

    texts: list[str]
    source: str
    replaced_chars: int = 0
    """Invalid UTF-8 sequences replaced by U+FFFD (``encoding_errors: replace``)."""
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    """Files of a folder or glob skipped because they look binary (a NUL byte in their first 8 KiB)."""
    empty_documents: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


def read_documents(
    path: str,
    *,
    text_field: str = "text",
    hf_split: str = "train",
    encoding_errors: EncodingErrors = "strict",
    max_documents: int | None = None,
) -> Documents:
    """Read the documents of ``path``: a text file, a folder (recursively, sorted), a glob, a ``*.jsonl``
    file (one document per line, text in ``text_field``), ``hf:NAME[:CONFIG]`` (a Hugging Face dataset or a
    local dataset directory) or ``demo`` (the built-in corpus of standard-library docstrings).

    At most ``max_documents`` documents are read (in order). Raises :class:`DataError`.
    """
    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"data.encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
    spec = str(path).strip()
    if not spec:
        raise DataError("data source is empty: give a text file, folder, glob, *.jsonl, hf:NAME or demo")
    if spec == "demo":
        texts = demo_documents()
        return Documents(texts=texts[:max_documents] if max_documents else texts, source="demo")
    if spec.startswith("hf:"):
        return _read_hf(spec, text_field, hf_split, max_documents)
    docs = Documents(texts=[], source=spec)
    reader = _Reader(docs, text_field, encoding_errors, max_documents)
    if any(c in spec for c in _GLOB_CHARS) and not os.path.exists(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise DataError(f"no files match the pattern {spec!r}")
        for m in matches:
            reader.read_path(Path(m), from_listing=True)
    else:
        p = Path(os.path.expanduser(spec))
        if not p.exists():
            raise DataError(f"no such file or directory: {spec!r}")
        reader.read_path(p, from_listing=False)
    if docs.files == 0 and not docs.texts:
        raise DataError(f"no text files found in {spec!r}" + _skipped_note(docs))
    return docs


def _skipped_note(docs: Documents) -> str:
    if not docs.skipped_files:
        return ""
    return f" ({len(docs.skipped_files)} binary file(s) skipped, e.g. {docs.skipped_files[0]})"


class _Reader:
    """Appends the documents of files and folders to one :class:`Documents`."""

    def __init__(self, docs: Documents, text_field: str, errors: EncodingErrors, max_documents: int | None):
        self.docs, self.text_field, self.errors, self.max_documents = docs, text_field, errors, max_documents

    def full(self) -> bool:
        return self.max_documents is not None and len(self.docs.texts) >= self.max_documents

    def read_path(self, p: Path, from_listing: bool) -> None:
        if p.is_dir():
            for f in _walk(p):
                if self.full():
                    return
                self.read_file(f, skip_binary=True)
        elif not self.full():
            self.read_file(p, skip_binary=from_listing)

    def read_file(self, f: Path, skip_binary: bool) -> None:
        try:
            raw = f.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {str(f)!r}: {err.strerror or err}") from None
        if skip_binary and b"\x00" in raw[:_BINARY_PROBE]:
            self.docs.skipped_files.append(str(f))
            return
        self.docs.files += 1
        text, replaced = decode_utf8(raw, str(f), self.errors)
        self.docs.replaced_chars += replaced
        if f.suffix.lower() == ".jsonl":
            for _, doc in _jsonl_documents(text, str(f), self.text_field):
                if self.full():
                    return
                self.add(doc)
        else:
            self.add(text)

    def add(self, text: str) -> None:
        if text:
            self.docs.texts.append(text)
        else:
            self.docs.empty_documents += 1


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted by relative path (so the order is the same everywhere)."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        for name in filenames:
            if not name.startswith("."):
                full = Path(dirpath) / name
                out.append((full.relative_to(root).as_posix(), full))
    return [p for _, p in sorted(out)]


def decode_utf8(raw: bytes, name: str, errors: EncodingErrors = "strict") -> tuple[str, int]:
    """Decode UTF-8 (a leading BOM is dropped) -> (text, replaced sequences).

    ``strict`` raises :class:`DataError` naming the file, byte offset and line of the first invalid byte.
    """
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    body = raw[bom:] if bom else raw
    try:
        return body.decode("utf-8"), 0
    except UnicodeDecodeError as err:
        if errors == "strict":
            offset = err.start + bom
            line = raw.count(b"\n", 0, offset) + 1
            raise DataError(
                f"{name}: invalid UTF-8 at byte offset {offset} (line {line}): {err.reason}; "
                "fix the file or set data.encoding_errors: replace"
            ) from None
    text = body.decode("utf-8", "replace")
    # U+FFFD that were already in the file (bytes EF BF BD) are text, not replacements
    return text, text.count("\ufffd") - body.count(b"\xef\xbf\xbd")


def _jsonl_documents(text: str, name: str, text_field: str) -> Iterator[tuple[int, str]]:
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON allows inside strings
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{i}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object with a {text_field!r} field, got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise DataError(
                f"{name}:{i}: no field {text_field!r} (data.text_field); the line has {keys or 'no fields'}"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{name}:{i}: field {text_field!r} must be a string, got {type(value).__name__}")
        yield i, value


# ------------------------------------------------------------------------------ Hugging Face datasets
def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]`` -> (NAME, CONFIG). NAME may be a local path (also one containing ``:``)."""
    rest = spec[len("hf:") :]
    if os.path.exists(os.path.expanduser(rest)) or ":" not in rest:
        name, config = rest, None
    else:
        name, config = rest.rsplit(":", 1)
    if not name:
        raise DataError(f"{spec!r}: expected hf:NAME or hf:NAME:CONFIG")
    return name, config or None


def _read_hf(spec: str, text_field: str, split: str, max_documents: int | None) -> Documents:
    name, config = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the 'datasets' package: pip install 'lmforge[hf]'") from None
    local = Path(os.path.expanduser(name))
    try:
        if local.is_dir() and _saved_to_disk(local, datasets):
            ds: Any = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec!r} has no split {split!r} (data.hf_split); it has {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else name, config, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds (network, missing config, bad split)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"cannot load Hugging Face dataset {spec!r} (split {split!r}): {type(err).__name__}: {msg}"
        ) from None
    columns = list(ds.column_names or [])
    if text_field not in columns:
        raise DataError(f"{spec!r}: no column {text_field!r} (data.text_field); columns are {columns}")
    docs = Documents(texts=[], source=spec)
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise DataError(
                    f"{spec!r} row {row}: column {text_field!r} must hold strings, got {type(value).__name__}"
                )
            row += 1
            if value:
                docs.texts.append(value)
            else:
                docs.empty_documents += 1
            if max_documents is not None and len(docs.texts) >= max_documents:
                return docs
    return docs


def _saved_to_disk(path: Path, datasets: Any) -> bool:
    cfg = datasets.config
    return ((path / cfg.DATASET_INFO_FILENAME).is_file() and (path / cfg.DATASET_STATE_JSON_FILENAME).is_file()) or (
        path / cfg.DATASETDICT_JSON_FILENAME
    ).is_file()
