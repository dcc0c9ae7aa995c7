"""Recurrent-convolutional language model (RCNN).

Design. Tokens are embedded (width ``d_model``) and pass through ``n_layer`` blocks, then a final LayerNorm
and the output projection (tied to the embedding when ``tie_embeddings``). Each block has two sub-layers,
each pre-normalized and, with ``residual``, added to its input (``x = x + f(LN(x))``; without it ``x = f(LN(x))``):

1. a causal depthwise-separable convolution with gating: a depthwise ``Conv1d`` over time with
   ``kernel_size`` taps (one filter per channel, the input left-padded with ``kernel_size - 1`` zeros so
   position t sees only t-k+1 .. t: no future leak), then a pointwise ``Linear(d, 2d)`` and a GLU
   (``a * sigmoid(b)``). It mixes local n-gram context cheaply before the recurrence;
2. a recurrent layer (``GRU`` or ``LSTM`` per ``rnn``, hidden width ``d_model``) that carries long context.

Dropout is applied to the embeddings and to each sub-layer's output.

Incremental state (:class:`RCNNState`): per block, the convolution buffer (B, kernel_size - 1, d) of the last
normalized inputs of the convolution (zeros at the start, as the training-time left padding) and the recurrent
hidden state. With left padding (``valid`` not all True) both are updated token by token and padding tokens
leave them unchanged; otherwise a whole chunk is processed at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import RCNNConfig
from lmforge.models.base import lm_loss
from lmforge.models.recurrent import Hidden, TokenTableLM, run_rnn, select_hidden, zero_hidden


@dataclass
class RCNNState:
    conv: list[torch.Tensor]
    """Per block (B, kernel_size - 1, d): the convolution's last normalized inputs, oldest first."""
    hidden: list[Hidden]
    """Per block, the recurrent state (h or (h, c), each (1, B, d))."""
    length: int
    """Tokens consumed (padding included)."""


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, pointwise projection and GLU gate."""

    def __init__(self, d: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.dw = nn.Conv1d(d, d, kernel_size, groups=d)  # no padding: the caller prepends the past inputs
        self.pw = nn.Linear(d, 2 * d)

    def forward(
        self, x: torch.Tensor, buf: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d), buf (B, k-1, d) -> y (B, T, d), new buf."""
        B, T, _ = x.size()
        if T == 1 and valid is None:  # a decoding step: the k taps as a weighted sum, no convolution kernel
            assert self.dw.bias is not None  # built with a bias
            window = torch.cat([buf.to(x.dtype), x], dim=1)  # (B, k, d)
            y = torch.einsum("bkd,dk->bd", window, self.dw.weight[:, 0]) + self.dw.bias  # (B, d)
            return F.glu(self.pw(y[:, None]), dim=-1), window[:, 1:]
        if valid is None or bool(valid.all()):
            xp = torch.cat([buf.to(x.dtype), x], dim=1)  # (B, k-1+T, d)
            y = self.dw(xp.transpose(1, 2)).transpose(1, 2)  # (B, T, d)
            new_buf = xp[:, T:]  # last k-1 inputs
        else:
            ys = []
            new_buf = buf.to(x.dtype)
            for t in range(T):
                window = torch.cat([new_buf, x[:, t : t + 1]], dim=1)  # (B, k, d)
                ys.append(self.dw(window.transpose(1, 2)).transpose(1, 2))  # (B, 1, d)
                new_buf = torch.where(valid[:, t].view(B, 1, 1), window[:, 1:], new_buf)  # padding: no shift
            y = torch.cat(ys, dim=1)
        return F.glu(self.pw(y), dim=-1), new_buf


class RCNNBlock(nn.Module):
    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self.residual = cfg.residual
        self.ln_conv = nn.LayerNorm(cfg.d_model)
        self.conv = CausalConv(cfg.d_model, cfg.kernel_size)
        self.ln_rnn = nn.LayerNorm(cfg.d_model)
        self.rnn = (nn.GRU if cfg.rnn == "gru" else nn.LSTM)(cfg.d_model, cfg.d_model, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, buf: torch.Tensor, hidden: Hidden | None, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        y, buf = self.conv(self.ln_conv(x), buf, valid)  # (B, T, d)
        x = x + self.drop(y) if self.residual else self.drop(y)
        y, hidden = run_rnn(self.rnn, self.ln_rnn(x), hidden, valid)  # (B, T, d)
        x = x + self.drop(y) if self.residual else self.drop(y)
        return x, buf, hidden


class RCNNModel(TokenTableLM):
    """Recurrent-convolutional language model; see the module docstring."""

    config: RCNNConfig

    def __init__(self, cfg: RCNNConfig):
        super().__init__()
        self._token_table(cfg)
        self.blocks = nn.ModuleList([RCNNBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._output_layer(cfg)

    def rcnn_blocks(self) -> Sequence[RCNNBlock]:
        """The blocks, typed: ``nn.ModuleList`` is not generic."""
        return cast(Sequence[RCNNBlock], self.blocks)

    def _run(
        self, idx: torch.Tensor, conv: Sequence[torch.Tensor], hidden: Sequence[Hidden | None], length: int,
        valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, RCNNState]:
        """The blocks over ``idx`` from per-block convolution buffers and recurrent states (None: zeros) after
        ``length`` tokens."""
        x = self.drop(self.wte(idx))  # (B, T, d)
        bufs, new_hidden = [], []
        for i, block in enumerate(self.blocks):
            x, buf, h = block(x, conv[i], hidden[i], valid)
            bufs.append(buf)
            new_hidden.append(h)
        return self.lm_head(self.ln_f(x)), RCNNState(bufs, new_hidden, length + idx.size(1))  # (B, T, V)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B = idx.size(0)
        buf = self.wte.weight.new_zeros(B, self.config.kernel_size - 1, self.config.d_model)
        logits, _ = self._run(idx, [buf] * len(self.blocks), [None] * len(self.blocks), 0, None)
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RCNNState:
        p = self.wte.weight
        device = p.device if device is None else torch.device(device)
        k, d = self.config.kernel_size, self.config.d_model
        return RCNNState(
            conv=[torch.zeros(batch_size, k - 1, d, device=device, dtype=p.dtype) for _ in self.blocks],
            hidden=[zero_hidden(b.rnn, batch_size, device, p.dtype) for b in self.rcnn_blocks()],
            length=0,
        )

    def step(
        self, idx: torch.Tensor, state: RCNNState, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RCNNState]:
        return self._run(idx, state.conv, state.hidden, state.length, None if valid is None else valid.to(torch.bool))

    def reorder_state(self, state: RCNNState, index: torch.Tensor) -> RCNNState:
        return RCNNState(
            conv=[b.index_select(0, index) for b in state.conv],
            hidden=[select_hidden(h, index) for h in state.hidden],
            length=state.length,
        )

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x (convolution, recurrent and output weights): each is used once per token."""
        return 6.0 * self.num_params(exclude_embeddings=True)
