"""A seeded text sample from the run's best model (``DIR/best``, else the best trial's ``best/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.predict import GenerationConfig, generate_text
from lmforge.report.run import ReportRun
from lmforge.runs import load_model


def find_model_dir(run: ReportRun) -> Path | None:
    if (run.run_dir / "best" / "COMPLETE").is_file():
        return run.run_dir / "best"
    for t in sorted(run.complete, key=lambda t: t.values[0]):
        rel = t.user_attrs.get("run_dir")
        for d in [run.run_dir / rel / "best", run.run_dir / rel / "fold-0" / "best"] if rel else []:
            if (d / "COMPLETE").is_file():
                return d
    return None


def sample_text(run: ReportRun, max_new_tokens: int, seed: int) -> tuple[str | None, str]:
    """(generated text, where it came from / why there is none)."""
    model_dir = find_model_dir(run)
    if model_dir is None:
        return None, "no trained model yet (no best checkpoint)"
    model, tokenizer, _ = load_model(model_dir, map_location="cpu")
    n = max_new_tokens
    if model.max_seq_len:
        n = max(1, min(n, model.max_seq_len - 1))
    gen = GenerationConfig(max_new_tokens=n, do_sample=True, temperature=0.8, top_k=50, seed=seed, eos_token_id=[])
    with torch.inference_mode():
        text = generate_text(model, tokenizer, [tokenizer.eot_token], gen)[0][0]
    rel = model_dir.relative_to(run.run_dir) if model_dir.is_relative_to(run.run_dir) else model_dir
    return text, (
        f"{rel}: {n} tokens sampled after the end-of-text token (temperature 0.8, top-k 50, "
        f"seed {seed}; end-of-text tokens kept)"
    )
