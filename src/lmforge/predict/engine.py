"""One generation engine for every model family (layer 3: imports models' contract only).

The engine talks to a model only through :class:`lmforge.models.base.DecodingModel`, the incremental-state
contract of :class:`~lmforge.models.base.LanguageModel`: ``init_state``, ``step`` (with a ``valid`` mask for
left padding), ``reorder_state`` and ``max_seq_len``, and where a model has them, ``reserve_state`` (how
long the state will grow) and ``decoding()`` (the context to decode in). So a KV-cached transformer and a
recurrent network decode with the same code.

Flow of :func:`generate`:

1. plan (this module): per prompt a budget of new tokens (``max_new_tokens`` / ``max_length``) and a check
   (or an explicit left truncation) against the model's context;
2. prefill (:mod:`~lmforge.predict.decoding`): the prompts, left-padded to one (N, L) batch with a
   ``valid`` mask, go through one ``step``;
3. decode: one ``step`` of (rows, 1) per token. Greedy and sampling (:mod:`~lmforge.predict.sampling`)
   drop finished rows from the state (``reorder_state``); beam search (:mod:`~lmforge.predict.beam`)
   keeps ``num_beams`` rows per prompt and reorders them every step.

Scores are processed by :mod:`lmforge.predict.processors` in HF's order; text, stop strings and streaming
are :mod:`lmforge.predict.streaming`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict.beam import beam_search
from lmforge.predict.config import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationConfig,
    GenerationError,
    GenerationOutput,
    is_int,
)
from lmforge.predict.decoding import FINISH_REASONS, DecodeRun, Hypothesis
from lmforge.predict.processors import LogitsProcessor, build_processors
from lmforge.predict.sampling import sample_search
from lmforge.predict.streaming import GenerationTokenizer, Streamer, TextStreamAdapter, TextStreamer


def generate(
    model: DecodingModel,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer: GenerationTokenizer | None = None,
    streamer: Streamer | None = None,
    processors: Sequence[LogitsProcessor] | None = None,
) -> GenerationOutput:
    """Generate completions of token-id prompts with any model that implements the state contract.

    ``prompts``: a list of id lists (any lengths; batched with left padding) or a (B, T) / (T,) long tensor.
    ``tokenizer`` (``encode``/``decode``) is needed for ``stop_strings`` and gives the default eos and
    ``texts``. ``streamer(row, ids)`` receives the new ids of each row as they are produced (exactly the
    returned ids, in order; with stop strings, text that may begin a stop string is held back); beam search
    calls it once per returned sequence at the end. Extra ``processors`` run after the built-in ones.
    """
    config = config if config is not None else GenerationConfig()
    config.validate()
    prompt_lists = _as_prompt_lists(prompts)
    if config.stop_strings and tokenizer is None:
        raise GenerationError("GenerationConfig.stop_strings needs a tokenizer to decode the completion")
    eos = _resolve_eos(config, tokenizer)
    vocab = _vocab_size(model)
    _check_ids(prompt_lists, eos, config.pad_token_id, vocab)
    max_seq_len = getattr(model, "max_seq_len", None)
    prompt_lists, budgets = _plan(prompt_lists, config, max_seq_len)

    procs = build_processors(config, num_eos=len(eos))
    if processors:
        procs.extend(processors)
    device = _model_device(model)
    sampling = config.do_sample and config.temperature > 0
    generator = None
    if sampling and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    run = DecodeRun(
        model=model,
        config=config,
        device=device,
        eos=eos,
        pad=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0),
        procs=procs,
        sampling=sampling,
        generator=generator,
        tokenizer=tokenizer,
        stops=list(config.stop_strings or []),
        streamer=streamer,
    )
    R = config.num_return_sequences
    results: list[list[Hypothesis]] = [[] for _ in prompt_lists]
    was_training = model.training
    model.eval()
    try:
        decoding = model.decoding() if hasattr(model, "decoding") else contextlib.nullcontext()
        with torch.inference_mode(), decoding:
            for group in _context_groups([len(p) for p in prompt_lists], budgets, max_seq_len):
                group_prompts = [prompt_lists[i] for i in group]
                group_budgets = [budgets[i] for i in group]
                if config.num_beams > 1:
                    hyps = beam_search(run, group_prompts, group_budgets, group)
                else:
                    hyps = sample_search(run, group_prompts, group_budgets, group)
                for k, i in enumerate(group):
                    results[i] = hyps[k * R : (k + 1) * R]
    finally:
        model.train(was_training)
    return GenerationOutput(
        sequences=[[h.ids for h in r] for r in results],
        scores=[[h.score for h in r] for r in results],
        finish_reasons=[[FINISH_REASONS[h.reason] for h in r] for r in results],
        texts=[[h.text or "" for h in r] for r in results] if tokenizer is not None else None,
    )


def generate_text(
    model: DecodingModel,
    tokenizer: GenerationTokenizer,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    streamer: TextStreamer | None = None,
) -> list[list[str]]:
    """Encode text prompts, :func:`generate`, decode: per prompt ``num_return_sequences`` completions,
    each cut before the first stop string. ``streamer(row, text)`` receives the text as it is produced."""
    if isinstance(prompts, str):
        raise GenerationError("generate_text takes a list of prompts; wrap a single prompt in a list")
    ids = [_encode(tokenizer, p) for p in prompts]
    adapter = TextStreamAdapter(tokenizer, streamer) if streamer is not None else None
    out = generate(model, ids, config, tokenizer=tokenizer, streamer=adapter)
    assert out.texts is not None
    if adapter is not None:
        adapter.close(out.texts)
    return out.texts


# ------------------------------------------------------------------------------------------ planning
def _as_prompt_lists(prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise GenerationError(
                f"prompts tensor must be (B, T) integer ids, got {tuple(prompts.shape)} {prompts.dtype}"
            )
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token-id lists (or a (B, T) tensor)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(is_int(t) for t in p):
            raise GenerationError(f"prompt {i} must be a list of integer token ids, got {type(p).__name__}")
        out.append(list(p))
    return out


def _tokenizer_eot(tokenizer: object) -> int | None:
    for name in ("eot_id", "eot_token_id", "eos_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if is_int(v):
            return v
    return None


def _resolve_eos(config: GenerationConfig, tokenizer: GenerationTokenizer | None) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        eot = _tokenizer_eot(tokenizer) if tokenizer is not None else None
        return [] if eot is None else [eot]
    return [eos] if is_int(eos) else list(dict.fromkeys(cast(list[int], eos)))


def _vocab_size(model: object) -> int | None:
    v = getattr(model, "vocab_size", None)
    if not is_int(v):
        v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if is_int(v) else None


def _model_device(model: DecodingModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_ids(prompts: list[list[int]], eos: list[int], pad: int | None, vocab: int | None) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty: give at least one token (e.g. the tokenizer's end-of-text id)")
        lo, hi = min(p), max(p)
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise GenerationError(
                f"prompt {i} has token id {lo if lo < 0 else hi} outside the model's vocabulary of {vocab} ids"
            )
    if vocab is not None:
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
            for t in ids:
                if t >= vocab:
                    raise GenerationError(f"GenerationConfig.{name} = {t} is outside the model's vocabulary of {vocab}")


def _plan(
    prompts: list[list[int]], config: GenerationConfig, max_seq_len: int | None
) -> tuple[list[list[int]], list[int]]:
    """Per prompt: the new-token budget, and the prompt (left-truncated when allowed) that fits the context."""
    out, budgets = [], []
    for i, p in enumerate(prompts):
        L = len(p)
        n = config.max_new_tokens
        if config.max_length is not None:
            room = config.max_length - L
            if room < 1:
                raise GenerationError(
                    f"prompt {i} has {L} tokens, leaving no room for new tokens under "
                    f"GenerationConfig.max_length = {config.max_length}"
                )
            n = room if n is None else min(n, room)
        n = DEFAULT_MAX_NEW_TOKENS if n is None else n
        C = max_seq_len
        if C is not None and L + n > C:
            if n >= C:
                raise GenerationError(
                    f"{n} new tokens leave no room for prompt {i} in the model's context of {C} tokens; "
                    "lower GenerationConfig.max_new_tokens"
                )
            if not config.truncate_prompt:
                if L > C:
                    raise GenerationError(
                        f"prompt {i} has {L} tokens, longer than the model's context of {C} tokens "
                        f"(set truncate_prompt=True to keep its last {C - n} tokens)"
                    )
                raise GenerationError(
                    f"prompt {i} ({L} tokens) + {n} new tokens = {L + n} tokens exceeds the model's context "
                    f"of {C} tokens (lower max_new_tokens, or set truncate_prompt=True to keep the prompt's "
                    f"last {C - n} tokens)"
                )
            p = p[L - (C - n) :]
        out.append(p)
        budgets.append(n)
    return out, budgets


def _context_groups(lengths: list[int], budgets: list[int], max_seq_len: int | None) -> list[list[int]]:
    """Split the prompts into batches whose padded length plus new tokens fits the context (padding
    occupies state too). One batch unless the budgets differ (``max_length``) on a bounded model."""
    order = list(range(len(lengths)))
    if max_seq_len is None or max(lengths) + max(budgets) <= max_seq_len:
        return [order]
    groups: list[list[int]] = []
    cur: list[int] = []
    top_len = top_new = 0
    for i in sorted(order, key=lambda j: lengths[j]):
        L, n = max(top_len, lengths[i]), max(top_new, budgets[i])
        if cur and L + n > max_seq_len:
            groups.append(cur)
            cur, L, n = [], lengths[i], budgets[i]
        cur.append(i)
        top_len, top_new = L, n
    groups.append(cur)
    return groups


def _encode(tokenizer: GenerationTokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))
