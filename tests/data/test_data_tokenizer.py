"""Tokenizers: round trips, ids checked against independent references (nanoGPT's stoi, raw UTF-8 bytes,
the `tokenizers` backend, transformers' PreTrainedTokenizerFast), save/load, hf kind, errors."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from lmforge.config import ConfigError, TokenizerConfig
from lmforge.data import EOT, DataError, Tokenizer, build_tokenizer
from lmforge.data.tokenizer import _split_at_safe_cuts

TRAIN = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "Ünïcödé ✓ 😀 tabs\tand\r\nCRLF  double  spaces",
]


def random_text(rng: random.Random, n: int, alphabet: str | None = None) -> str:
    if alphabet is None:
        pools = ["abc xyz", " \n\t\r", "éß✓😀中文", "'s'll 123 4.5", "<|>endoftext"]
        return "".join(rng.choice(rng.choice(pools)) for _ in range(n))
    return "".join(rng.choice(alphabet) for _ in range(n))


def backend_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.backend.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------- char
def test_char_vocab_matches_nanogpt_stoi():
    tok = build_tokenizer(TokenizerConfig(kind="char"), TRAIN)
    chars = sorted(set("".join(TRAIN)))
    stoi = {c: i for i, c in enumerate(chars)}
    assert tok.kind == "char"
    assert tok.vocab_size == len(chars) + 2
    assert tok.eot_id == len(chars) and tok.id_to_token(tok.eot_id) == EOT
    assert tok.pad_id == tok.eot_id
    text = "".join(TRAIN)
    assert tok.encode(text) == [stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_characters_map_to_unk():
    tok = build_tokenizer(TokenizerConfig(kind="char"), ["ab"])
    unk = tok.token_to_id("<unk>")
    assert tok.encode("abz") == [0, 1, unk]
    assert tok.decode([0, unk]) == "a<unk>"


def test_char_and_byte_fast_path_equal_backend():
    rng = random.Random(0)
    char = build_tokenizer(TokenizerConfig(kind="char"), [random_text(rng, 300)])
    byte = build_tokenizer(TokenizerConfig(kind="byte"), [])
    assert char._fast is not None and byte._fast is not None
    for n in [0, 1, 5, 50, 400]:
        for _ in range(5):
            text = random_text(rng, n)
            for tok in (char, byte):
                assert tok.encode(text) == backend_ids(tok, text), (tok.kind, text)
    # the literal end-of-text string is the special token in both paths
    for tok in (char, byte):
        text = f"ab{EOT}{EOT}c{EOT}"
        assert tok.encode(text) == backend_ids(tok, text)
        assert tok.encode(text).count(tok.eot_id) == 3
        assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------- byte
def test_byte_ids_are_utf8_bytes_and_round_trip():
    tok = build_tokenizer(TokenizerConfig(kind="byte"), [])
    assert tok.vocab_size == 257 and tok.eot_id == 256
    rng = random.Random(1)
    for _ in range(20):
        text = random_text(rng, rng.randint(0, 200))
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]


# -------------------------------------------------------------------------------------------- bpe
@pytest.fixture(scope="module")
def bpe():
    rng = random.Random(2)
    docs = TRAIN * 20 + [random_text(rng, 2000) for _ in range(5)]
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), docs), docs


def test_bpe_round_trip_any_text(bpe):
    tok, _ = bpe
    assert tok.kind == "bpe" and tok.vocab_size == 300
    rng = random.Random(3)
    texts = [random_text(rng, rng.randint(0, 300)) for _ in range(30)]
    texts += ["never seen: ЖЖЖ ꙮ 🜲 \x00\x7f", "  leading spaces", "trailing\n\n\n", EOT + "x"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [backend_ids(tok, t) for t in texts]


def test_bpe_compresses_and_is_deterministic(bpe):
    tok, docs = bpe
    text = "".join(TRAIN)
    assert len(tok.encode(text)) < len(text.encode("utf-8"))
    again = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), docs)
    assert again.backend.to_str() == tok.backend.to_str()


def test_bpe_long_documents_are_cut_where_encoding_is_unchanged(bpe):
    tok, _ = bpe
    rng = random.Random(4)
    words = ["the", "cat", "'s", "  ", " ", "\n", "\n\n", "x.", "\t", "42", "é", "😀", "!!", "a\n", ".\n", "b  \n"]
    text = "".join(rng.choice(words) for _ in range(60_000))
    pieces = _split_at_safe_cuts(text, size=500)
    assert len(pieces) > 20 and "".join(pieces) == text
    whole = backend_ids(tok, text)
    assert [x for p in pieces for x in backend_ids(tok, p)] == whole
    from lmforge.data import tokenizer as tokmod

    old = tokmod._PIECE_CHARS
    try:
        tokmod._PIECE_CHARS = 500
        assert tok.encode_arrays([text])[0].tolist() == whole
    finally:
        tokmod._PIECE_CHARS = old


def test_bpe_too_small_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size = 100"):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=100), ["abc"])


def test_char_without_text_is_a_data_error():
    with pytest.raises(DataError, match="char"):
        build_tokenizer(TokenizerConfig(kind="char"), ["", ""])


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    cfg = TokenizerConfig(kind=kind, vocab_size=280)
    tok = build_tokenizer(cfg, TRAIN * 5)
    d = tok.save(tmp_path / "tok")
    assert (d / "tokenizer.json").is_file()
    meta = json.loads((d / "lmforge_tokenizer.json").read_text())
    assert meta["kind"] == kind and meta["eot_id"] == tok.eot_id
    loaded = Tokenizer.load(d)
    text = "".join(TRAIN)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.backend.to_str() == tok.backend.to_str()
    assert Tokenizer.from_json(tok.to_json()).encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_saved_file_loads_in_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = build_tokenizer(TokenizerConfig(kind=kind, vocab_size=280), TRAIN * 5)
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "".join(TRAIN)
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text)
    assert hf.decode(ids) == text


# ----------------------------------------------------------------------------------------- hf kind
def wordlevel_json(tmp_path, vocab: dict[str, int], name: str = "tokenizer.json"):
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / name
    backend.save(str(path))
    return path


def test_hf_file_without_eos_gets_endoftext(tmp_path):
    path = wordlevel_json(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2})
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=str(path)), [])
    assert tok.kind == "hf" and tok.eot_token == EOT and tok.eot_id == 3 and tok.vocab_size == 4
    assert tok.encode("hello world") == [1, 2]


def test_hf_checkpoint_dir_uses_its_eos_and_pad(tmp_path):
    wordlevel_json(tmp_path, {"[UNK]": 0, "</s>": 1, "<pad>": 2, "hi": 3})
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>"}})
    )
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path)), [])
    assert (tok.eot_token, tok.eot_id, tok.pad_id) == ("</s>", 1, 2)


def test_hf_eos_from_config_json_id(tmp_path):
    wordlevel_json(tmp_path, {"[UNK]": 0, "<END>": 1, "hi": 2})
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.load(tmp_path).eot_token == "<END>"


def test_hf_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer.path: no such file or directory"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "missing")), [])
    with pytest.raises(DataError, match="has no tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path)), [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not a valid tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(bad)), [])
