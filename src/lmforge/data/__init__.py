"""lmforge.data: text -> documents -> tokenizer -> cached token streams -> (x, y) batches (layer 2).

- ``errors``: :class:`DataError`, the one error every data module raises (a bad file, line or field).
- ``sources``: :func:`read_documents` of a file, folder, glob, ``*.jsonl``, ``hf:NAME[:CONFIG]`` or ``demo``
  (one document per file, JSONL line, dataset row or docstring).
- ``demo``: :func:`demo_documents`, the offline corpus of standard-library docstrings.
- ``tokenizer``: :class:`Tokenizer` (``char``, ``byte``, ``bpe``, ``hf``; a ``tokenizers`` backend) and
  :func:`build_tokenizer`.
- ``dataset``: :func:`prepare_data` -> :class:`PreparedData` (memory-mapped train/val ids with
  ``<|endoftext|>`` after every document, cached by content; ``stats`` has token and byte counts).
- ``sampler``: :class:`BlockSampler` (seeded, resumable), :func:`full_batches`, :func:`eval_batches`.
- ``tasks``: task records (summarization, classification, chat...) -> masked examples -> padded batches.
"""

from lmforge.data.dataset import PreparedData, prepare_data, split_documents
from lmforge.data.demo import demo_documents
from lmforge.data.errors import DataError
from lmforge.data.sampler import BlockSampler, eval_batches, full_batches, num_blocks
from lmforge.data.sources import Documents, read_documents
from lmforge.data.tokenizer import EOT, Tokenizer, build_tokenizer

__all__ = [
    "EOT",
    "BlockSampler",
    "DataError",
    "Documents",
    "PreparedData",
    "Tokenizer",
    "build_tokenizer",
    "demo_documents",
    "eval_batches",
    "full_batches",
    "num_blocks",
    "prepare_data",
    "read_documents",
    "split_documents",
]
