"""Training throughput: lmforge's training step against Hugging Face GPT2LMHeadModel at the same shape.

Same shape (4 layers, 4 heads, width 128, block 64, batch 12, vocab 65), same random batches, fp32 on CPU;
rounds alternate between the systems so that machine noise hits all alike. Each system trains as its user
gets it: lmforge with ``build_optimizer`` (fused AdamW) eager, compiled regionally (each transformer block
compiled in place, what ``train.compile`` does) and compiled whole (``torch.compile(model)``, what it did
before); Hugging Face with the AdamW its Trainer picks on torch >= 2.8 (``adamw_torch_fused``), once with
GPT-2's default tanh GELU and once with the same exact GELU and biases as lmforge (the same math).

Compile time, per way, each measured in a fresh Python process (so every one pays inductor's start-up as a
trial does): cold (an empty inductor cache), warm (a new process on the cache the cold one filled: what
a later trial or run of the same shape gets from the cache ``train.compile`` keeps under
``LMFORGE_CACHE_DIR``) and new shape (a cache that holds another shape's artefacts: the CPU checks and
shared kernels are cached, this shape's graphs are not); the cost is the first step's time less a steady
compiled step's. ``--compile-reps N``
repeats the cold/warm pair N times (ways alternating) and reports the median. The compile-included rate is
over a run of ``--run-steps`` (2,000) steps: ``run tokens / (compile s + run tokens / steady rate)``,
extrapolated from the measured steady rate (the script times ``--rounds`` x ``--steps`` steps, not 2,000).

    python benchmarks/train_throughput.py [--steps 40] [--rounds 5] [--run-steps 2000] [--threads N]
                                          [--compile-reps 1] [--profile]

Prints a table, then one machine-readable line starting with ``RESULT``. Also writes the measured step times
and compile costs to lmforge's compile ledger (what ``train.compile: auto`` decides from): the ``new_shape``
cost as the key's first-compile cost, the ``warm`` one as its cached cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lmforge.config import OptimConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.train.compile import CompileHow, CompileLedger, compile_for_training, compile_key
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


def make_lmforge(d_model: int = SHAPE["d_model"]) -> torch.nn.Module:
    cfg = TransformerConfig(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], d_model=d_model, dropout=0.0)
    return build_model(cfg, vocab_size=SHAPE["vocab"], max_seq_len=SHAPE["block"])


def make_hf(activation: str = "gelu_new") -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=SHAPE["vocab"], n_positions=SHAPE["block"], n_embd=SHAPE["d_model"],
                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False, activation_function=activation)
    return GPT2LMHeadModel(cfg)


ADAMW = OptimConfig(name="adamw", lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)


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


def probe_compile(how: CompileHow, threads: int, d_model: int, steps: int = 6) -> None:
    """(In a fresh process) compile lmforge's model ``how``, time its first step and ``steps`` steady ones;
    print one JSON line. The inductor cache is the one ``TORCHINDUCTOR_CACHE_DIR`` names."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, T, V = SHAPE["batch"], SHAPE["block"], SHAPE["vocab"]
    model = make_lmforge(d_model)
    opt = build_optimizer(model, ADAMW)
    fwd, _ = compile_for_training(model, how)
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(steps + 1)]
    first = timed_steps(fwd, opt, batches[:1], hf=False)
    timed_steps(fwd, opt, batches[1:2], hf=False)
    steady = timed_steps(fwd, opt, batches[2:], hf=False) / (steps - 1)
    print(json.dumps({"how": how, "first_s": first, "steady_s": steady, "cost_s": max(0.0, first - steady)}))


OTHER_WIDTH = 96
"""The width of the other shape that fills a cache before the ``new_shape`` measurement."""


def _probe(how: str, threads: int, cache: str, d_model: int) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--probe-compile", how, "--threads", str(threads),
                          "--probe-width", str(d_model)], env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["cost_s"])


