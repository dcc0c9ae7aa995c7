"""BlockSampler, full_batches, eval_batches: blocks against brute force, epochs, exact resume, determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lmforge.data import BlockSampler, DataError, eval_batches, full_batches, num_blocks

T = 5


@pytest.fixture
def tokens(tmp_path):
    # a memory-mapped uint16 stream, like prepare_data's, of 23 blocks (+ a ragged tail)
    arr = np.random.default_rng(0).integers(0, 60_000, size=23 * T + 3).astype(np.uint16)
    path = tmp_path / "t.bin"
    arr.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=arr.shape)


def brute_blocks(tokens: np.ndarray, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Every (x, y) pair of the stream by direct slicing: block i starts at i * block_size."""
    out, i = [], 0
    while i + block_size + 1 <= len(tokens):
        chunk = [int(t) for t in tokens[i : i + block_size + 1]]
        out.append((chunk[:-1], chunk[1:]))
        i += block_size
    return out


def rows(batch) -> list[tuple[list[int], list[int]]]:
    x, y = batch
    return list(zip(x.tolist(), y.tolist(), strict=True))


def test_batches_are_blocks_and_each_epoch_visits_all(tokens):
    blocks = brute_blocks(tokens, T)
    assert num_blocks(len(tokens), T) == len(blocks) == 23
    s = BlockSampler(tokens, T, batch_size=4, seed=7)
    assert s.tokens_per_epoch == 23 * T
    seen = []
    for _ in range(23):  # 92 blocks = 4 epochs exactly
        x, y = s.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
        seen += rows((x, y))
    assert s.epoch == pytest.approx(4.0)
    for e in range(4):
        epoch = seen[e * 23 : (e + 1) * 23]
        assert sorted(epoch) == sorted(blocks)  # every block once per epoch
    assert seen[:23] != seen[23:46]  # a new order each epoch


def test_fractional_epoch_and_batches_across_epochs(tokens):
    s = BlockSampler(tokens, T, batch_size=10, seed=0)
    s.next_batch()
    assert s.epoch == pytest.approx(10 / 23)
    s.next_batch()
    s.next_batch()  # 30 blocks: the third batch spans epochs 0 and 1
    assert s.epoch == pytest.approx(30 / 23)
    assert s.steps_per_epoch == pytest.approx(2.3)


def test_same_seed_same_batches_other_seed_differs(tokens):
    a, b, c = (BlockSampler(tokens, T, 3, seed) for seed in (1, 1, 2))
    for _ in range(20):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [a.permutation(e).tolist() for e in range(3)] != [c.permutation(e).tolist() for e in range(3)]
    # seed s, epoch 1 is not seed s+1, epoch 0 (orders do not repeat across neighbouring seeds)
    assert a.permutation(1).tolist() != c.permutation(0).tolist()


@pytest.mark.parametrize("stop", [0, 1, 5, 7, 13])
def test_resume_is_bitwise_identical(tokens, stop):
    ref = BlockSampler(tokens, T, batch_size=4, seed=3)
    expected = [ref.next_batch() for _ in range(stop + 15)]
    run = BlockSampler(tokens, T, batch_size=4, seed=3)
    for _ in range(stop):
        run.next_batch()
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(type(v) is int for v in state.values())
    resumed = BlockSampler(tokens, T, batch_size=4, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.epoch == pytest.approx(run.epoch)
    for x_ref, y_ref in expected[stop:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resume_on_other_data_is_refused(tokens):
    state = BlockSampler(tokens, T, 2, 0).state_dict()
    with pytest.raises(DataError, match="resume with the same data"):
        BlockSampler(tokens[:-10], T, 2, 0).load_state_dict(state)


def test_too_short_stream():
    with pytest.raises(DataError, match="too short for one block"):
        BlockSampler(np.arange(5, dtype=np.uint16), block_size=5, batch_size=1, seed=0)
    assert len(list(BlockSampler(np.arange(6, dtype=np.uint16), 5, 1, 0).next_batch())) == 2


def test_full_batches_cover_every_block_in_order(tokens):
    got = [r for batch in full_batches(tokens, T, batch_size=4) for r in rows(batch)]
    assert got == brute_blocks(tokens, T)
    sizes = [x.shape[0] for x, _ in full_batches(tokens, T, batch_size=4)]
    assert sizes == [4, 4, 4, 4, 4, 3]


def test_eval_batches_all_blocks_when_small(tokens):
    batches = eval_batches(tokens, T, batch_size=4, max_batches=10)
    assert [r for b in batches for r in rows(b)] == brute_blocks(tokens, T)
    again = eval_batches(tokens, T, batch_size=4, max_batches=10)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_evenly_spaced_when_large(tokens):
    blocks = brute_blocks(tokens, T)
    batches = eval_batches(tokens, T, batch_size=2, max_batches=3)  # 6 of 23 blocks
    got = [r for b in batches for r in rows(b)]
    assert len(batches) == 3 and len(got) == 6
    idx = [blocks.index(r) for r in got]
    assert idx == sorted(set(idx)) and idx[0] == 0
    gaps = np.diff(idx)
    assert gaps.min() >= 3 and gaps.max() <= 4  # 23 / 6 = 3.83: as even as integers allow
    assert idx[-1] >= 23 - 4  # reaches the end of the stream


def test_eval_batches_of_a_short_stream_is_empty():
    assert eval_batches(np.arange(3, dtype=np.uint16), 5, 2, 2) == []
