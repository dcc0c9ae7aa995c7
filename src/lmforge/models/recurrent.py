"""Stacked LSTM / GRU language models.

One ``nn.LSTM`` / ``nn.GRU`` per layer (so ``residual`` can add a layer's input to its output from the second
layer on), embedding width = hidden width = ``d_model``, dropout on the embeddings and after every layer, and an
output projection that shares the embedding matrix when ``tie_embeddings``.

Incremental state (:class:`RecurrentState`): per layer the hidden state, ``h`` (1, B, d) for a GRU and a tuple
``(h, c)`` for an LSTM. With left padding (``valid`` not all True) ``step`` runs token by token and keeps the
state of rows whose token is padding unchanged; otherwise the whole chunk goes through cuDNN/MKL at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union, cast

import torch
from torch import nn

from lmforge.config import ConfigError, RCNNConfig, RecurrentConfig
from lmforge.models.base import LanguageModel, lm_loss, without_onednn

Hidden = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
"""One layer's recurrent state: h (1, B, d) for a GRU, (h, c) for an LSTM."""


@dataclass
class RecurrentState:
    hidden: list[Hidden]
    """Per layer."""
    length: int
    """Tokens consumed (padding included)."""


def zero_hidden(rnn: nn.RNNBase, batch_size: int, device: torch.device, dtype: torch.dtype) -> Hidden:
    h = torch.zeros(1, batch_size, rnn.hidden_size, device=device, dtype=dtype)
    return (h, torch.zeros_like(h)) if isinstance(rnn, nn.LSTM) else h


def select_hidden(hidden: Hidden, index: torch.Tensor) -> Hidden:
    """Rows ``index`` of a layer's state (the batch is dim 1)."""
    if isinstance(hidden, tuple):
        return (hidden[0].index_select(1, index), hidden[1].index_select(1, index))
    return hidden.index_select(1, index)


def _keep(keep: torch.Tensor, new: Hidden, old: Hidden) -> Hidden:
    """``new`` where ``keep`` (1, B, 1) is True, else ``old``."""
    if isinstance(new, tuple):
        return (torch.where(keep, new[0], old[0]), torch.where(keep, new[1], old[1]))
    assert not isinstance(old, tuple)  # both are states of the same layer
    return torch.where(keep, new, old)


def run_rnn(
    rnn: nn.RNNBase, x: torch.Tensor, hidden: Hidden | None, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, Hidden]:
    """x (B, T, d_in) -> outputs (B, T, d), final state. ``valid`` (B, T) bool: False tokens leave the state
    unchanged (their outputs are computed but meaningless)."""
    if valid is None or bool(valid.all()):
        return rnn(x, hidden)
    B, T, _ = x.size()
    if hidden is None:
        hidden = zero_hidden(rnn, B, x.device, x.dtype)
    outs = []
    for t in range(T):
        out, new = rnn(x[:, t : t + 1], hidden)  # out (B, 1, d)
        hidden = _keep(valid[:, t].view(1, B, 1), new, hidden)
        outs.append(out)
    return torch.cat(outs, dim=1), hidden


def non_embedding_params(model: nn.Module, wte: nn.Embedding, tied: bool) -> int:
    """Unique parameters minus the token lookup table (kept when tied: it is also the output matmul)."""
    n = sum(p.numel() for p in model.parameters())
    return n if tied else n - wte.weight.numel()


class TokenTableLM(LanguageModel):
    """What the recurrent families share: a token table ``wte`` (tied to the output layer or not) and a state
    that counts its tokens in ``length``."""

    config: RecurrentConfig | RCNNConfig

    def _token_table(self, cfg: RecurrentConfig | RCNNConfig) -> None:
        """The config, the token table and its dropout (first, so that parameters keep their order)."""
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (build the model with build_model(cfg, vocab_size=...))")
        self.config = cfg
        self.max_seq_len = None
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _output_layer(self, cfg: RecurrentConfig | RCNNConfig) -> None:
        """The output projection (tied or not), then the table's and its initialisation as the transformer's
        (after the body, which keeps PyTorch's own initialisation)."""
        assert cfg.vocab_size is not None  # _token_table refused a config without it
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def state_length(self, state: RecurrentState) -> int:  # RCNNState too: both count tokens in ``length``
        return state.length

    def decoding(self) -> contextlib.AbstractContextManager:
        # oneDNN's LSTM costs ~3x the native one per one-token step (rcnn's one-token convolutions take no kernel)
        return without_onednn()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights once); ``exclude_embeddings`` leaves out the token lookup table
        unless it is tied (then it is also the output layer)."""
        if exclude_embeddings:
            return non_embedding_params(self, self.wte, self.config.tie_embeddings)
        return sum(p.numel() for p in self.parameters())


class RecurrentModel(TokenTableLM):
    """Stacked LSTM or GRU language model (``RecurrentConfig.family``)."""

    config: RecurrentConfig

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        self._token_table(cfg)
        rnn_cls = nn.LSTM if cfg.family == "lstm" else nn.GRU
        self.layers = nn.ModuleList([rnn_cls(cfg.d_model, cfg.d_model, batch_first=True) for _ in range(cfg.n_layer)])
        self._output_layer(cfg)  # recurrent weights keep PyTorch's uniform(+-1/sqrt(d)) init

    def rnns(self) -> Sequence[nn.RNNBase]:
        """The layers (``nn.LSTM`` or ``nn.GRU``), typed: ``nn.ModuleList`` is not generic."""
        return cast(Sequence[nn.RNNBase], self.layers)

    def _run(
        self, idx: torch.Tensor, hidden: list[Hidden | None], valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Hidden]]:
        x = self.drop(self.wte(idx))  # (B, T, d)
        new_hidden = []
        for i, rnn in enumerate(self.rnns()):
            y, h = run_rnn(rnn, x, hidden[i], valid)  # (B, T, d)
            x = self.drop(x + y if self.config.residual and i > 0 else y)
            new_hidden.append(h)
        return self.lm_head(x), new_hidden  # (B, T, V)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, _ = self._run(idx, [None] * len(self.layers), None)
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        p = self.wte.weight
        device = p.device if device is None else torch.device(device)
        return RecurrentState([zero_hidden(rnn, batch_size, device, p.dtype) for rnn in self.rnns()], 0)

    def step(
        self, idx: torch.Tensor, state: RecurrentState, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RecurrentState]:
        logits, hidden = self._run(idx, list(state.hidden), None if valid is None else valid.to(torch.bool))
        return logits, RecurrentState(hidden, state.length + idx.size(1))

    def reorder_state(self, state: RecurrentState, index: torch.Tensor) -> RecurrentState:
        return RecurrentState([select_hidden(h, index) for h in state.hidden], state.length)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x (recurrent weights + output layer): every one is used in one matmul per token."""
        return 6.0 * self.num_params(exclude_embeddings=True)
