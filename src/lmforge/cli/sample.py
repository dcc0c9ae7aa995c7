"""A sampled continuation of a prompt from a trained model (``train``/``finetune --sample``).

Its own module so that the handlers import it (and with it torch and the generation engine) only when
they run: at the top of :mod:`lmforge.cli` it would load torch for every ``lmforge`` invocation, ``--help``
included."""

from __future__ import annotations

from pathlib import Path

from lmforge.predict import GenerationConfig, generate_text
from lmforge.runs import load_model


def print_sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> None:
    """Print a sampled continuation of ``prompt`` from the model in ``model_dir``."""
    model, tokenizer, _ = load_model(model_dir)
    if model.max_seq_len is not None:  # the sample must fit in the model's context with its prompt
        max_new_tokens = min(max_new_tokens, model.max_seq_len - len(tokenizer.encode(prompt)))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50, seed=seed)
    text = generate_text(model, tokenizer, [prompt], gen)[0][0]
    print(f"\n--- sample from {model_dir} ---\n{prompt}{text}\n---")
