"""lmforge.predict: one generation engine (greedy, sampling, beam search) for every model family."""

from lmforge.predict.generate import (
    GenerationConfig,
    GenerationError,
    GenerationOutput,
    generate,
    generate_text,
)

__all__ = ["GenerationConfig", "GenerationError", "GenerationOutput", "generate", "generate_text"]
