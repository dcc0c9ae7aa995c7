"""Generation throughput: lmforge's engine vs Hugging Face ``generate`` on the same exported model.

A small GPT-2-format lmforge transformer (random weights) is exported with ``lmforge.export`` and loaded back
with ``AutoModelForCausalLM``; both decode the same random prompts with greedy search and 5-beam search at
batch 1 and batch 8. lmforge runs twice: with its C++ decoding step (``lmforge.models.native``, built on first
use) and in pure Python (``LMFORGE_NATIVE_DECODE=0``, what a machine without a C++ compiler gets). No end-of-sequence token (every run produces exactly ``--new-tokens`` per prompt), rounds
alternate between the two implementations (and which goes first) because the machine is shared and noisy;
the median of the rounds is reported. tokens/s counts returned new tokens (one sequence per prompt).

    python benchmarks/generate_throughput.py [--rounds 5 --new-tokens 64 --threads 1]

Prints a table and a final ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace, root: Path):
    from transformers import AutoModelForCausalLM

    from lmforge.config import build_config
    from lmforge.data.tokenizer import byte_tokenizer
    from lmforge.export import export_model
    from lmforge.models import build_model
    from lmforge.runs import save_checkpoint

    tok = byte_tokenizer()  # 257 ids
    cfg = build_config(
        {
            "model": {"family": "transformer", "n_layer": args.layers, "d_model": args.width, "n_head": args.heads},
            "data": {"block_size": args.context},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len)
    cfg = cfg.model_copy(update={"model": model.config})
    save_checkpoint(root / "ckpt", model=model, config_yaml=cfg.to_yaml(), tokenizer=tok)
    export_model(root / "ckpt", root / "hf")
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval().to(args.device)
    hf.generation_config.eos_token_id = None  # both sides decode exactly --new-tokens tokens
    return model.eval().to(args.device), hf, tok.vocab_size


def run_lmforge(model, prompts: torch.Tensor, beams: int, new: int, use_native: bool = True) -> list[list[int]]:
    from lmforge.models import native
    from lmforge.predict import GenerationConfig, generate

    gen = GenerationConfig(max_new_tokens=new, num_beams=beams, eos_token_id=[])
    native.set_enabled(use_native)
    try:
        return [s[0] for s in generate(model, prompts, gen).sequences]
    finally:
        native.set_enabled(None)


def run_python(model, prompts: torch.Tensor, beams: int, new: int) -> list[list[int]]:
    return run_lmforge(model, prompts, beams, new, use_native=False)


def run_hf(hf, prompts: torch.Tensor, beams: int, new: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            num_beams=beams,
            do_sample=False,
            pad_token_id=0,
            early_stopping=False,
        )
    return out[:, prompts.size(1) :].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the default 1 keeps shared machines quiet)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model, hf, vocab = build(args, Path(tmp))
    g = torch.Generator().manual_seed(1)
    cases = [(mode, beams, batch) for mode, beams in (("greedy", 1), ("beam5", 5)) for batch in (1, 8)]
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=g).to(args.device) for b in (1, 8)}
    from lmforge.models import native

    has_native = native.decode_step() is not None
    times: dict[tuple, dict[str, list[float]]] = {c: {"lmforge": [], "python": [], "hf": []} for c in cases}
    agree: dict[tuple, bool] = {}
    for c in cases:  # warm-up, and the outputs must agree
        _, beams, batch = c
        theirs = run_hf(hf, prompts[batch], beams, 4)
        agree[c] = run_lmforge(model, prompts[batch], beams, 4) == theirs == run_python(model, prompts[batch], beams, 4)
    for r in range(args.rounds):
        for c in cases:
            _, beams, batch = c
            order = (("lmforge", run_lmforge, model), ("python", run_python, model), ("hf", run_hf, hf))
            for name, fn, m in order if r % 2 == 0 else order[::-1]:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(m, prompts[batch], beams, args.new_tokens)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[c][name].append(time.perf_counter() - t0)

    rows = []
    print(
        f"model: GPT-2 format, {args.layers} layers, width {args.width}, vocab {vocab}; prompt {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens, {args.rounds} rounds, {args.threads} thread(s), {args.device}; "
        f"C++ decoding step: {'yes' if has_native else 'NOT AVAILABLE (both lmforge columns run Python)'}"
    )
    print(
        f"{'mode':<8}{'batch':>6}{'lmforge tok/s':>15}{'python tok/s':>14}{'hf tok/s':>11}{'ratio':>8}"
        f"{'python ratio':>14}{'agree(4 tok)':>14}"
    )
    for c in cases:
        mode, _, batch = c
        n = batch * args.new_tokens
        ours = n / statistics.median(times[c]["lmforge"])
        py = n / statistics.median(times[c]["python"])
        theirs = n / statistics.median(times[c]["hf"])
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "lmforge_tok_s": round(ours, 1),
                "python_tok_s": round(py, 1),
                "hf_tok_s": round(theirs, 1),
                "ratio": round(ours / theirs, 2),
                "python_ratio": round(py / theirs, 2),
                "outputs_agree": agree[c],
            }
        )
        print(
            f"{mode:<8}{batch:>6}{ours:>15.1f}{py:>14.1f}{theirs:>11.1f}{ours / theirs:>8.2f}{py / theirs:>14.2f}"
            f"{str(agree[c]):>14}"
        )
    print(
        "RESULT "
        + json.dumps(
            {
                "benchmark": "generate_throughput",
                "device": args.device,
                "threads": args.threads,
                "native_decode": has_native,
                "new_tokens": args.new_tokens,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
