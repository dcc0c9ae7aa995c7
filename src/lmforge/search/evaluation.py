"""Scoring a trained model for the search: held-out losses of the chosen model (the pipeline's evaluate
step) and greedy decoding latency (the ``latency`` objective and the summary)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.data import eval_batches
from lmforge.predict import GenerationConfig, generate
from lmforge.runs import load_model
from lmforge.search.context import SearchData
from lmforge.train.loop import evaluate_loss, resolve_device

LATENCY_TOKENS = 32
EVAL_BLOCKS = 512
"""Most blocks scored per split by the final evaluation."""


def measure_latency(model_dir: Path, new_tokens: int = LATENCY_TOKENS) -> float:
    """Milliseconds per token of a greedy decode of ``new_tokens`` tokens (after a short warm-up), on the
    device the model was trained on (``train.device``)."""
    model, tokenizer, cfg = load_model(model_dir)
    device = resolve_device(cfg.train.device)
    model.to(device)
    prompt = [[tokenizer.eot_id if tokenizer.eot_id is not None else 0]]
    if model.max_seq_len:
        new_tokens = max(1, min(new_tokens, model.max_seq_len - 1))
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    with torch.inference_mode():
        generate(model, prompt, GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=[]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    n = max(1, len(out.sequences[0][0]))
    return 1000.0 * elapsed / n


def evaluate_best(best_dir: Path, data: SearchData) -> dict[str, Any]:
    """Loss, perplexity and bits per token of the model in ``best_dir`` on the search's validation half and
    on the held-out test half (never seen by the search), its size, and its decoding latency."""
    model, _, cfg = load_model(best_dir)
    device = resolve_device(cfg.train.device)
    model.to(device)
    result: dict[str, Any] = {}
    for name, tokens in (("val", data.prepared.val), ("test", data.test)):
        # up to EVAL_BLOCKS blocks, evenly spread: all of a small split, an estimate of a large one
        batches = eval_batches(tokens, cfg.data.block_size, 16, EVAL_BLOCKS // 16)
        if batches:
            loss, n_tokens = evaluate_loss(model, batches, device)
            result[f"{name}_loss"] = loss
            result[f"{name}_ppl"] = math.exp(min(loss, 50.0))
            result[f"{name}_bits_per_token"] = loss / math.log(2)
            result[f"{name}_tokens_scored"] = n_tokens
    result["params"] = int(model.num_params())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["latency_ms_per_token"] = measure_latency(best_dir)
    return result
