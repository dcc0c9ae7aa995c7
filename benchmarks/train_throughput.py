"""Training throughput: lmforge's training step against Hugging Face GPT2LMHeadModel at the same shape.

Same shape (4 layers, 4 heads, width 128, block 64, batch 12, vocab 65), same random batches, fp32 on CPU;
rounds alternate between the systems so that machine noise hits all alike. Each system trains as its user
gets it: lmforge with ``build_optimizer`` (fused AdamW) eager and compiled (``torch.compile``, what
``train.compile`` does); Hugging Face with the AdamW its Trainer picks on torch >= 2.8 (``adamw_torch_fused``),
once with GPT-2's default tanh GELU and once with the same exact GELU and biases as lmforge (the same math).

Compile time: the first compile is cold (an empty inductor cache) or, with ``--inductor-cache DIR`` of an
earlier run, a warm start from disk (what ``train.compile`` gets from the cache it keeps under
``LMFORGE_CACHE_DIR``); "again" is a second compile in the same process after ``torch._dynamo.reset()``.
The compile-included rate is over a run of
``--run-steps`` (2,000) steps: ``run tokens / (compile s + run tokens / steady rate)``, extrapolated from the
measured steady rate (the script times ``--rounds`` x ``--steps`` steps, not the whole 2,000).

    python benchmarks/train_throughput.py [--steps 40] [--rounds 5] [--run-steps 2000] [--threads N]
                                          [--inductor-cache DIR] [--profile]

Prints a table, then one machine-readable line starting with ``RESULT``. Also writes the measured step times
and compile costs to lmforge's compile ledger (what ``train.compile: auto`` decides from).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from lmforge.config import OptimConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.train.compile import CompileLedger, compile_key
from lmforge.train.optim import build_optimizer
from lmforge.train.threads import available_cores, set_threads

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


def timed_steps(fwd, opt, batches, hf: bool) -> float:
    t = time.perf_counter()
    for x, y in batches:
        if hf:
            loss = fwd(input_ids=x, labels=x).loss  # HF shifts labels inside: same work as x->y
        else:
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def compile_cost(model, opt, batch, steady_step_s: float) -> float:
    """Seconds the first step of a freshly compiled ``model`` costs beyond a steady compiled step."""
    torch._dynamo.reset()
    fwd = torch.compile(model)
    return max(0.0, timed_steps(fwd, opt, [batch], hf=False) - steady_step_s)


def profile_table(fwd, opt, batches, rows: int = 15) -> str:
    """torch.profiler's operator table (self CPU time) over ``batches`` training steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_steps(fwd, opt, batches, hf=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of the lmforge step")
    ap.add_argument("--inductor-cache", help="inductor cache folder (default: a new empty one, so the first "
                    "compile is cold; an earlier run's folder makes it a warm start from disk)")
    args = ap.parse_args()
    set_threads(args.threads or available_cores())
    # a cold compile needs an empty cache: this run's own folder, unless --inductor-cache names one
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="lmforge-bench-inductor-")
    first_kind = "warm from disk" if args.inductor_cache else "cold"
    torch.manual_seed(0)
    B, T, V = SHAPE["batch"], SHAPE["block"], SHAPE["vocab"]
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(args.steps)]
    fused = {"fused": True}
    models = {"lmforge": make_lmforge(), "hf_gpt2": make_hf(), "hf_gpt2_exact_gelu": make_hf("gelu")}
    models["lmforge_compiled"] = make_lmforge()
    models["lmforge_compiled"].load_state_dict(models["lmforge"].state_dict())
    adamw = OptimConfig(name="adamw", lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    opts = {k: (build_optimizer(m, adamw) if k.startswith("lmforge")
                else torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, **fused))
            for k, m in models.items()}
    fwds = {k: m for k, m in models.items()}
    # the first compile: the first step of the compiled model
    t = time.perf_counter()
    fwds["lmforge_compiled"] = torch.compile(models["lmforge_compiled"])
    timed_steps(fwds["lmforge_compiled"], opts["lmforge_compiled"], batches[:1], hf=False)
    first_cold = time.perf_counter() - t
    for k, m in models.items():  # warm-up
        m.train()
        timed_steps(fwds[k], opts[k], batches[:5], hf=k.startswith("hf"))
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k in models:
            dt = timed_steps(fwds[k], opts[k], batches, hf=k.startswith("hf"))
            rates[k].append(B * T * args.steps / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    steady = B * T / med["lmforge_compiled"]
    cold = max(0.0, first_cold - steady)
    # compile again in this process: the artefacts are cached; dynamo's tracing is redone
    warm = compile_cost(models["lmforge_compiled"], opts["lmforge_compiled"], batches[0], steady)
    run_tokens = args.run_steps * B * T

    def with_compile(cost: float) -> float:
        return run_tokens / (cost + run_tokens / med["lmforge_compiled"])

    incl = {first_kind: with_compile(cold), "in-process again": with_compile(warm)}
    peak = peak_matmul_flops()
    fpt = models["lmforge"].flops_per_token(T)
    base = med["hf_gpt2_exact_gelu"]
    print(f"{'system':<34} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'MFU':>7} {'vs HF same math':>16}")
    for k, v in rates.items():
        print(f"{k:<34} {med[k]:>18,.0f} {min(v):>10,.0f} {max(v):>10,.0f} {100 * fpt * med[k] / peak:>6.2f}% "
              f"{med[k] / base:>15.2f}x")
    for kind, r in incl.items():
        name = f"lmforge_compiled incl. {kind} compile"
        print(f"{name:<34} {r:>18,.0f} {'':>10} {'':>10} {100 * fpt * r / peak:>6.2f}% {r / base:>15.2f}x")
    print(f"compile: first ({first_kind}) {cold:.1f} s, again in-process after dynamo reset {warm:.1f} s; compile-included rates over a "
          f"{args.run_steps:,}-step run, extrapolated from the steady rate; peak fp32 matmul {peak / 1e9:,.1f} GFLOP/s; "
          f"threads {torch.get_num_threads()}")
    key = compile_key(models["lmforge"], B, T, "auto", torch.device("cpu"))
    CompileLedger().update(key, "cpu", eager_step_s=B * T / med["lmforge"], compiled_step_s=steady,
                           **({"compile_warm_s": cold} if args.inductor_cache else {"compile_cold_s": cold}))
    if args.profile:
        print("\n== profile: lmforge eager step (fused AdamW), 10 steps ==")
        print(profile_table(models["lmforge"], opts["lmforge"], batches[:10]))
        print("== profile: lmforge compiled step, 10 steps ==")
        print(profile_table(fwds["lmforge_compiled"], opts["lmforge_compiled"], batches[:10]))
    print("RESULT " + json.dumps({
        "bench": "train_throughput", "threads": torch.get_num_threads(),
        **{f"{k}_tok_s": round(v) for k, v in med.items()},
        "first_compile": first_kind, "lmforge_compiled_incl_first_compile_tok_s": round(incl[first_kind]),
        "first_compile_s": round(cold, 2), "compile_again_s": round(warm, 2),
        "ratio_eager_same_math": round(med["lmforge"] / base, 3),
        "ratio_compiled_same_math": round(med["lmforge_compiled"] / base, 3),
        "ratio_compiled_incl_first_compile_same_math": round(incl[first_kind] / base, 3),
        "ratio_eager_vs_hf_default_gelu": round(med["lmforge"] / med["hf_gpt2"], 3),
        "mfu_lmforge_compiled": round(fpt * med["lmforge_compiled"] / peak, 4),
        "peak_gflops": round(peak / 1e9, 1)}))


if __name__ == "__main__":
    main()
