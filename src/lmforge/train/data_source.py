"""What the loop trains and evaluates on, behind one interface: :class:`TokenSource` (language modelling
on token streams) and :class:`TaskSource` (task fine-tuning on masked examples).

The loop asks a source for a resumable batch sampler, the validation batches and, for full-batch GD, one
pass over the training blocks; it never asks which kind of data it has. :func:`open_data_source` picks the
source from what :func:`lmforge.train.train` was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from lmforge.config import RunConfig
from lmforge.data import (
    BlockSampler,
    PreparedData,
    Tokenizer,
    eval_batches,
    full_batches,
    num_blocks,
    prepare_data,
)
from lmforge.data.sampler import Batch
from lmforge.train.distributed import Distributed
from lmforge.train.errors import TrainingError


class BatchSampler(Protocol):
    """A seeded, resumable stream of training batches (:class:`~lmforge.data.BlockSampler`, a rank's
    :class:`~lmforge.train.distributed.RankSlice`, :class:`~lmforge.data.tasks.ExampleSampler`)."""

    @property
    def epoch(self) -> float: ...

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class DataSource(Protocol):
    """The training data of one run, as the loop needs it."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per validation token (0 when unknown): turns the loss into bits per byte."""
        ...

    def check_fits(self, block: int) -> None:
        """Raise :class:`TrainingError` when the data has no full block to train or evaluate on."""

    def sampler(self, block: int, global_batch: int, seed: int, dist: Distributed) -> BatchSampler: ...

    def val_batches(self, block: int, global_batch: int, max_batches: int) -> list[Batch]: ...

    def full_batch_blocks(self, block: int) -> int:
        """Blocks in one pass of full-batch GD (the divisor of its mean gradient)."""
        ...

    def full_batches(self, block: int, batch_size: int) -> Iterator[Batch]:
        """One pass over every training block, in order (full-batch GD)."""
        ...


class TokenSource:
    """Language modelling: blocks of the prepared token streams. A caller may replace the sampler or the
    validation batches (search scores every trial on the same fixed batches)."""

    def __init__(self, data: PreparedData, sampler: BatchSampler | None = None,
                 val_batches: list[Batch] | None = None) -> None:
        self.data = data
        self._sampler = sampler
        self._val_batches = val_batches

    @property
    def tokenizer(self) -> Tokenizer:
        return self.data.tokenizer

    @property
    def val_bytes_per_token(self) -> float:
        stats = self.data.stats
        return (stats.get("val_bytes") or 0) / max(1, stats.get("val_tokens") or len(self.data.val))

    def check_fits(self, block: int) -> None:
        for name, arr in (("training", self.data.train), ("validation", self.data.val)):
            if len(arr) < block + 1:
                raise TrainingError(
                    f"the {name} split has {len(arr)} tokens, fewer than one block of {block}+1; "
                    "use more data or a smaller data.block_size"
                )

    def sampler(self, block: int, global_batch: int, seed: int, dist: Distributed) -> BatchSampler:
        """The sampler draws the global batch of ``batch_size * world_size`` blocks (what one process with
        that batch size would draw) and this rank keeps its rows."""
        if self._sampler is not None:
            return self._sampler
        return dist.shard_sampler(BlockSampler(self.data.train, block, global_batch, seed=seed))

    def val_batches(self, block: int, global_batch: int, max_batches: int) -> list[Batch]:
        if self._val_batches is not None:
            return self._val_batches
        return eval_batches(self.data.val, block, global_batch, max_batches)

    def full_batch_blocks(self, block: int) -> int:
        # the blocks full_batches yields (they overlap by one token: targets are the next block's inputs)
        return num_blocks(len(self.data.train), block)

    def full_batches(self, block: int, batch_size: int) -> Iterator[Batch]:
        return full_batches(self.data.train, block, batch_size)


class TaskSource:
    """Task fine-tuning (:mod:`lmforge.data.tasks`): padded, loss-masked examples from the caller's sampler
    and validation batches; there is no token stream, so full-batch GD has nothing to pass over."""

    def __init__(self, sampler: BatchSampler, val_batches: list[Batch], tokenizer: Tokenizer) -> None:
        self._sampler = sampler
        self._val_batches = val_batches
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def val_bytes_per_token(self) -> float:
        return 0.0

    def check_fits(self, block: int) -> None:
        """Examples are padded to their batch: any non-empty set fits."""

    def sampler(self, block: int, global_batch: int, seed: int, dist: Distributed) -> BatchSampler:
        return self._sampler

    def val_batches(self, block: int, global_batch: int, max_batches: int) -> list[Batch]:
        return self._val_batches

    def full_batch_blocks(self, block: int) -> int:
        return 0

    def full_batches(self, block: int, batch_size: int) -> Iterator[Batch]:
        raise TrainingError("optim.name 'gd' (full-batch) needs a language-modelling corpus, not task examples")


def open_data_source(config: RunConfig, data: PreparedData | None, tokenizer: Tokenizer | None,
                     sampler: BatchSampler | None, val_batches: list[Batch] | None) -> DataSource:
    """The source for :func:`lmforge.train.train`'s arguments: an injected sampler and validation batches
    without ``data`` are task examples; otherwise ``data`` (prepared here from ``config.data`` when not
    given, with ``tokenizer`` when given) is a language-modelling corpus."""
    if data is None and sampler is not None and val_batches is not None:
        if tokenizer is None:
            raise TrainingError("training from an injected sampler needs its tokenizer")
        if config.optim.name == "gd":
            raise TrainingError("optim.name 'gd' (full-batch) needs a language-modelling corpus, not task examples")
        return TaskSource(sampler, val_batches, tokenizer)
    if data is None:
        data = prepare_data(config, tokenizer)
    return TokenSource(data, sampler=sampler, val_batches=val_batches)
