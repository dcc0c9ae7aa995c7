"""What the server needs of a tokenizer, written once so that every serve module types it the same way.

Any lmforge tokenizer or Hugging Face tokenizer wrapper fits; the tests' stand-ins do too. (The model is
typed as :class:`lmforge.models.base.DecodingModel`, the engine's own protocol.)"""

from __future__ import annotations

from typing import Protocol


class ServedTokenizer(Protocol):
    """Encodes request text, decodes generated ids; ``vocab_size`` bounds token-id prompts when the model's
    config does not say."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...
