"""Blocks of a token stream -> (x, y) batches: a seeded, resumable sampler and deterministic eval batches.

Block ``i`` is ``tokens[i*T : i*T + T + 1]`` (T = ``block_size``): ``x`` its first T tokens, ``y`` its last
T (shifted by one). Blocks start every T tokens, so the inputs of different blocks never overlap and every
token after the first is a target exactly once per epoch; a stream of N tokens has ``(N - 1) // T`` blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmforge.data.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def num_blocks(n_tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` inputs (+1 target) in a stream of ``n_tokens``."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    return max(0, (n_tokens - 1) // block_size)


def gather_blocks(tokens: np.ndarray, blocks: np.ndarray, block_size: int) -> Batch:
    """x, y of the given block indices: two (len(blocks), block_size) int64 tensors."""
    starts = np.asarray(blocks, dtype=np.int64) * block_size
    rows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T+1)
    buf = torch.from_numpy(rows)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class BlockSampler:
    """Random batches of blocks: each epoch visits every block once, in a seeded permutation of epoch
    ``(seed, epoch)``; a batch that reaches the end of an epoch continues into the next one.

    ``state_dict`` holds plain ints only; after ``load_state_dict`` the batches continue exactly as an
    uninterrupted run would.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tokens = tokens
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_blocks = num_blocks(len(tokens), self.block_size)
        if self.n_blocks < 1:
            raise DataError(
                f"a stream of {len(tokens)} tokens is too short for one block of block_size {block_size} (+1 token)"
            )
        self._epoch = 0
        self._pos = 0  # blocks of the current epoch already handed out
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # --------------------------------------------------------------------------------- progress
    @property
    def epoch(self) -> float:
        """Epochs done, with the fraction of the current one (e.g. 1.5)."""
        return self._epoch + self._pos / self.n_blocks

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens in one epoch: ``n_blocks * block_size``."""
        return self.n_blocks * self.block_size

    @property
    def steps_per_epoch(self) -> float:
        return self.n_blocks / self.batch_size

    # ---------------------------------------------------------------------------------- batches
    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of ``epoch`` (a pure function of seed and epoch)."""
        # SeedSequence((seed, epoch)) rather than seed + epoch: runs with seeds s and s+1 must not share orders
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, epoch])
        return rng.permutation(self.n_blocks)

    def next_blocks(self) -> np.ndarray:
        """Indices of the next batch's blocks (advances the sampler)."""
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            if self._perm_epoch != self._epoch:
                self._perm, self._perm_epoch = self.permutation(self._epoch), self._epoch
            assert self._perm is not None
            take = min(self.batch_size - filled, self.n_blocks - self._pos)
            out[filled : filled + take] = self._perm[self._pos : self._pos + take]
            filled += take
            self._pos += take
            if self._pos == self.n_blocks:
                self._epoch += 1
                self._pos = 0
        return out

    def next_batch(self) -> Batch:
        """x, y: (batch_size, block_size) int64 tensors, y = x shifted by one token."""
        return gather_blocks(self.tokens, self.next_blocks(), self.block_size)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "pos": self._pos,
            "n_blocks": self.n_blocks,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the stream must have the same blocks (the batch size may change)."""
        if int(state["n_blocks"]) != self.n_blocks or int(state["block_size"]) != self.block_size:
            raise DataError(
                f"sampler state is for {state['n_blocks']} blocks of {state['block_size']} tokens, but this data "
                f"has {self.n_blocks} blocks of {self.block_size}: resume with the same data and data.block_size"
            )
        pos = int(state["pos"])
        if not 0 <= pos < self.n_blocks:
            raise DataError(f"sampler state has position {pos}, outside 0..{self.n_blocks - 1}")
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._pos = pos
        self._perm_epoch = -1


def full_batches(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[Batch]:
    """Every block once, in order, ``batch_size`` at a time (the last batch may be smaller): one pass of
    full-batch gradient descent."""
    n = num_blocks(len(tokens), block_size)
    for start in range(0, n, batch_size):
        yield gather_blocks(tokens, np.arange(start, min(start + batch_size, n)), block_size)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int) -> list[Batch]:
    """Deterministic evaluation batches covering the stream evenly: all blocks in order when there are at
    most ``max_batches * batch_size`` of them, else that many evenly spaced blocks. The last batch may be
    smaller; an empty list when the stream is shorter than one block."""
    n = num_blocks(len(tokens), block_size)
    cap = max(1, max_batches) * batch_size
    blocks = np.arange(n) if n <= cap else (np.arange(cap, dtype=np.int64) * n) // cap
    return [gather_blocks(tokens, blocks[i : i + batch_size], block_size) for i in range(0, len(blocks), batch_size)]
