"""prepare_data: streams built by hand as the reference, splits, cache (hit, miss, interrupted writes), errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import build_config
from lmforge.data import DataError, PreparedData, Tokenizer, build_tokenizer, prepare_data

TINY_SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def make_cfg(tmp_path, path, tokenizer=None, **data):
    data = {"path": str(path), "cache_dir": str(tmp_path / "cache"), "block_size": 4, **data}
    return build_config({"data": data, "tokenizer": tokenizer or {"kind": "char"}})


def corpus(tmp_path, texts: list[str], name: str = "docs") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    return folder


DOCS = [f"document number {i}: " + "abcdefgh"[: i % 8 + 1] * (i + 1) for i in range(20)]


def byte_stream(texts: list[str]) -> np.ndarray:
    return np.array([x for t in texts for x in list(t.encode()) + [256]], dtype=np.int64)


def test_split_by_document_and_streams_match_reference(tmp_path):
    cfg = make_cfg(tmp_path, corpus(tmp_path, DOCS), val_fraction=0.2, seed=3, tokenizer={"kind": "byte"})
    pd = prepare_data(cfg)
    assert isinstance(pd, PreparedData)
    s = pd.stats
    assert (s["n_docs"], s["n_docs_train"], s["n_docs_val"], s["split"]) == (20, 16, 4, "documents")
    # the held-out documents are a seeded selection: read it off the val stream, check everything else
    val_docs = pd.tokenizer.decode(pd.val).split("<|endoftext|>")[:-1]
    assert len(val_docs) == 4 and set(val_docs) <= set(DOCS)
    assert [d for d in DOCS if d in val_docs] == val_docs  # original order kept
    train_docs = [d for d in DOCS if d not in val_docs]
    np.testing.assert_array_equal(pd.val, byte_stream(val_docs))
    np.testing.assert_array_equal(pd.train, byte_stream(train_docs))
    assert pd.train.dtype == np.uint16 and isinstance(pd.train, np.memmap)
    assert s["train_tokens"] == len(pd.train) and s["val_tokens"] == len(pd.val)
    assert s["train_bytes"] == sum(len(d.encode()) for d in train_docs)
    assert s["val_bytes"] == sum(len(d.encode()) for d in val_docs)
    assert s["cache_hit"] is False and s["replaced_chars"] == 0 and s["source"] == str(tmp_path / "docs")


def test_char_vocab_comes_from_train_documents_only(tmp_path):
    train = corpus(tmp_path, ["aab", "bba"], "train")
    val = corpus(tmp_path, ["abz"], "val")
    pd = prepare_data(make_cfg(tmp_path, train, val_path=str(val), block_size=2))
    tok = pd.tokenizer
    assert tok.vocab_size == 4  # a, b, <|endoftext|>, <unk>
    np.testing.assert_array_equal(pd.train, [0, 0, 1, 2, 1, 1, 0, 2])
    np.testing.assert_array_equal(pd.val, [0, 1, tok.token_to_id("<unk>"), 2])


def test_document_split_is_seeded(tmp_path):
    folder = corpus(tmp_path, DOCS)

    def val_of(seed, cache):
        pd = prepare_data(make_cfg(tmp_path, folder, val_fraction=0.2, seed=seed, cache_dir=str(tmp_path / cache)))
        return pd.tokenizer.decode(pd.val)

    assert val_of(0, "c1") == val_of(0, "c2")
    assert len({val_of(seed, "c1") for seed in range(5)}) > 1


def test_at_least_one_document_each_side(tmp_path):
    docs = ["first document text", "second document text"]
    pd = prepare_data(make_cfg(tmp_path, corpus(tmp_path, docs), val_fraction=0.01))
    assert (pd.stats["n_docs_train"], pd.stats["n_docs_val"]) == (1, 1)


def test_single_document_is_cut_like_nanogpt(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(50))
    f = tmp_path / "one.txt"
    f.write_text(text)
    pd = prepare_data(make_cfg(tmp_path, f, val_fraction=0.1))
    n = len(text)
    chars = sorted(set(text[: int(n * 0.9)]))
    stoi = {c: i for i, c in enumerate(chars)}
    assert pd.stats["split"] == "text"
    np.testing.assert_array_equal(pd.train, [stoi[c] for c in text[: int(n * 0.9)]])
    np.testing.assert_array_equal(pd.val, [stoi[c] for c in text[int(n * 0.9) :]] + [pd.tokenizer.eot_id])


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="tinyshakespeare not available")
def test_tinyshakespeare_char_is_nanogpt(tmp_path):
    pd = prepare_data(make_cfg(tmp_path, TINY_SHAKESPEARE, block_size=256))
    data = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(data)
    assert len(chars) == 65 and pd.tokenizer.vocab_size == 67
    ref_train = np.array([stoi[c] for c in data[: int(n * 0.9)]], dtype=np.uint16)
    ref_val = np.array([stoi[c] for c in data[int(n * 0.9) :]], dtype=np.uint16)
    np.testing.assert_array_equal(pd.train, ref_train)
    np.testing.assert_array_equal(pd.val[:-1], ref_val)
    assert pd.stats["seconds"] < 30


def test_val_path_and_no_validation(tmp_path):
    train = corpus(tmp_path, DOCS[:5], "train")
    val = corpus(tmp_path, DOCS[5:8], "val")
    pd = prepare_data(make_cfg(tmp_path, train, val_path=str(val), tokenizer={"kind": "byte"}))
    assert (pd.stats["split"], pd.stats["n_docs_train"], pd.stats["n_docs_val"]) == ("val_path", 5, 3)
    np.testing.assert_array_equal(pd.train, byte_stream(DOCS[:5]))
    np.testing.assert_array_equal(pd.val, byte_stream(DOCS[5:8]))
    pd = prepare_data(make_cfg(tmp_path, train, val_fraction=0.0))
    assert pd.stats["split"] == "none" and len(pd.val) == 0 and pd.stats["n_docs_train"] == 5


def test_jsonl_documents_end_with_eot(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = ["alpha beta", "gamma", "delta epsilon zeta"]
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    pd = prepare_data(make_cfg(tmp_path, f, val_path=str(f), tokenizer={"kind": "byte"}))
    expected = [b for r in rows for b in list(r.encode()) + [256]]
    np.testing.assert_array_equal(pd.train, expected)


def test_given_tokenizer_is_used(tmp_path):
    tok = build_tokenizer(build_config({"tokenizer": {"kind": "byte"}}).tokenizer, [])
    pd = prepare_data(make_cfg(tmp_path, corpus(tmp_path, DOCS)), tokenizer=tok)
    assert pd.tokenizer is tok and pd.stats["tokenizer"] == "byte" and pd.vocab_size == 257


def test_bpe_stream(tmp_path):
    pd = prepare_data(make_cfg(tmp_path, corpus(tmp_path, DOCS * 3), tokenizer={"kind": "bpe", "vocab_size": 300}))
    tok = pd.tokenizer
    eot = np.flatnonzero(np.asarray(pd.train) == tok.eot_id)
    assert len(eot) == pd.stats["n_docs_train"] and eot[-1] == len(pd.train) - 1
    first = tok.decode(pd.train[: eot[0]])
    assert first in DOCS


def test_uint32_for_large_vocab(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    words = [" ".join(f"w{(i * 7919 + j) % 70_000}" for j in range(30)) for i in range(6)]
    pd = prepare_data(make_cfg(tmp_path, corpus(tmp_path, words), tokenizer={"kind": "hf", "path": str(tmp_path)}))
    assert pd.train.dtype == np.uint32 and pd.stats["dtype"] == "uint32"
    assert int(np.max(pd.train)) == pd.tokenizer.eot_id == 70_001


# ------------------------------------------------------------------------------------------ cache
def test_second_run_hits_cache_without_tokenizing(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, corpus(tmp_path, DOCS), tokenizer={"kind": "bpe", "vocab_size": 280})
    first = prepare_data(cfg)
    assert first.stats["cache_hit"] is False

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(Tokenizer, "encode", boom)
    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    monkeypatch.setattr(Tokenizer, "encode_arrays", boom)
    monkeypatch.setattr("lmforge.data.tokenizer.bpe_tokenizer", boom)  # no retraining either
    second = prepare_data(cfg)
    assert second.stats["cache_hit"] is True and second.stats["tokenizer_cache_hit"] is True
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert second.tokenizer.backend.to_str() == first.tokenizer.backend.to_str()


def test_cache_misses_when_anything_changes(tmp_path):
    folder = corpus(tmp_path, DOCS)
    assert prepare_data(make_cfg(tmp_path, folder)).stats["cache_hit"] is False
    assert prepare_data(make_cfg(tmp_path, folder)).stats["cache_hit"] is True
    assert prepare_data(make_cfg(tmp_path, folder, seed=1)).stats["cache_hit"] is False
    assert prepare_data(make_cfg(tmp_path, folder, tokenizer={"kind": "byte"})).stats["cache_hit"] is False
    (folder / "000.txt").write_text("changed text of the first document")
    pd = prepare_data(make_cfg(tmp_path, folder))
    assert pd.stats["cache_hit"] is False
    assert "changed text" in pd.tokenizer.decode(pd.train) + pd.tokenizer.decode(pd.val)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "envcache"))
    cfg = build_config({"data": {"path": str(corpus(tmp_path, DOCS)), "block_size": 4}})
    pd = prepare_data(cfg)
    assert pd.stats["cache_path"].startswith(str(tmp_path / "envcache"))


@pytest.mark.parametrize("damage", ["no_meta", "truncated", "tmp_left"])
def test_interrupted_cache_write_is_a_miss(tmp_path, damage):
    cfg = make_cfg(tmp_path, corpus(tmp_path, DOCS))
    good = prepare_data(cfg)
    ref_train, ref_val = np.array(good.train), np.array(good.val)
    entry = Path(good.stats["cache_path"])
    del good
    if damage == "no_meta":  # killed before the metadata was renamed into place
        (entry / "meta.json").unlink()
    elif damage == "truncated":
        data = (entry / "train.bin").read_bytes()
        (entry / "train.bin").write_bytes(data[: len(data) // 2])
    else:  # a killed writer's temporary file does not count as an entry
        (entry / "train.bin").rename(entry / "train.bin.tmp-1-x")
    again = prepare_data(cfg)
    assert again.stats["cache_hit"] is False
    np.testing.assert_array_equal(again.train, ref_train)
    np.testing.assert_array_equal(again.val, ref_val)
    assert prepare_data(cfg).stats["cache_hit"] is True


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = make_cfg(tmp_path, corpus(tmp_path, DOCS), cache_dir=str(blocker / "sub"))
    with pytest.warns(UserWarning, match="cannot"):
        pd = prepare_data(cfg)
    assert pd.stats["cache_path"] is None and len(pd.train) == pd.stats["train_tokens"] > 0


# ----------------------------------------------------------------------------------------- errors
def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match=r"data\.path is not set"):
        prepare_data(build_config({"data": {"cache_dir": str(tmp_path)}}))
    with pytest.raises(DataError, match=r"data\.path: no such file or directory: '.*nowhere\.txt'"):
        prepare_data(make_cfg(tmp_path, tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match=r"data\.val_path: no such file or directory"):
        prepare_data(make_cfg(tmp_path, corpus(tmp_path, DOCS), val_path=str(tmp_path / "v.txt")))


@pytest.mark.parametrize(
    ("texts", "pattern"), [([""], "empty"), (["", ""], "empty"), ([" \n\t", "\n"], "only whitespace")]
)
def test_empty_or_whitespace_corpus(tmp_path, texts, pattern):
    folder = corpus(tmp_path, texts)
    with pytest.raises(DataError, match=rf"data\.path '{folder}': the corpus .*{pattern}"):
        prepare_data(make_cfg(tmp_path, folder))


def test_too_short_for_a_block(tmp_path):
    folder = corpus(tmp_path, ["abcdefghij" * 3, "klmnopqrst" * 3])
    with pytest.raises(DataError, match=r"training split has 31 tokens, fewer than data\.block_size \+ 1 = 41"):
        prepare_data(make_cfg(tmp_path, folder, block_size=40))
    f = tmp_path / "one.txt"
    f.write_text("x" * 100)
    with pytest.raises(DataError, match=r"validation split has 11 tokens, fewer than data\.block_size \+ 1 = 21"):
        prepare_data(make_cfg(tmp_path, f, block_size=20))
    assert prepare_data(make_cfg(tmp_path, f, block_size=10)).stats["val_tokens"] == 11


def test_split_leaving_no_training_text(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("a")  # cut at int(1 * 0.9) = 0
    with pytest.raises(DataError, match="training split holds no text"):
        prepare_data(make_cfg(tmp_path, f, val_fraction=0.1, block_size=1))


def test_invalid_utf8_strict_and_replace(tmp_path):
    folder = corpus(tmp_path, DOCS[:4])
    (folder / "bad.txt").write_bytes(b"good text " * 3 + b"\xfe and more text after it")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 30 \(line 1\)"):
        prepare_data(make_cfg(tmp_path, folder))
    pd = prepare_data(make_cfg(tmp_path, folder, encoding_errors="replace"))
    assert pd.stats["replaced_chars"] == 1


def test_demo_corpus_prepares_quickly(tmp_path):
    pd = prepare_data(make_cfg(tmp_path, "demo", block_size=64))
    s = pd.stats
    assert s["source"] == "demo" and s["n_docs_train"] > 1000 and s["n_docs_val"] > 100
    assert 500_000 < s["train_bytes"] + s["val_bytes"] <= 3_100_000
    assert s["seconds"] < 60
