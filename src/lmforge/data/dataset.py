"""Documents -> train/val token streams, memory-mapped and cached: :func:`prepare_data`.

Steps: read ``data.path`` (and ``data.val_path``) -> reject empty input -> split by document -> build (or
reuse) the tokenizer -> encode, with ``<|endoftext|>`` after every document -> write ``uint16``/``uint32``
arrays -> check each split holds at least one block. The arrays are cached under a content hash (document
texts, tokenizer JSON, split settings), written atomically (temporary file + rename, metadata last), so a
second run memory-maps them without tokenizing and a killed run never leaves a corrupt entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from lmforge.atomic import atomic_write_bytes
from lmforge.config import DataConfig, RunConfig, TokenizerConfig
from lmforge.data.errors import DataError
from lmforge.data.sources import Documents, read_documents
from lmforge.data.tokenizer import Tokenizer, build_tokenizer

_CACHE_FORMAT = 1
_ENCODE_CHARS = 8_000_000
"""Characters encoded per batch while writing a stream (bounds the memory of the int64 ids)."""


@dataclass
class PreparedData:
    """Token streams of the two splits, the tokenizer that made them, and what preparing them found."""

    train: np.ndarray
    """Token ids (memory-mapped ``uint16`` or ``uint32``), ``<|endoftext|>`` after every document."""
    val: np.ndarray
    """Validation ids; empty only when ``data.val_fraction`` is 0 and there is no ``data.val_path``."""
    tokenizer: Tokenizer
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def cache_root(data: DataConfig) -> Path:
    """``data.cache_dir``, else ``$LMFORGE_CACHE``, else ``~/.cache/lmforge``."""
    root = data.cache_dir or os.environ.get("LMFORGE_CACHE") or "~/.cache/lmforge"
    return Path(root).expanduser()


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, split, tokenize and cache the data of ``cfg.data``; ``tokenizer`` (e.g. from a checkpoint)
    replaces building one from ``cfg.tokenizer``. Raises :class:`DataError` for bad or too little data."""
    t0 = time.perf_counter()
    d = cfg.data
    if not d.path:
        raise DataError("data.path is not set: give a text file, folder, glob, *.jsonl, hf:NAME[:CONFIG] or demo")
    docs = _read(d, d.path, "data.path", d.max_documents)
    stats: dict[str, Any] = {"source": d.path, "val_source": d.val_path, "n_docs": len(docs)}

    # ---- split by document (a single document is cut at the (1 - val_fraction) point of its text)
    train_eot_last = True
    if d.val_path:
        val_docs = _read(d, d.val_path, "data.val_path", None)
        train_texts, val_texts = docs.texts, val_docs.texts
        stats["split"] = "val_path"
        replaced = docs.replaced_chars + val_docs.replaced_chars
        skipped = docs.skipped_files + val_docs.skipped_files
    else:
        replaced, skipped = docs.replaced_chars, docs.skipped_files
        train_texts, val_texts, stats["split"], train_eot_last = split_documents(docs.texts, d.val_fraction, d.seed)
    stats["replaced_chars"] = replaced
    stats["skipped_files"] = len(skipped)
    stats["n_docs_train"], stats["n_docs_val"] = len(train_texts), len(val_texts)

    # ---- tokenizer (trained ones are cached by their training text, so a rerun does not retrain)
    root = cache_root(d)
    train_hash, stats["train_bytes"] = _hash_texts(train_texts)
    val_hash, stats["val_bytes"] = _hash_texts(val_texts)
    if stats["train_bytes"] == 0:
        raise DataError(
            f"data.path {d.path!r}: the training split holds no text; use more text or a smaller data.val_fraction"
        )
    if stats["split"] != "none" and stats["val_bytes"] == 0:
        raise DataError(
            f"data.path {d.path!r}: the validation split holds no text; use more text or a larger data.val_fraction"
        )
    if tokenizer is None:
        tokenizer, stats["tokenizer_cache_hit"] = _cached_tokenizer(cfg.tokenizer, train_texts, train_hash, root)
    stats["tokenizer"] = tokenizer.kind
    stats["vocab_size"] = tokenizer.vocab_size
    stats["eot_id"] = tokenizer.eot_id
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    stats["dtype"] = dtype.name

    # ---- token streams (cached by content)
    key = _digest(
        {
            "format": _CACHE_FORMAT,
            "tokenizer": hashlib.sha256(tokenizer.to_json().encode()).hexdigest(),
            "train": train_hash,
            "val": val_hash,
            "split": [stats["split"], d.val_fraction, d.seed, d.val_path, d.max_documents, train_eot_last],
            "dtype": dtype.name,
        }
    )
    entry = root / "tokens" / key
    arrays = _load_entry(entry)
    stats["cache_hit"] = arrays is not None
    if arrays is None:
        arrays = _write_entry(entry, tokenizer, train_texts, val_texts, train_eot_last, dtype)
    train, val = arrays
    stats["cache_path"] = str(entry) if isinstance(train, np.memmap) else None
    stats["train_tokens"], stats["val_tokens"] = int(len(train)), int(len(val))

    # ---- enough tokens for one block (+1 target) in each split, before any model is built
    need = d.block_size + 1
    if len(train) < need:
        raise DataError(
            f"data.path {d.path!r}: the training split has {len(train)} tokens, fewer than data.block_size + 1 = {need}; "
            "use more text or a smaller data.block_size"
        )
    if stats["split"] != "none" and len(val) < need:
        where = (
            f"data.val_path {d.val_path!r}"
            if d.val_path
            else f"data.path {d.path!r} (data.val_fraction {d.val_fraction})"
        )
        raise DataError(
            f"{where}: the validation split has {len(val)} tokens, fewer than data.block_size + 1 = {need}; "
            "use more validation text, a larger data.val_fraction or a smaller data.block_size"
        )
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return PreparedData(train=train, val=val, tokenizer=tokenizer, stats=stats)


