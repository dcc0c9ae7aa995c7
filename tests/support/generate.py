"""Stand-in models (independent references: a GRU and an attention model with the state contract),
a toy tokenizer, an uncached greedy decode and a brute-force beam search for the generation tests."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


class TinyGRU(nn.Module):
    """Recurrent stand-in: unbounded context, state = hidden vector (B, D)."""

    max_seq_len = None

    def __init__(self, vocab_size: int = 11, d: int = 16, seed: int = 0, sharpness: float = 3.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab_size)
        with torch.no_grad():
            self.head.weight.mul_(sharpness)  # peaky but not one-hot distributions

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h, _ = self.rnn(self.emb(idx))  # whole sequence at once: independent of step()
        return self.head(h), None

    def init_state(self, batch_size: int, device=None):
        return {"h": torch.zeros(1, batch_size, self.rnn.hidden_size, device=device), "n": 0}

    def step(self, idx: torch.Tensor, state, valid: torch.Tensor | None = None):
        B, T = idx.shape
        x = self.emb(idx)
        h = state["h"]
        outs = []
        for t in range(T):
            o, hn = self.rnn(x[:, t : t + 1], h)
            if valid is not None:
                hn = torch.where(valid[None, :, t, None], hn, h)
            h = hn
            outs.append(hn[0])
        return self.head(torch.stack(outs, 1)), {"h": h, "n": state["n"] + T}

    def reorder_state(self, state, index: torch.Tensor):
        return {"h": state["h"][:, index], "n": state["n"]}

    def state_length(self, state) -> int:
        return state["n"]


class TinyAttention(nn.Module):
    """Transformer stand-in: one attention block with learned positions and a growing KV cache that refuses
    to grow past ``max_seq_len`` slots (padding included), so the engine's context planning is checked."""

    def __init__(self, vocab_size: int = 11, d: int = 16, max_seq_len: int = 24, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(max_seq_len, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab_size)
        with torch.no_grad():
            self.head.weight.mul_(3.0)
        self.max_slots_used = 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        assert T <= self.max_seq_len
        x = self.emb(idx) + self.pos(torch.arange(T))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
        x = x + self.proj(att.softmax(-1) @ v)
        x = x + self.mlp(x)
        return self.head(x), None

    def init_state(self, batch_size: int, device=None):
        d = self.emb.embedding_dim
        return {
            "k": torch.zeros(batch_size, 0, d),
            "v": torch.zeros(batch_size, 0, d),
            "key_valid": torch.zeros(batch_size, 0, dtype=torch.bool),
            "pos": torch.zeros(batch_size, dtype=torch.long),
        }

    def step(self, idx: torch.Tensor, state, valid: torch.Tensor | None = None):
        B, T = idx.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool)
        S0 = state["k"].size(1)
        if S0 + T > self.max_seq_len:
            raise RuntimeError(f"cache overflow: {S0} + {T} > {self.max_seq_len}")
        self.max_slots_used = max(self.max_slots_used, S0 + T)
        pos = state["pos"][:, None] + valid.long().cumsum(1) - 1  # positions count valid tokens only
        x = self.emb(idx) + self.pos(pos.clamp(min=0))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        K = torch.cat([state["k"], k], 1)
        Vv = torch.cat([state["v"], v], 1)
        key_valid = torch.cat([state["key_valid"], valid], 1)  # (B, S)
        S = S0 + T
        causal = torch.arange(S)[None, :] <= (S0 + torch.arange(T))[:, None]  # (T, S)
        allowed = (causal[None] & key_valid[:, None, :]) | _self_slot(T, S, S0)[None]
        att = (q @ K.transpose(1, 2)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~allowed, float("-inf"))
        x = x + self.proj(att.softmax(-1) @ Vv)
        x = x + self.mlp(x)
        new = {"k": K, "v": Vv, "key_valid": key_valid, "pos": state["pos"] + valid.long().sum(1)}
        return self.head(x), new

    def reorder_state(self, state, index: torch.Tensor):
        return {key: val[index] for key, val in state.items()}

    def state_length(self, state) -> int:
        return state["k"].size(1)


def _self_slot(T: int, S: int, S0: int) -> torch.Tensor:
    """(T, S) bool: each query may see its own slot, so padding queries never attend to nothing (NaN)."""
    m = torch.zeros(T, S, dtype=torch.bool)
    m[torch.arange(T), S0 + torch.arange(T)] = True
    return m


class ToyTokenizer:
    """Tokens are fixed strings (some several characters long); the last id is the end-of-text token."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = list(pieces)
        self.eot_id = len(self.pieces)
        self.vocab_size = len(self.pieces) + 1

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] if i < len(self.pieces) else "" for i in ids)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match."""
        out, i = [], 0
        order = sorted(range(len(self.pieces)), key=lambda j: -len(self.pieces[j]))
        while i < len(text):
            j = next(j for j in order if text.startswith(self.pieces[j], i))
            out.append(j)
            i += len(self.pieces[j])
        return out


CHAR_PIECES = list("abcdefgh .")  # 10 single characters + eot = 11 ids


MULTI_PIECES = ["a", "b", "ab", "ba", "c", "abc", " ", "d", "cd", "."]  # 10 pieces + eot = 11 ids


def uncached_greedy(model, prompt: list[int], n: int, eos: list[int] | None = None) -> tuple[list[int], float]:
    """Reference: recompute the whole sequence with ``forward`` for every new token. Returns the new ids
    (eos left out) and the sum of log-probabilities of the generated tokens (eos included)."""
    seq, total = list(prompt), 0.0
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))
        logp = logits[0, -1].double().log_softmax(-1)
        tok = int(logp.argmax())
        total += float(logp[tok])
        if eos and tok in eos:
            break
        seq.append(tok)
    return seq[len(prompt) :], total


def brute_force(model, prompt, vocab, steps, eos, length_penalty):
    """Every completion of at most ``steps`` tokens that stops at the first eos, scored as HF does:
    sum_logprobs / (new tokens, eos included) ** length_penalty; best first."""
    full = list(itertools.product(range(vocab), repeat=steps))
    with torch.no_grad():  # one forward over every full-length continuation: prefix scores are partial sums
        logits = model(torch.tensor([prompt + list(s) for s in full]))[0].double()
    logp = logits.log_softmax(-1)[:, len(prompt) - 1 : len(prompt) - 1 + steps]  # (V**steps, steps, V)
    token_lp = logp.gather(2, torch.tensor(full)[:, :, None])[:, :, 0].cumsum(1)  # (V**steps, steps)
    prefix_lp = {s[:n]: float(token_lp[i, n - 1]) for i, s in enumerate(full) for n in range(1, steps + 1)}
    out = []
    for seq, lp in prefix_lp.items():
        n = len(seq)
        if eos in seq[:-1] or (n < steps and seq[-1] != eos):
            continue  # continues past an eos, or ends early without one
        ended = seq[-1] == eos
        out.append((lp / n**length_penalty, list(seq[:-1]) if ended else list(seq), "eos" if ended else "length"))
    return sorted(out, key=lambda x: -x[0])
