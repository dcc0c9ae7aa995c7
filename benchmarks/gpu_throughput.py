"""GPU training throughput at the GPT-2 124M shape: tokens/s and MFU against the H200's bf16 dense peak.

lmforge's own training step as ``lmforge train`` runs it on CUDA: ``train.dtype auto`` (bf16 autocast),
``torch.compile`` (``train.compile true``), fused AdamW (``build_optimizer``), causal attention through SDPA
(flash attention on Hopper), batches copied from pinned memory. 12 layers x 12 heads x 768, vocabulary 50,304,
block 1,024. MFU = flops per token (6N plus attention, the PaLM/nanoGPT count) x tokens/s / peak.

    python benchmarks/gpu_throughput.py [--batch 16] [--steps 30] [--peak-tflops 989]

Needs a CUDA GPU (exits 2 without one). Prints a table and one line starting with ``RESULT``. Goal: MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lmforge.config import OptimConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.train.device import autocast_context, to_device
from lmforge.train.optim import build_optimizer

H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's H200 SXM bf16 dense tensor-core peak (the 1,979 TFLOPS figure is with 2:4 sparsity)."""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=12, n_head=12, d_model=768, dropout=0.0, max_seq_len=args.block)
    model = build_model(cfg, vocab_size=50304, max_seq_len=args.block).to(dev)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=6e-4, weight_decay=0.1))
    fwd = model if args.no_compile else torch.compile(model)
    autocast = autocast_context(dev, "auto")
    B, T = args.batch, args.block
    host = [(torch.randint(0, 50304, (B, T)), torch.randint(0, 50304, (B, T))) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        xb, yb = host[i % len(host)]
        x, y = to_device(xb, dev), to_device(yb, dev)
        with autocast:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step(0)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = B * T * args.steps / dt
    fpt = model.flops_per_token(T)
    mfu = fpt * tok_s / (args.peak_tflops * 1e12)
    print(f"{'GPU':<28} {torch.cuda.get_device_name(0)}")
    print(f"{'shape':<28} 12x12x768, vocab 50,304, block {T}, batch {B}, bf16, compile {not args.no_compile}")
    print(f"{'first step (compile)':<28} {first:.1f} s")
    print(f"{'tokens/s':<28} {tok_s:,.0f}")
    print(f"{'MFU':<28} {100 * mfu:.1f}% of {args.peak_tflops:.0f} TFLOPS (goal 40%)")
    print(f"{'peak memory':<28} {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; last loss {float(loss):.3f}")
    print("RESULT " + json.dumps({"bench": "gpu_throughput", "gpu": torch.cuda.get_device_name(0), "batch": B,
                                  "block": T, "compile": not args.no_compile, "tok_s": round(tok_s),
                                  "mfu": round(mfu, 4), "first_step_s": round(first, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
