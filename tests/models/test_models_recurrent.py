"""LSTM / GRU / RCNN specifics: hand-counted parameters and FLOPs, residual wiring, state layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.config import RCNNConfig, RecurrentConfig
from lmforge.models import build_model

V, D = 50, 32


@pytest.mark.parametrize(("family", "gates"), [("lstm", 4), ("gru", 3)])
@pytest.mark.parametrize("tied", [True, False])
def test_recurrent_params_and_flops_by_hand(family, gates, tied):
    m = build_model(RecurrentConfig(family=family, n_layer=3, d_model=D, tie_embeddings=tied), vocab_size=V)
    rnn = 3 * gates * (2 * D * D + 2 * D)  # weight_ih, weight_hh, two biases per layer
    total = rnn + V * D * (1 if tied else 2)
    assert m.num_params() == total
    assert m.num_params(exclude_embeddings=True) == rnn + V * D  # recurrent weights + output layer
    assert m.flops_per_token() == 6 * (rnn + V * D)
    assert m.max_seq_len is None


def test_rcnn_params_by_hand():
    k = 4
    m = build_model(RCNNConfig(n_layer=2, d_model=D, kernel_size=k, rnn="lstm"), vocab_size=V)
    conv = D * k + D + (D * 2 * D + 2 * D)  # depthwise (weight + bias) + pointwise to 2d for the GLU
    block = 2 * D + conv + 2 * D + 4 * (2 * D * D + 2 * D)  # two LayerNorms, conv, LSTM
    assert m.num_params() == 2 * block + 2 * D + V * D
    assert m.flops_per_token() == 6 * m.num_params()  # tied: every parameter does a matmul per token


def _reference_stack(m, idx: torch.Tensor) -> torch.Tensor:
    """The stacked recurrent model written out with torch modules only (residual from layer 2 on)."""
    x = m.wte(idx)
    for i, rnn in enumerate(m.layers):
        y, _ = rnn(x)
        x = x + y if (m.config.residual and i > 0) else y
    return x @ m.wte.weight.t()


@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("residual", [True, False])
def test_recurrent_forward_matches_a_written_out_stack(family, residual):
    torch.manual_seed(0)
    m = build_model(RecurrentConfig(family=family, n_layer=3, d_model=D, residual=residual), vocab_size=V).eval()
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(idx)[0], _reference_stack(m, idx), atol=1e-6, rtol=0)


def test_lstm_state_is_per_layer_h_c():
    m = build_model(RecurrentConfig(family="lstm", n_layer=2, d_model=D), vocab_size=V)
    state = m.init_state(3)
    assert len(state.hidden) == 2
    h, c = state.hidden[0]
    assert h.shape == c.shape == (1, 3, D)


def test_rcnn_conv_is_causal_and_sees_kernel_size_tokens():
    """Without the recurrence, the convolution output at t depends on tokens t-k+1 .. t only."""
    torch.manual_seed(0)
    k = 3
    m = build_model(RCNNConfig(n_layer=1, d_model=D, kernel_size=k), vocab_size=V).eval()
    conv = m.blocks[0].conv
    x = torch.randn(1, 10, D)
    buf = torch.zeros(1, k - 1, D)
    with torch.no_grad():
        base, _ = conv(x, buf)
        for j in range(10):
            changed = x.clone()
            changed[0, j] += 1.0
            diff = (conv(changed, buf)[0] - base).abs().amax(dim=-1)[0]  # (T,)
            touched = set(torch.nonzero(diff > 1e-7).flatten().tolist())
            assert touched == set(range(j, min(j + k, 10))), j


def test_rcnn_state_layout():
    m = build_model(RCNNConfig(n_layer=2, d_model=D, kernel_size=5), vocab_size=V)
    state = m.init_state(4)
    assert [b.shape for b in state.conv] == [(4, 4, D)] * 2
    assert all(isinstance(h, torch.Tensor) and h.shape == (1, 4, D) for h in state.hidden)
    assert isinstance(m.blocks[0].rnn, nn.GRU)
