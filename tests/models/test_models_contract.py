"""The model contract, run against every family and a range of option combinations.

References are independent paths: the uncached full ``forward`` for incremental decoding, each row run alone
for left-padded batches, hand counts for parameters, a manual cross-entropy for the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import RCNNConfig, RecurrentConfig, TransformerConfig
from lmforge.models import IGNORE_INDEX, build_model

V, D, MAX = 50, 32, 32
ATOL = 1e-5

CONFIGS = {
    "gpt2-like": TransformerConfig(n_layer=2, d_model=D, n_head=4),
    "llama-like-gqa": TransformerConfig(
        n_layer=2,
        d_model=D,
        n_head=4,
        n_kv_head=2,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    "parallel-rope-mqa": TransformerConfig(
        n_layer=2, d_model=D, n_head=4, n_kv_head=1, position="rope", layout="parallel", rope_theta=100.0
    ),
    "parallel-learned-rms-swiglu": TransformerConfig(
        n_layer=2,
        d_model=D,
        n_head=2,
        norm="rmsnorm",
        mlp="swiglu",
        layout="parallel",
        mlp_ratio=2.5,
        dropout=0.1,
    ),
    "lstm": RecurrentConfig(family="lstm", n_layer=2, d_model=D),
    "lstm-residual-3": RecurrentConfig(family="lstm", n_layer=3, d_model=D, residual=True, dropout=0.1),
    "gru-untied-residual": RecurrentConfig(family="gru", n_layer=2, d_model=D, residual=True, tie_embeddings=False),
    "rcnn-gru": RCNNConfig(n_layer=2, d_model=D, kernel_size=3),
    "rcnn-lstm-k1-plain": RCNNConfig(n_layer=2, d_model=D, kernel_size=1, rnn="lstm", residual=False),
    "rcnn-gru-k4-untied": RCNNConfig(n_layer=2, d_model=D, kernel_size=4, tie_embeddings=False, dropout=0.1),
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    m = build_model(CONFIGS[request.param], vocab_size=V, max_seq_len=MAX).eval()
    with torch.no_grad():  # move norm gains / biases off 1 / 0 so that every parameter matters
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def full_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def decode(model, chunks: list[torch.Tensor], state=None) -> tuple[torch.Tensor, object]:
    """Feed chunks (B, t_i) through step; concatenated logits."""
    state = model.init_state(chunks[0].size(0)) if state is None else state
    out = []
    with torch.no_grad():
        for c in chunks:
            logits, state = model.step(c, state)
            out.append(logits)
    return torch.cat(out, dim=1), state


def test_token_by_token_equals_forward(model):
    idx = tokens(3, 12)
    inc, state = decode(model, list(idx.split(1, dim=1)))
    torch.testing.assert_close(inc, full_logits(model, idx), atol=ATOL, rtol=0)
    assert model.state_length(state) == 12


def test_prefill_then_tokens_equals_forward(model):
    idx = tokens(2, 12)
    chunks = [idx[:, :5], idx[:, 5:6], idx[:, 6:9], *idx[:, 9:].split(1, dim=1)]
    inc, state = decode(model, chunks)
    torch.testing.assert_close(inc, full_logits(model, idx), atol=ATOL, rtol=0)
    assert model.state_length(state) == 12


def test_left_padding_matches_rows_alone(model):
    """Prompts of lengths 3 and 7, left-padded; then 4 decoding steps with each row's own tokens."""
    a, b = tokens(1, 7, seed=2)[0], tokens(1, 11, seed=3)[0]  # prompts a[:3] and b[:7], continuations after
    prompt = torch.zeros(2, 7, dtype=torch.long)
    prompt[0, 4:], prompt[1] = a[:3], b[:7]
    prompt[0, :4] = 17  # padding content must not matter
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :4] = False
    with torch.no_grad():
        logits, state = model.step(prompt, model.init_state(2), valid=valid)
        got = [logits[:, -1]]
        for t in range(4):
            nxt = torch.stack([a[3 + t], b[7 + t]])[:, None]  # (2, 1)
            logits, state = model.step(nxt, state)
            got.append(logits[:, -1])
    assert model.state_length(state) == 11
    ref_a = full_logits(model, a[None])[0, 2:]  # positions of a[2] .. a[6]
    ref_b = full_logits(model, b[None])[0, 6:]
    torch.testing.assert_close(torch.stack([g[0] for g in got]), ref_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack([g[1] for g in got]), ref_b, atol=ATOL, rtol=0)