def _read(d: DataConfig, path: str, name: str, max_documents: int | None) -> Documents:
    try:
        docs = read_documents(
            path,
            text_field=d.text_field,
            hf_split=d.hf_split,
            encoding_errors=d.encoding_errors,
            max_documents=max_documents,
        )
    except DataError as err:
        raise DataError(f"{name}: {err}") from None
    if not docs.texts:
        raise DataError(f"{name} {path!r}: the corpus is empty (no documents with text)")
    if all(t.isspace() for t in docs.texts):  # isspace stops at the first other character
        raise DataError(f"{name} {path!r}: the corpus holds only whitespace")
    return docs


def split_documents(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str, bool]:
    """Hold out ``val_fraction`` of the documents (a seeded choice, at least one document each side).

    Returns (train, val, split kind, whether the last train text ends a document). One document alone
    is cut at character ``int(len * (1 - val_fraction))``: the first part trains, the rest validates
    (nanoGPT's split); the cut is not a document end, so the train stream gets no ``<|endoftext|>`` there.
    """
    texts = list(texts)
    if val_fraction <= 0:
        return texts, [], "none", True
    if len(texts) == 1:
        cut = int(len(texts[0]) * (1 - val_fraction))
        return [texts[0][:cut]], [texts[0][cut:]], "text", False
    n = len(texts)
    n_val = max(1, min(n - 1, round(n * val_fraction)))
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(_seed_entropy(seed)).permutation(n)[:n_val]] = True
    return (
        [t for t, h in zip(texts, held, strict=True) if not h],
        [t for t, h in zip(texts, held, strict=True) if h],
        "documents",
        True,
    )


def _seed_entropy(seed: int) -> int:
    return seed & 0xFFFF_FFFF_FFFF_FFFF  # SeedSequence needs a non-negative int


