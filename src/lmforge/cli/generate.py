"""``lmforge generate MODEL "prompt"``: complete a prompt with any model lmforge can load.

MODEL is an lmforge run directory (its ``best/``), a checkpoint directory, a Hugging Face model directory
or ``hf:NAME``. Greedy decoding and sampling print the completion as it is produced; beam search and
several sampled sequences print each returned sequence at the end.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING

from lmforge.cli import UserError, command

if TYPE_CHECKING:  # the handler imports it when it runs: `lmforge --help` does not load torch
    from lmforge.predict.streaming import IncrementalDetokenizer

DEFAULT_NEW_TOKENS = 100


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="complete a prompt with a trained or Hugging Face model",
        description="Complete PROMPT with the model in MODEL (an lmforge run or checkpoint "
        "directory, a Hugging Face model directory, or hf:NAME).",
    )
    g.add_argument("model", metavar="MODEL", help="run dir (uses best/), checkpoint dir, HF dir or hf:NAME")
    g.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="prompt text ('-' reads standard input; default: start from the end-of-text token)",
    )
    g.add_argument(
        "--max-new-tokens", type=int, default=None, help="new tokens (default: 100, or what fits the model's context)"
    )
    g.add_argument("--max-length", type=int, default=None, help="prompt plus new tokens")
    g.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (default 1)")
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=None, help="beam search (default 1.0)")
    g.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam argmax")
    g.add_argument("--temperature", type=float, default=None, help="default 1.0")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None, help="default 1.0")
    g.add_argument("--repetition-penalty", type=float, default=None, help="default 1.0")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default 0 (off)")
    g.add_argument("--copy-bias", type=float, default=None, help="copy mechanism: boost what continues the prompt (default 0: off)")
    g.add_argument("--source-bias", type=float, default=None, help="boost every token of the prompt (default 0: off)")
    g.add_argument("--source-half-life", type=int, default=None, help="the source bias halves every N prompt tokens")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help="stop when the completion contains STR (repeatable)",
    )
    g.add_argument("--truncate-prompt", action="store_true", help="cut a too-long prompt from the left")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    g.add_argument("--quiet", action="store_true", help="print only the completion (no prompt, no summary)")


class _Printer:
    """Streams one row's completion to standard output through the one incremental detokenizer (which holds
    back a trailing partial character, U+FFFD, until it is complete)."""

    def __init__(self, detokenizer: IncrementalDetokenizer, prefix: str) -> None:
        self.detokenizer = detokenizer
        self.prefix: str | None = prefix

    @property
    def sent(self) -> str:
        """The text printed so far (after the prompt)."""
        return self.detokenizer.sent

    def start(self) -> None:
        """Print the prompt once, when there is output to follow it (not before an error)."""
        if self.prefix is not None:
            sys.stdout.write(self.prefix)
            self.prefix = None

    def __call__(self, row: int, ids: list[int]) -> None:
        self.start()
        delta = self.detokenizer.add(ids)
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()


@command("generate")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.predict import GenerationError, generate
    from lmforge.predict.generation_config import load_generation_defaults, with_defaults
    from lmforge.predict.loading import load_pretrained
    from lmforge.predict.streaming import IncrementalDetokenizer

    if overrides:
        raise UserError(f"unexpected arguments: {' '.join(overrides)}")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, _ = load_pretrained(args.model, map_location=device, native=True)
    prompt = sys.stdin.read() if args.prompt == "-" else (args.prompt or "")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    # the model's own decoding defaults (generation_config.json, e.g. chosen by lmforge tune --task) under the
    # flags the user gave (None: not given)
    defaults = load_generation_defaults(args.model)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else defaults.get("max_new_tokens")
    if max_new is None and args.max_length is None:
        # a default that fits the model's context instead of an error about a limit the user never set
        room = (model.max_seq_len - len(ids)) if model.max_seq_len else DEFAULT_NEW_TOKENS
        max_new = max(1, min(DEFAULT_NEW_TOKENS, room))
    flags = {
        "max_new_tokens": max_new,
        "max_length": args.max_length,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "copy_bias": args.copy_bias,
        "source_bias": args.source_bias,
        "source_half_life": args.source_half_life,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "num_return_sequences": args.num_return_sequences,
        "stop_strings": args.stop,
        "seed": args.seed,
        "truncate_prompt": args.truncate_prompt,
    }
    if args.max_length is not None and args.max_new_tokens is None:
        flags["max_new_tokens"] = None  # --max-length alone bounds the output
        defaults = {k: v for k, v in defaults.items() if k != "max_new_tokens"}
    try:
        gen = with_defaults(defaults, flags)
    except GenerationError as err:
        raise UserError(_flag_names(str(err))) from None
    stream = gen.num_beams == 1 and gen.num_return_sequences == 1
    printer = _Printer(IncrementalDetokenizer(tokenizer), "" if args.quiet else prompt) if stream else None
    t0 = time.perf_counter()
    try:
        out = generate(model, [ids], gen, tokenizer=tokenizer, streamer=printer)
    except GenerationError as err:
        raise UserError(_flag_names(str(err))) from None
    elapsed = time.perf_counter() - t0
    assert out.texts is not None  # a tokenizer was given
    texts, scores, reasons = out.texts[0], out.scores[0], out.finish_reasons[0]
    if printer is not None:  # streamed
        printer.start()
        rest = texts[0][len(printer.sent) :] if texts[0].startswith(printer.sent) else ""
        sys.stdout.write(rest + "\n")
    else:
        for j, (text, score, reason) in enumerate(zip(texts, scores, reasons, strict=True)):
            if args.quiet:
                print(text)
            else:
                print(f"--- sequence {j + 1} (score {score:.4f}, {reason}) ---\n{prompt}{text}")
    if not args.quiet:
        n_tokens = sum(len(s) for s in out.sequences[0])
        print(
            f"[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
            f"finished: {', '.join(reasons)}]",
            file=sys.stderr,
        )
    return 0


def _flag_names(message: str) -> str:
    """``GenerationConfig.num_beams = 0: ...`` -> ``--num-beams = 0: ...`` (the names the user typed)."""
    return re.sub(r"GenerationConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message).replace(
        "--stop-strings", "--stop"
    )
