"""Training throughput: lmforge's transformer against Hugging Face GPT2LMHeadModel at the same shape.

Same shape (4 layers, 4 heads, width 128, block 64, batch 12, vocab 65), same AdamW, same random batches,
fp32 on CPU; rounds alternate between the two so that machine noise hits both alike. Also reports MFU
against the measured peak of a large fp32 matmul on this machine.

    python benchmarks/train_throughput.py [--steps 40] [--rounds 5]

Prints a table, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.config import TransformerConfig
from lmforge.models import build_model

SHAPE = dict(n_layer=4, n_head=4, d_model=128, block=64, batch=12, vocab=65)


def peak_matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def make_lmforge() -> torch.nn.Module:
    cfg = TransformerConfig(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], d_model=SHAPE["d_model"], dropout=0.0)
    return build_model(cfg, vocab_size=SHAPE["vocab"], max_seq_len=SHAPE["block"])


def make_hf(activation: str = "gelu_new") -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=SHAPE["vocab"], n_positions=SHAPE["block"], n_embd=SHAPE["d_model"],
                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False, activation_function=activation)
    return GPT2LMHeadModel(cfg)


def timed_steps(model, opt, batches, hf: bool) -> float:
    t = time.perf_counter()
    for x, y in batches:
        if hf:
            loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside: same work as x->y
        else:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, T, V = SHAPE["batch"], SHAPE["block"], SHAPE["vocab"]
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(args.steps)]
    # lmforge's default MLP uses exact GELU (as nanoGPT); GPT-2's default is the tanh approximation
    # ("gelu_new"), so HF is measured both ways: as a user gets it, and with the same exact GELU
    models = {"lmforge": make_lmforge(), "hf_gpt2": make_hf(), "hf_gpt2_exact_gelu": make_hf("gelu")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
            for k, m in models.items()}
    for k, m in models.items():  # warm-up
        m.train()
        timed_steps(m, opts[k], batches[:5], hf=k.startswith("hf"))
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            dt = timed_steps(m, opts[k], batches, hf=k.startswith("hf"))
            rates[k].append(B * T * args.steps / dt)
    peak = peak_matmul_flops()
    fpt = models["lmforge"].flops_per_token(T)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["lmforge"] / med["hf_gpt2"]
    ratio_exact = med["lmforge"] / med["hf_gpt2_exact_gelu"]
    print(f"{'model':<20} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'MFU':>7}")
    for k, v in rates.items():
        print(f"{k:<20} {med[k]:>18,.0f} {min(v):>10,.0f} {max(v):>10,.0f} {100 * fpt * med[k] / peak:>6.2f}%")
    print(f"ratio lmforge/hf_gpt2 = {ratio:.2f}x (goal >= 1.2x); against HF with the same exact GELU "
          f"{ratio_exact:.2f}x; peak fp32 matmul {peak / 1e9:,.1f} GFLOP/s; threads {torch.get_num_threads()}")
    print("RESULT " + json.dumps({"bench": "train_throughput", "lmforge_tok_s": round(med["lmforge"]),
                                  "hf_gpt2_tok_s": round(med["hf_gpt2"]), "ratio": round(ratio, 3),
                                  "hf_gpt2_exact_gelu_tok_s": round(med["hf_gpt2_exact_gelu"]),
                                  "ratio_same_gelu": round(ratio_exact, 3),
                                  "mfu_lmforge": round(fpt * med["lmforge"] / peak, 4),
                                  "peak_gflops": round(peak / 1e9, 1)}))


if __name__ == "__main__":
    main()
