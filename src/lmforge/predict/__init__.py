"""lmforge.predict: one generation engine (greedy, sampling, beam search) for every model family.

- ``config``: :class:`GenerationConfig`, :class:`GenerationOutput`, :class:`GenerationError`;
- ``engine``: :func:`generate` / :func:`generate_text` (planning, dispatch to a search strategy);
- ``decoding``: what the strategies share (the resolved run, hypotheses, prefill);
- ``sampling`` (greedy / sampling) and ``beam`` (beam search): the search strategies;
- ``processors``: logits processors ``(input_ids, scores) -> scores``;
- ``streaming``: tokenizer protocols, the incremental detokenizer, stop strings, text streaming;
- ``tasks``: task prompts -> predictions; ``loading``: any model directory -> (model, tokenizer, config).
"""

from lmforge.predict.config import GenerationConfig, GenerationError, GenerationOutput
from lmforge.predict.engine import generate, generate_text

__all__ = ["GenerationConfig", "GenerationError", "GenerationOutput", "generate", "generate_text"]