def compile_costs(threads: int, reps: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{how: {kind: s}}, the median over ``reps``, every compile in a fresh process, ways alternating:
    ``cold`` (an empty cache: a machine's first compile ever), ``warm`` (a second process on that cache: the
    same shape again) and ``new_shape`` (a cache that holds another shape, width 96: what a trial of a shape
    not compiled before pays on a machine that has compiled others -- what ``train.compile: auto`` weighs)."""
    kinds = ("cold", "warm", "new_shape")
    costs: dict[str, dict[str, list[float]]] = {h: {k: [] for k in kinds} for h in ("regional", "whole")}
    width = SHAPE["d_model"]
    for _ in range(reps):
        fresh = {h: tempfile.mkdtemp(prefix=f"lmforge-bench-{h}-") for h in costs}
        other = {h: tempfile.mkdtemp(prefix=f"lmforge-bench-{h}-other-") for h in costs}
        for how in costs:
            _probe(how, threads, other[how], OTHER_WIDTH)  # fills the cache with another shape
        for kind in kinds:
            for how in costs:
                cache = other[how] if kind == "new_shape" else fresh[how]
                costs[how][kind].append(_probe(how, threads, cache, width))
    return {h: {k: statistics.median(v) for k, v in ks.items()} for h, ks in costs.items()}, fresh


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
    ap.add_argument("--compile-reps", type=int, default=1, help="cold/warm compile measurements per way")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of the lmforge step")
    ap.add_argument("--probe-compile", choices=["regional", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--probe-width", type=int, default=SHAPE["d_model"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = args.threads or available_cores()
    if args.probe_compile:
        probe_compile(args.probe_compile, threads, args.probe_width)
        return
    set_threads(threads)
    costs, caches = compile_costs(threads, args.compile_reps)
    torch.manual_seed(0)
    B, T, V = SHAPE["batch"], SHAPE["block"], SHAPE["vocab"]
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(args.steps)]
    fused = {"fused": True}
    models = {"lmforge": make_lmforge(), "lmforge_regional": make_lmforge(), "lmforge_whole": make_lmforge(),
              "hf_gpt2": make_hf(), "hf_gpt2_exact_gelu": make_hf("gelu")}
    for k in ("lmforge_regional", "lmforge_whole"):
        models[k].load_state_dict(models["lmforge"].state_dict())
    opts = {k: (build_optimizer(m, ADAMW) if k.startswith("lmforge")
                else torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, **fused))
            for k, m in models.items()}
    fwds = {k: m for k, m in models.items()}
    for how in ("regional", "whole"):  # in-process compiles warm from the probes' caches: their cost is above
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = caches[how]
        fwds[f"lmforge_{how}"], _ = compile_for_training(models[f"lmforge_{how}"], how)  # type: ignore[arg-type]
        timed_steps(fwds[f"lmforge_{how}"], opts[f"lmforge_{how}"], batches[:1], hf=False)
    for k, m in models.items():  # warm-up
        m.train()
        timed_steps(fwds[k], opts[k], batches[:5], hf=k.startswith("hf"))
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k in models:
            dt = timed_steps(fwds[k], opts[k], batches, hf=k.startswith("hf"))
            rates[k].append(B * T * args.steps / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    run_tokens = args.run_steps * B * T
    incl = {f"{how}_{kind}": run_tokens / (cost + run_tokens / med[f"lmforge_{how}"])
            for how, kinds in costs.items() for kind, cost in kinds.items()}
    peak = peak_matmul_flops()
    fpt = models["lmforge"].flops_per_token(T)
    base = med["hf_gpt2_exact_gelu"]
    print(f"{'system':<40} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'MFU':>7} {'vs HF same math':>16}")
    for k, v in rates.items():
        print(f"{k:<40} {med[k]:>18,.0f} {min(v):>10,.0f} {max(v):>10,.0f} {100 * fpt * med[k] / peak:>6.2f}% "
              f"{med[k] / base:>15.2f}x")
    for name, r in incl.items():
        how, kind = name.split("_", 1)
        label = f"lmforge_{how} incl. {kind} compile"
        print(f"{label:<40} {r:>18,.0f} {'':>10} {'':>10} {100 * fpt * r / peak:>6.2f}% {r / base:>15.2f}x")
    print("compile seconds (fresh process each, median of " f"{args.compile_reps}): " + "; ".join(
        f"{how} cold {k['cold']:.1f} s, new shape {k['new_shape']:.1f} s, warm {k['warm']:.1f} s"
        for how, k in costs.items())
        + f"; compile-included rates over a {args.run_steps:,}-step run, extrapolated from the steady rate; "
        f"peak fp32 matmul {peak / 1e9:,.1f} GFLOP/s; threads {torch.get_num_threads()}")
    ledger = CompileLedger()
    for how in ("regional", "whole"):
        key = compile_key(models["lmforge"], B, T, "auto", torch.device("cpu"), how=how)  # type: ignore[arg-type]
        ledger.update(key, "cpu", how=how, eager_step_s=B * T / med["lmforge"], compiled_step_s=B * T / med[f"lmforge_{how}"],
                      compile_cold_s=costs[how]["new_shape"], compile_warm_s=costs[how]["warm"])
    if args.profile:
        print("\n== profile: lmforge eager step (fused AdamW), 10 steps ==")
        print(profile_table(models["lmforge"], opts["lmforge"], batches[:10]))
        print("== profile: lmforge regionally compiled step, 10 steps ==")
        print(profile_table(fwds["lmforge_regional"], opts["lmforge_regional"], batches[:10]))
    print("RESULT " + json.dumps({
        "bench": "train_throughput", "threads": torch.get_num_threads(),
        **{f"{k}_tok_s": round(v) for k, v in med.items()},
        **{f"lmforge_{k}_compile_incl_tok_s": round(v) for k, v in incl.items()},
        **{f"compile_{how}_{kind}_s": round(c, 2) for how, kinds in costs.items() for kind, c in kinds.items()},
        "ratio_eager_same_math": round(med["lmforge"] / base, 3),
        **{f"ratio_{how}_same_math": round(med[f"lmforge_{how}"] / base, 3) for how in ("regional", "whole")},
        **{f"ratio_{k}_compile_incl_same_math": round(v / base, 3) for k, v in incl.items()},
        "ratio_eager_vs_hf_default_gelu": round(med["lmforge"] / med["hf_gpt2"], 3),
        "mfu_lmforge_regional": round(fpt * med["lmforge_regional"] / peak, 4),
        "peak_gflops": round(peak / 1e9, 1)}))


if __name__ == "__main__":
    main()
