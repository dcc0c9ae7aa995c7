"""Grammar libraries for constrained decoding, side by side on lmforge's tokenizers (char, byte, BPE).

Every library gets the same vocabulary (:func:`lmforge.predict.constrained.token_bytes`), the same JSON
schema and the same walk: at each step the allowed token with the highest seeded random logit. Measured:
vocabulary setup, schema compile, and the per-token mask (mean and max over the walk). One thread.

    PYTHONPATH=src python benchmarks/constrained_masks.py [--steps 40] [--bpe-vocab 2000]
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

from lmforge.data.tokenizer import Tokenizer, bpe_tokenizer, byte_tokenizer, char_tokenizer
from lmforge.predict.constrained import token_bytes

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}

Walk = tuple[Callable[[], list[int]], Callable[[int], None]]
"""(allowed ids now, advance by one id)."""


def corpus() -> list[str]:
    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))[:40]
    return [open(f, encoding="utf-8").read() for f in files]


def llguidance_setup(tokens: list[bytes], special: list[int], eos: int) -> Callable[[], Walk]:
    import llguidance
    import llguidance.torch as lt

    from lmforge.predict.constrained import TokenizerBytes

    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(TokenizerBytes(tokens, eos, special)), n_vocab=len(tokens))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})

    def start() -> Walk:
        m = llguidance.LLMatcher(ll, grammar, log_level=0)
        mask = lt.allocate_token_bitmask(1, len(tokens))

        def allowed() -> list[int]:
            lt.fill_next_token_bitmask(m, mask, 0)
            bits = (mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
            return bits.reshape(-1)[: len(tokens)].nonzero().flatten().tolist()

        return allowed, m.consume_token

    return start


def xgrammar_setup(tokens: list[bytes], special: list[int], eos: int) -> Callable[[], Walk]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def start() -> Walk:
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, len(tokens))

        def allowed() -> list[int]:
            m.fill_next_token_bitmask(mask)
            bits = (mask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
            return bits.reshape(-1)[: len(tokens)].nonzero().flatten().tolist()

        return allowed, m.accept_token

    return start


def outlines_setup(tokens: list[bytes], special: list[int], eos: int) -> Callable[[], Walk]:
    import outlines_core as oc

    by_token: dict[bytes, list[int]] = {}
    for i, t in enumerate(tokens):
        if t and i != eos:
            by_token.setdefault(t, []).append(i)
    vocab = oc.Vocabulary(eos, by_token)
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))

    def start() -> Walk:
        guide = oc.Guide(oc.Index(regex, vocab))
        state = {"allowed": guide.get_tokens()}

        def allowed() -> list[int]:
            return list(state["allowed"])

        def advance(t: int) -> None:
            state["allowed"] = guide.advance(t)

        return allowed, advance

    return start


def lmfe_setup(tokens: list[bytes], special: list[int], eos: int, tok: Tokenizer) -> Callable[[], Walk]:
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    regular = []
    for i, t in enumerate(tokens):
        try:
            regular.append((i, t.decode("utf-8"), False))
        except UnicodeDecodeError:  # lm-format-enforcer works on strings: partial-UTF-8 tokens are left out
            continue
    data = TokenEnforcerTokenizerData(
        [r for r in regular if r[1]], tok.decode, eos, use_bitmask=False, vocab_size=len(tokens)
    )

    def start() -> Walk:
        enforcer = TokenEnforcer(data, JsonSchemaParser(SCHEMA))
        seq: list[int] = []

        def allowed() -> list[int]:
            return list(enforcer.get_allowed_tokens(seq).allowed_tokens)

        return allowed, seq.append

    return start


def measure(name: str, build: Callable[[], Callable[[], Walk]], steps: int, eos: int) -> dict[str, object]:
    t0 = time.perf_counter()
    start = build()
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    allowed, advance = start()
    compile_s = time.perf_counter() - t0  # the schema compile (and, where lazy, the first state)
    rng = random.Random(0)
    times, out = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = allowed()
        times.append(time.perf_counter() - t0)
        ids = [i for i in ids if i != eos] or ids
        if not ids or ids == [eos]:
            break
        pick = max(ids, key=lambda i: (rng.random(), i)) if len(ids) > 1 else ids[0]
        out.append(pick)
        advance(pick)
    return {
        "lib": name,
        "vocab_ms": 1000 * vocab_s,
        "compile_ms": 1000 * compile_s,
        "mask_us_mean": 1e6 * statistics.fmean(times),
        "mask_us_max": 1e6 * max(times),
        "steps": len(times),
    }


def engine_overhead(tok: Tokenizer, rows: int, tokens: int) -> dict[str, float]:
    """lmforge's whole path (:class:`ConstrainedProcessor` in :func:`generate`: row lookup, matcher copy,
    mask, unpack) against the same generate call unconstrained, on a tiny random transformer."""
    from lmforge.config import build_config
    from lmforge.models import build_model
    from lmforge.predict import GenerationConfig, generate
    from lmforge.predict.constrained import Grammar, GrammarVocabulary

    torch.manual_seed(0)
    cfg = build_config(
        {
            "model": {
                "family": "transformer",
                "n_layer": 2,
                "n_head": 2,
                "d_model": 64,
                "vocab_size": tok.vocab_size,
                "max_seq_len": 256,
            },
            "data": {"block_size": 256},
            "tokenizer": {"kind": "char"},
        }
    )
    model = build_model(cfg.model).eval()
    grammar = GrammarVocabulary(tok, tok.vocab_size, tok.eot_id).compile(Grammar("json_object"))
    gen = GenerationConfig(max_new_tokens=tokens, do_sample=True, seed=0, num_return_sequences=rows, eos_token_id=[])
    prompt = [tok.encode("JSON: ")]
    out: dict[str, float] = {}
    for name, procs in (("plain", None), ("constrained", "grammar")):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            generate(model, prompt, gen, processors=[grammar.processor()] if procs else None)
            best = min(best, time.perf_counter() - t0)
        out[name] = rows * tokens / best
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bpe-vocab", type=int, default=2000)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core,lm-format-enforcer")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    docs = corpus()
    toks = {
        "char": char_tokenizer(docs),
        "byte": byte_tokenizer(),
        f"bpe{args.bpe_vocab}": bpe_tokenizer(docs, args.bpe_vocab),
    }
    rows = []
    for tname, tok in toks.items():
        tokens, special = token_bytes(tok, tok.vocab_size)
        eos = tok.eot_id
        builders: dict[str, Callable[[], Callable[[], Walk]]] = {
            "llguidance": functools.partial(llguidance_setup, tokens, special, eos),
            "xgrammar": functools.partial(xgrammar_setup, tokens, special, eos),
            "outlines-core": functools.partial(outlines_setup, tokens, special, eos),
            "lm-format-enforcer": functools.partial(lmfe_setup, tokens, special, eos, tok),
        }
        for lib in args.libs.split(","):
            try:
                r = measure(lib, builders[lib], args.steps, eos)
            except Exception as err:  # a library that cannot handle this vocabulary: reported, not fatal
                r = {"lib": lib, "error": f"{type(err).__name__}: {str(err)[:80]}"}
            r["tokenizer"] = f"{tname} (V={tok.vocab_size})"
            rows.append(r)
            print(r, flush=True)
    print()
    print(f"{'tokenizer':<16} {'library':<20} {'vocab ms':>9} {'compile ms':>11} {'mask us':>9} {'max us':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokenizer']:<16} {r['lib']:<20} error: {r['error']}")
            continue
        print(
            f"{r['tokenizer']:<16} {r['lib']:<20} {r['vocab_ms']:>9.1f} {r['compile_ms']:>11.1f} "
            f"{r['mask_us_mean']:>9.0f} {r['mask_us_max']:>9.0f}"
        )
    print()
    print(f"generate, tokens/s (best of 3; {args.rows} rows x {args.tokens} tokens, json_object, no eos)")
    engine = {}
    for tname, tok in toks.items():
        engine[tname] = e = engine_overhead(tok, args.rows, args.tokens)
        print(
            f"{tname:<10} plain {e['plain']:>8.0f}  constrained {e['constrained']:>8.0f}  "
            f"ratio {e['constrained'] / e['plain']:.2f}"
        )
    print("RESULT " + json.dumps({"masks": rows, "engine": engine}))


if __name__ == "__main__":
    main()
