"""Constrained decoding: the vocabulary mapping of every tokenizer kind (checked against the tokenizers'
own encode/decode) and random untrained models whose constrained completions must parse and validate
(checked with json / jsonschema, not with the grammar engine)."""

from __future__ import annotations

import json
import string

import pytest
import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, normalizers

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from lmforge.config import build_config  # noqa: E402
from lmforge.data.tokenizer import Tokenizer, bpe_tokenizer, byte_tokenizer, char_tokenizer, load_hf_tokenizer  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.predict import GenerationConfig, generate  # noqa: E402
from lmforge.predict.constrained import ConstraintError, Grammar, GrammarVocabulary, token_bytes  # noqa: E402

DOCS = [
    string.printable * 2,
    'The quick brown fox jumps over the lazy dog. {"a": [1, 2]} ' * 30,
    "héllo wörld ünïcode " * 20,
]
TEXT = 'Hello, {"name": "wörld", "n": [1, 2.5e3]} the quick fox! 12345\n\ttabs'


def llama_style(tmp_path) -> Tokenizer:
    """A SentencePiece-style tokenizer.json (Metaspace ``▁``, ``<0xNN>`` byte fallback, Llama's decoder),
    loaded as an ``hf`` tokenizer."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in chars:
        vocab[c] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    backend.save(str(tmp_path / "tokenizer.json"))
    return load_hf_tokenizer(tmp_path)


def gpt2_style(tmp_path) -> Tokenizer:
    """A byte-level BPE saved as a plain tokenizer.json and loaded back as ``hf``."""
    bpe = bpe_tokenizer(DOCS, 320)
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    return load_hf_tokenizer(tmp_path)


KINDS = ["char", "byte", "bpe", "hf-bytelevel", "hf-sentencepiece"]


def make_tokenizer(kind: str, tmp_path) -> Tokenizer:
    if kind == "char":
        return char_tokenizer(DOCS)
    if kind == "byte":
        return byte_tokenizer()
    if kind == "bpe":
        return bpe_tokenizer(DOCS, 320)
    if kind == "hf-bytelevel":
        return gpt2_style(tmp_path)
    return llama_style(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_spell_what_the_tokenizer_encodes(kind, tmp_path):
    tok = make_tokenizer(kind, tmp_path)
    table, special = token_bytes(tok, tok.vocab_size + 5)  # a padded model vocabulary: extra ids have no bytes
    assert table[tok.vocab_size :] == [b""] * 5
    assert tok.eot_id in special and table[tok.eot_id] == b""
    # the tokenizer's own encoding of a text, spelled with the table, is the text's UTF-8 (SentencePiece
    # style: with the space the normalizer prepends)
    ids = tok.encode(TEXT)
    spelled = b"".join(table[i] for i in ids)
    expected = TEXT.encode("utf-8")
    if kind == "hf-sentencepiece":
        expected = b" " + expected
    assert spelled == expected
    # and every token that is whole UTF-8 decodes, alone, to what the table says (an independent check on
    # tokens the text above does not use)
    checked = 0
    for i, b in enumerate(table[: tok.vocab_size]):
        if not b:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        decoded = tok.decode([i])
        if kind == "hf-sentencepiece":  # Llama's decoder strips one leading space of a whole text
            decoded = tok.decode([tok.token_to_id("a"), i])[1:]
        assert decoded == text, (i, decoded, text)
        checked += 1
    assert checked > 50


def tiny_model(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = build_config(
        {
            "model": {
                "family": "transformer",
                "n_layer": 2,
                "n_head": 2,
                "d_model": 32,
                "vocab_size": vocab_size,
                "max_seq_len": 128,
                "init_std": 0.3,
            },
            "data": {"block_size": 128},
            "tokenizer": {"kind": "char"},
        }
    )
    return build_model(cfg.model).eval()


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 4},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
    },
    "required": ["label", "score", "ok"],
    "additionalProperties": False,
}
"""Bounded: every valid reply (no whitespace) fits in ~90 bytes, so a budget of 100 tokens always closes it."""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample", [False, True])
def test_random_model_constrained_to_a_schema_always_gives_valid_json(kind, sample, tmp_path):
    tok = make_tokenizer(kind, tmp_path)
    V = tok.vocab_size + 3  # the model's vocabulary may be wider than the tokenizer's
    model = tiny_model(V)
    vocab = GrammarVocabulary(tok, V, tok.eot_id)
    grammar = vocab.compile(Grammar("json_schema", schema=SCHEMA))
    prompts = [tok.encode("Answer: "), tok.encode("x")]
    cfg = GenerationConfig(
        max_new_tokens=100,
        do_sample=sample,
        temperature=1.5 if sample else 1.0,
        seed=3 if sample else None,
        num_return_sequences=3 if sample else 1,
    )
    out = generate(model, prompts, cfg, tokenizer=tok, processors=[grammar.processor()])
    assert out.texts is not None
    for p, texts in enumerate(out.texts):
        for s, text in enumerate(texts):
            assert out.finish_reasons[p][s] == "eos", (text, out.finish_reasons[p][s])
            jsonschema.validate(json.loads(text), SCHEMA)
            assert tok.decode(out.sequences[p][s]) == text


@pytest.mark.parametrize("kind", KINDS)
def test_unconstrained_random_model_is_not_valid_json(kind, tmp_path):
    """The reference point: the same model without the mask does not produce JSON."""
    tok = make_tokenizer(kind, tmp_path)
    model = tiny_model(tok.vocab_size + 3)
    out = generate(model, [tok.encode("Answer: ")], GenerationConfig(max_new_tokens=40), tokenizer=tok)
    assert out.texts is not None
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(out.texts[0][0]), SCHEMA)


@pytest.mark.parametrize("kind", ["char", "byte", "hf-sentencepiece"])
def test_choices_and_json_object(kind, tmp_path):
    tok = make_tokenizer(kind, tmp_path)
    V = tok.vocab_size
    model = tiny_model(V, seed=1)
    vocab = GrammarVocabulary(tok, V, tok.eot_id)
    labels = ("positive", "negative", "neutré")  # é: two bytes (two tokens of the byte tokenizer)
    choice = vocab.compile(Grammar("choice", choices=labels, field="guided_choice"))
    cfg = GenerationConfig(max_new_tokens=30, do_sample=True, seed=0, num_return_sequences=6)
    out = generate(model, [tok.encode("Review: good")], cfg, tokenizer=tok, processors=[choice.processor()])
    assert out.texts is not None
    got = out.texts[0]
    assert set(got) <= set(labels) and all(r == "eos" for r in out.finish_reasons[0])
    # any JSON object: with a small budget a reply may be cut ("length"); every finished one is an object
    obj = vocab.compile(Grammar("json_object"))
    cfg = GenerationConfig(max_new_tokens=60, do_sample=True, seed=1, num_return_sequences=4)
    out = generate(model, [tok.encode("JSON:")], cfg, tokenizer=tok, processors=[obj.processor()])
    assert out.texts is not None
    for text, reason in zip(out.texts[0], out.finish_reasons[0], strict=True):
        if reason == "eos":
            assert isinstance(json.loads(text), dict)
        else:
            assert reason == "length" and text.startswith("{")
            with pytest.raises(ValueError):
                json.loads(text)


def test_bad_grammars_name_the_field():
    tok = char_tokenizer(DOCS)
    vocab = GrammarVocabulary(tok, tok.vocab_size, tok.eot_id)
    with pytest.raises(ConstraintError, match="guided_choice"):
        vocab.compile(Grammar("choice", choices=("",), field="guided_choice"))
    with pytest.raises(ConstraintError, match="response_format"):
        vocab.compile(Grammar("json_schema", schema={"type": "no-such-type"}, field="response_format"))


def test_one_processor_called_per_row_as_a_scheduler_does():
    """Rows of different prompts, each passed alone as (1, T) in turn, one finishing early: every row's
    matcher follows its own tokens (random scores stand in for a model)."""
    tok = char_tokenizer(DOCS)
    V = tok.vocab_size
    grammar = GrammarVocabulary(tok, V, tok.eot_id).compile(Grammar("json_schema", schema=SCHEMA))
    proc = grammar.processor()
    g = torch.Generator().manual_seed(0)
    rows = [tok.encode(p) for p in ("a", "bcd", "bcd", "efgh ij")]
    starts = [len(r) for r in rows]
    done = [False] * len(rows)
    for _ in range(100):
        for b, row in enumerate(rows):
            if done[b]:
                continue
            scores = proc(torch.tensor([row]), torch.randn(1, V, generator=g) * 3)
            t = int(scores.argmax())
            if t == tok.eot_id:
                done[b] = True
            else:
                row.append(t)
    assert all(done)
    replies = [tok.decode(r[s:]) for r, s in zip(rows, starts, strict=True)]
    for text in replies:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(replies)) > 1