def test_padded_row_alone_in_a_chunk(model):
    """A row made only of padding in the first chunk (and a later chunk) keeps a clean state."""
    seq = tokens(1, 6, seed=4)[0]
    idx = torch.stack([torch.tensor([5, 5, 5, 5]), seq[:4]])
    valid = torch.tensor([[False] * 4, [True] * 4])
    with torch.no_grad():
        _, state = model.step(idx, model.init_state(2), valid=valid)
        logits, state = model.step(torch.stack([seq[:2], seq[4:6]]), state)
    torch.testing.assert_close(logits[0], full_logits(model, seq[None, :2])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], full_logits(model, seq[None])[0, 4:6], atol=ATOL, rtol=0)


def test_reorder_state_then_continue(model):
    seqs = tokens(3, 9, seed=5)
    _, state = decode(model, [seqs[:, :4]])
    index = torch.tensor([2, 0, 2])
    state = model.reorder_state(state, index)
    inc, state = decode(model, list(seqs[index, 4:].split(1, dim=1)), state)
    torch.testing.assert_close(inc, full_logits(model, seqs[index])[:, 4:], atol=ATOL, rtol=0)
    assert model.state_length(state) == 9


def test_reorder_then_chunks_and_reorders_again(model):
    """After a reorder the state has room for one more token (the transformer copies only its filled slots);
    a longer chunk, further reorders and single tokens must still match the uncached forward."""
    seqs = tokens(3, 14, seed=6)
    _, state = decode(model, [seqs[:, :3]])
    order = torch.arange(3)
    for index, chunk in ((torch.tensor([1, 1, 0]), (3, 8)), (torch.tensor([2, 0, 1]), (8, 9))):
        state = model.reorder_state(state, index)
        order = order[index]
        _, state = decode(model, [seqs[order, chunk[0] : chunk[1]]], state)
    inc, state = decode(model, list(seqs[order, 9:].split(1, dim=1)), state)
    torch.testing.assert_close(inc, full_logits(model, seqs[order])[:, 9:], atol=ATOL, rtol=0)
    assert model.state_length(state) == 14


def test_causality(model):
    idx = tokens(2, 10, seed=6)
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    base, other = full_logits(model, idx), full_logits(model, changed)
    torch.testing.assert_close(base[:, :6], other[:, :6], atol=1e-6, rtol=0)
    assert (base[:, 6:] - other[:, 6:]).abs().max() > 1e-4  # the change is visible from its position on


def test_loss_ignores_minus_100_and_matches_manual_cross_entropy(model):
    idx, targets = tokens(2, 8, seed=7), tokens(2, 8, seed=8)
    targets[0, :3] = IGNORE_INDEX
    with torch.no_grad():
        logits, loss = model(idx, targets)
    logp = F.log_softmax(logits, dim=-1)
    keep = targets != IGNORE_INDEX
    manual = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)


def test_initial_loss_near_log_vocab(model):
    with torch.no_grad():
        _, loss = model(tokens(4, 16, seed=9), tokens(4, 16, seed=10))
    assert abs(loss.item() - math.log(V)) < 0.15


def test_num_params_counts_unique_tensors(model):
    unique = {p.data_ptr(): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert model.num_params() == sum(unique.values())
    cfg = model.config
    lookup = 0 if cfg.tie_embeddings else V * D  # a tied matrix is also the output layer: kept
    if cfg.family == "transformer" and cfg.position == "learned":
        lookup += MAX * D
    assert model.num_params(exclude_embeddings=True) == model.num_params() - lookup


def test_training_steps_lower_the_loss(model):
    model.train()
    torch.manual_seed(0)
    idx = torch.arange(17).repeat(2, 1) % 7  # a periodic sequence: easy to learn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_state_on_requested_device_and_dtype(model):
    state = model.init_state(2, device="cpu")
    logits, _ = model.step(tokens(2, 3), state)
    assert logits.shape == (2, 3, V) and logits.dtype == torch.float32
