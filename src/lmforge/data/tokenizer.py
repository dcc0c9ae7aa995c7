"""Tokenizers: ``char``, ``byte``, ``bpe`` (trained) and ``hf`` (a ``tokenizer.json``), one wrapper class.

Every kind is a :class:`tokenizers.Tokenizer` underneath, so ``save`` writes a valid Hugging Face
``tokenizer.json`` (an export can wrap it in ``PreTrainedTokenizerFast``):

- ``char``: WordLevel over the characters of the training documents (sorted by code point, so ids match
  nanoGPT's ``stoi``), a pre-tokenizer that isolates every character, a Fuse decoder, plus
  ``<|endoftext|>`` and ``<unk>`` (characters never seen in training).
- ``byte``: the 256 bytes (id = byte value) in GPT-2's byte-to-unicode alphabet, plus ``<|endoftext|>``.
- ``bpe``: byte-level BPE trained on the training documents (``tokenizer.vocab_size``).
- ``hf``: a ``tokenizer.json`` file or a local checkpoint directory; its eos token is the end of text.

``char`` and ``byte`` encode with numpy (code-point lookup / raw bytes): identical ids, ~50x faster than
the backend (the tests check them against it). Long ``bpe`` documents are cut at points where the GPT-2
pre-tokenizer splits anyway, so batches of pieces can be encoded in parallel with the same result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.data.errors import DataError

EOT = "<|endoftext|>"
UNK = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "lmforge_tokenizer.json"
KINDS = ("char", "byte", "bpe", "hf")
_FORMAT = 1

# A printable ASCII character followed by a newline: the GPT-2 pre-tokenizer regex always ends a piece
# there (no pattern spans a non-space and a following "\n"), so a text cut after such a "\n" encodes
# to the same ids as the whole text.
_SAFE_CUT = re.compile(r"[!-~]\n")
_PIECE_CHARS = 1 << 16

# End-of-sequence tokens of common Hugging Face tokenizers, tried when no config names one.
_KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


class Tokenizer:
    """Text <-> token ids, with an end-of-text token that is always present.

    ``backend`` is the underlying :class:`tokenizers.Tokenizer`; ``kind`` one of ``char``, ``byte``,
    ``bpe``, ``hf``. Encoding never adds BOS/EOS; decoding keeps special tokens, so ``decode(encode(t))``
    is ``t`` for ``byte`` and ``bpe`` (any text) and ``char`` (characters seen in training).
    """

    def __init__(self, backend: tokenizers.Tokenizer, kind: str, eot_token: str = EOT, pad_token: str | None = None):
        if kind not in KINDS:
            raise DataError(f"unknown tokenizer kind {kind!r}; known: {list(KINDS)}")
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.kind = kind
        eot_id = backend.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"the {kind} tokenizer has no end-of-text token {eot_token!r}")
        self.eot_token, self.eot_id = eot_token, int(eot_id)
        pad_id = backend.token_to_id(pad_token) if pad_token else None
        self.pad_token, self.pad_id = (pad_token, int(pad_id)) if pad_id is not None else (eot_token, self.eot_id)
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        """One more than the largest id (ids of Hugging Face tokenizers may have holes)."""
        self._fast = self._fast_table(vocab)

    # -------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if self._fast is not None:
            return self._encode_np(text).tolist()
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like :meth:`encode_batch`, as int64 arrays; the fast path for large corpora."""
        if self._fast is not None:
            return [self._encode_np(t) for t in texts]
        if self.kind != "bpe":
            return [
                np.asarray(e.ids, dtype=np.int64)
                for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
            ]
        pieces: list[str] = []
        counts: list[int] = []
        for t in texts:
            parts = _split_at_safe_cuts(t)
            pieces.extend(parts)
            counts.append(len(parts))
        encoded = self.backend.encode_batch_fast(pieces, add_special_tokens=False)
        out, i = [], 0
        for c in counts:
            ids = [x for e in encoded[i : i + c] for x in e.ids] if c > 1 else encoded[i].ids
            out.append(np.asarray(ids, dtype=np.int64))
            i += c
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens are kept (``<|endoftext|>`` reads as itself)."""
        if isinstance(ids, np.ndarray):
            as_list: list[int] = ids.tolist()
        elif isinstance(ids, list):
            as_list = ids
        else:
            as_list = [int(i) for i in ids]
        return self.backend.decode(as_list, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    # ------------------------------------------------------------------------------------- fast path
    def _fast_table(self, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(sorted code points, their ids, unk id) for ``char``; empty arrays for ``byte``; else None."""
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        if added != {self.eot_token} or self.backend.normalizer is not None:
            return None
        if self.kind == "byte":
            table = bytes_to_unicode()
            if all(vocab.get(table[b]) == b for b in range(256)):
                return np.empty(0, np.uint32), np.empty(0, np.int64), -1
            return None
        if self.kind == "char":
            unk = vocab.get(UNK)
            chars = sorted((ord(t), i) for t, i in vocab.items() if len(t) == 1)
            if unk is None or len(chars) + 2 != len(vocab):
                return None
            return np.array([c for c, _ in chars], np.uint32), np.array([i for _, i in chars], np.int64), unk
        return None

    def _encode_np(self, text: str) -> np.ndarray:
        if self.eot_token in text:
            # the backend matches the literal end-of-text string as the special token: do the same
            parts = [self._encode_np(p) for p in text.split(self.eot_token)]
            eot = np.array([self.eot_id], np.int64)
            return np.concatenate([x for p in parts for x in (p, eot)][:-1])
        cps_sorted, ids, unk = self._fast  # type: ignore[misc]
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        pos = np.minimum(np.searchsorted(cps_sorted, cps), len(cps_sorted) - 1)
        return np.where(cps_sorted[pos] == cps, ids[pos], unk)

    # ------------------------------------------------------------------------------------ save / load
    def meta(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "eot_token": self.eot_token,
            "eot_id": self.eot_id,
            "pad_token": self.pad_token,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
        }

    def to_json(self) -> str:
        """The tokenizer as one JSON string (backend ``tokenizer.json`` + lmforge metadata)."""
        return json.dumps({"lmforge": self.meta(), "tokenizer": json.loads(self.backend.to_str())}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        obj = json.loads(text)
        meta = obj["lmforge"]
        backend = tokenizers.Tokenizer.from_str(json.dumps(obj["tokenizer"]))
        return cls(backend, meta["kind"], meta["eot_token"], meta.get("pad_token"))

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` (Hugging Face format) and ``directory/lmforge_tokenizer.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / TOKENIZER_FILE))
        (d / META_FILE).write_text(json.dumps(self.meta(), indent=2) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load what :meth:`save` wrote; a directory or file without lmforge metadata loads as ``hf``."""
        p = Path(path)
        meta_path = (p if p.is_dir() else p.parent) / META_FILE
        if not meta_path.is_file():
            return load_hf_tokenizer(p)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            backend = tokenizers.Tokenizer.from_file(str(meta_path.parent / TOKENIZER_FILE))
        except Exception as err:  # OSError, JSON errors, tokenizers' plain Exception
            raise DataError(f"cannot load the tokenizer in {str(meta_path.parent)!r}: {err}") from None
        tok = cls(backend, meta["kind"], meta["eot_token"], meta.get("pad_token"))
        if tok.eot_id != meta.get("eot_id", tok.eot_id):
            raise DataError(f"{meta_path}: eot_id {meta['eot_id']} does not match the tokenizer ({tok.eot_id})")
        return tok


def _split_at_safe_cuts(text: str, size: int = _PIECE_CHARS) -> list[str]:
    """Cut a long text about every ``size`` characters, only where the GPT-2 pre-tokenizer splits anyway."""
    if len(text) <= 2 * size:
        return [text]
    out, start = [], 0
    while len(text) - start > 2 * size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        cut = m.start() + 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


# ------------------------------------------------------------------------------------------ builders
def build_tokenizer(cfg: TokenizerConfig, train_docs: Sequence[str]) -> Tokenizer:
    """Build the tokenizer of ``cfg.kind``; ``char`` and ``bpe`` learn from ``train_docs``."""
    if cfg.kind == "char":
        return char_tokenizer(train_docs)
    if cfg.kind == "byte":
        return byte_tokenizer()
    if cfg.kind == "bpe":
        return bpe_tokenizer(train_docs, cfg.vocab_size)
    if cfg.kind == "hf":
        if not cfg.path:
            raise ConfigError("tokenizer.path is required when tokenizer.kind is 'hf'")
        return load_hf_tokenizer(cfg.path)
    raise ConfigError(f"tokenizer.kind = {cfg.kind!r}: unknown; known: {list(KINDS)}")


def char_tokenizer(train_docs: Sequence[str]) -> Tokenizer:
    chars: set[str] = set()
    for doc in train_docs:
        chars.update(doc)
    if not chars:
        raise DataError("tokenizer.kind 'char': the training documents hold no characters")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[EOT] = len(vocab)
    vocab[UNK] = len(vocab)
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([_special(EOT)])
    return Tokenizer(backend, "char")


def byte_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_special(EOT)])
    return Tokenizer(backend, "byte")


def bpe_tokenizer(train_docs: Sequence[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 257:
        raise ConfigError(f"tokenizer.vocab_size = {vocab_size}: byte-level bpe needs at least 257 (256 bytes + {EOT})")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_special(EOT)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    return Tokenizer(backend, "bpe")


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file or a local checkpoint directory holding one. The end of text is the
    tokenizer's eos token (from ``tokenizer_config.json``, ``special_tokens_map.json`` or ``config.json``,
    else a well-known name); when it has none, ``<|endoftext|>`` is added."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"tokenizer.path: no such file or directory: {str(path)!r}")
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"tokenizer.path: {str(p)!r} has no {TOKENIZER_FILE} (a fast Hugging Face tokenizer file)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a plain Exception for a malformed file
        raise DataError(f"tokenizer.path: {str(file)!r} is not a valid tokenizer.json: {err}") from None
    folder = file.parent
    eos = _configured_token(folder, backend, "eos")
    if eos is None:
        eos = next((t for t in _KNOWN_EOS if backend.token_to_id(t) is not None), None)
    if eos is None:
        backend.add_special_tokens([_special(EOT)])
        eos = EOT
    return Tokenizer(backend, "hf", eos, _configured_token(folder, backend, "pad"))


def _configured_token(folder: Path, backend: tokenizers.Tokenizer, role: str) -> str | None:
    """The ``eos``/``pad`` token named by a checkpoint's config files, if the tokenizer knows it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        value = _read_json(folder / name).get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and backend.token_to_id(value) is not None:
            return value
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get(f"{role}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and backend.id_to_token(value) is not None:
            return backend.id_to_token(value)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}