# --------------------------------------------------------------------------------------- hashing
def _hash_texts(texts: Sequence[str]) -> tuple[str, int]:
    """(sha256 of the texts with their lengths, so boundaries count; total UTF-8 bytes)."""
    h = hashlib.sha256()
    total = 0
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        total += len(b)
    return h.hexdigest(), total


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------- tokenizer
def _cached_tokenizer(
    cfg: TokenizerConfig, train_texts: list[str], train_hash: str, root: Path
) -> tuple[Tokenizer, bool]:
    if cfg.kind not in ("char", "bpe"):
        return build_tokenizer(cfg, train_texts), False
    key = _digest(
        {
            "format": _CACHE_FORMAT,
            "kind": cfg.kind,
            "vocab_size": cfg.vocab_size if cfg.kind == "bpe" else None,
            "train": train_hash,
            "tokenizers": tokenizers.__version__,
        }
    )
    path = root / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return Tokenizer.from_json(path.read_text(encoding="utf-8")), True
        except Exception:  # an unreadable entry is rebuilt and overwritten
            pass
    tok = build_tokenizer(cfg, train_texts)
    try:
        atomic_write_bytes(path, tok.to_json().encode("utf-8"), durable=False)
    except OSError as err:
        warnings.warn(f"cannot cache the tokenizer in {str(path.parent)!r}: {err}", stacklevel=3)
    return tok, False


# ------------------------------------------------------------------------------------ token cache
def _load_entry(entry: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the entry is missing or incomplete."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        out = []
        for split in ("train", "val"):
            n = int(meta[f"{split}_tokens"])
            path = entry / f"{split}.bin"
            if path.stat().st_size != n * dtype.itemsize:
                return None
            out.append(_open(path, dtype, n))
        return out[0], out[1]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _write_entry(
    entry: Path, tok: Tokenizer, train: list[str], val: list[str], train_eot_last: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry.mkdir(parents=True, exist_ok=True)
        counts = {}
        for split, texts, eot_last in (("train", train, train_eot_last), ("val", val, True)):
            tmp = entry / f"{split}.bin.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    counts[split] = _write_stream(f, tok, texts, eot_last, dtype)
                os.replace(tmp, entry / f"{split}.bin")
            finally:
                tmp.unlink(missing_ok=True)
        # the metadata goes last: an entry without it (a killed run) is a miss and is rewritten
        meta = {
            "format": _CACHE_FORMAT,
            "dtype": dtype.name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
        }
        atomic_write_bytes(entry / "meta.json", json.dumps(meta).encode(), durable=False)
    except OSError as err:
        warnings.warn(
            f"cannot write the token cache {str(entry)!r} ({err}); keeping the tokens in memory", stacklevel=3
        )
        return _encode_stream(tok, train, train_eot_last, dtype), _encode_stream(tok, val, True, dtype)
    return _open(entry / "train.bin", dtype, counts["train"]), _open(entry / "val.bin", dtype, counts["val"])


def _batches(texts: list[str], max_chars: int = _ENCODE_CHARS) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for t in texts:
        if out[-1] and size + len(t) > max_chars:
            out.append([])
            size = 0
        out[-1].append(t)
        size += len(t)
    return out


def _stream_pieces(tok: Tokenizer, texts: list[str], eot_last: bool, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Yield arrays of ``dtype`` whose concatenation is the stream: each document, then EOT."""
    eot = np.array([tok.eot_id], dtype=np.int64)
    batches = _batches(texts)
    for b, batch in enumerate(batches):
        pieces = []
        for i, ids in enumerate(tok.encode_arrays(batch)):
            pieces.append(ids)
            last = b == len(batches) - 1 and i == len(batch) - 1
            if eot_last or not last:
                pieces.append(eot)
        if pieces:
            yield np.concatenate(pieces).astype(dtype)


def _write_stream(f: Any, tok: Tokenizer, texts: list[str], eot_last: bool, dtype: np.dtype) -> int:
    n = 0
    for arr in _stream_pieces(tok, texts, eot_last, dtype):
        f.write(arr.tobytes())
        n += len(arr)
    return n


def _encode_stream(tok: Tokenizer, texts: list[str], eot_last: bool, dtype: np.dtype) -> np.ndarray:
    pieces = list(_stream_pieces(tok, texts, eot_last, dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


