"""``lmforge eval MODEL --data ... [--task ...] [--json OUT]``: perplexity or task metrics of a model.

``--task lm`` scores a corpus (perplexity, bits per byte); a task predicts every record and scores the
predictions (ROUGE, BLEU/chrF, accuracy/macro-F1, exact match) and the reference completions'
perplexity. Without ``--task``, the task (fields, label set) a model was fine-tuned on is read from its
run's ``task.json``, else ``lm``. A model trained with retrieved examples in its prompts (``lmforge tune
--task`` wrote its ``retrieval.json``) gets them here too, from the same index. ``--json`` writes the report
with every example's prompt, reference, prediction and scores.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lmforge.cli import UserError, command
from lmforge.config import TASK_NAMES

if TYPE_CHECKING:  # the handler imports it when it runs: `lmforge --help` does not load torch
    from lmforge.predict import GenerationConfig


def add_parser(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity / bits per byte, or task metrics",
        description="Evaluate MODEL (an lmforge run/checkpoint or a Hugging Face directory) on --data.",
    )
    p.add_argument("model", metavar="MODEL", help="run dir (uses best/), checkpoint dir or Hugging Face dir")
    p.add_argument("--data", required=True, help="text corpus (lm) or task records (.jsonl/.json/.csv, hf:NAME)")
    p.add_argument(
        "--task",
        default=None,
        choices=TASK_NAMES,
        help="default: the task the model was fine-tuned on (its run's task.json), else lm",
    )
    p.add_argument("--fields", default=None, help="ROLE=FIELD pairs, e.g. document=article,summary=highlights")
    p.add_argument("--labels", default=None, help="classification label set, comma separated")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report (with every example) to OUT")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N records/documents")
    p.add_argument("--split", default="train", help="split of an hf:NAME dataset")
    p.add_argument("--text-field", default="text", help="lm: field of JSONL/dataset documents")
    p.add_argument("--block-size", type=int, default=None, help="lm: context window (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generative tasks (default: the model's generation_config.json, else per task)",
    )
    p.add_argument("--num-beams", type=int, default=None, help="default: the model's generation_config.json, else 1")
    p.add_argument("--length-penalty", type=float, default=None, help="beam search (default: the model's, else 1.0)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the model's, else 0")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--copy-bias", type=float, default=None, help="copy mechanism (default: the model's, else 0: off)")
    p.add_argument("--source-bias", type=float, default=None, help="boost of prompt tokens (default: the model's, else 0)")
    p.add_argument("--source-half-life", type=int, default=None, help="source bias halves every N prompt tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--show", type=int, default=3, help="print this many example predictions")


def _task_info(model: str) -> dict[str, Any]:
    from lmforge.runs import read_task_file

    return read_task_file(model)


@command("eval")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from lmforge.evaluate import evaluate_lm, evaluate_task
    from lmforge.predict.loading import load_pretrained

    if overrides:
        raise UserError(f"unexpected arguments: {' '.join(overrides)}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    info = _task_info(args.model)
    task = args.task or info.get("task") or "lm"
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, _ = load_pretrained(args.model, map_location=device, native=True)

    if task == "lm":
        from lmforge.data import read_documents

        docs = read_documents(
            args.data, text_field=args.text_field, hf_split=args.split, max_documents=args.max_examples
        )
        report = evaluate_lm(model, tokenizer, docs.texts, block_size=args.block_size, batch_size=args.batch_size)
    else:
        from lmforge.data.tasks import read_task_records

        same = info.get("task") == task
        fields = args.fields or (info.get("fields") if same else None)
        records = read_task_records(args.data, task, fields, hf_split=args.split, max_records=args.max_examples)
        from lmforge.data.retrieval import attach
        from lmforge.runs import load_retrieval

        index = load_retrieval(args.model)  # the training examples its prompts showed in training, if any
        if index is not None and index.task.name == task:
            records = attach(index, records)
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
        if task == "classification" and labels is None and same and info.get("labels"):
            labels = list(info["labels"])
            extra = sorted({r["label"] for r in records} - set(labels))
            if extra:
                raise UserError(f"{args.data}: label(s) {extra} are not among the fine-tuned labels {labels}")
        # a bad value raises GenerationError, an LmforgeError: the CLI prints it as one line (exit status 2)
        gen = _generation_config(args, task)
        report = evaluate_task(model, tokenizer, task, records, labels=labels, config=gen, batch_size=args.batch_size)
    report.info["model"] = str(args.model)
    report.info["data"] = str(args.data)

    print(f"{task} on {args.data} ({len(report.examples)} {'documents' if task == 'lm' else 'examples'})")
    print(report.table())
    if task != "lm":
        for ex in report.examples[: max(0, args.show)]:
            print(
                f"--- example {ex['index']}\nprompt:     {_short(ex['prompt'])}\nreference:  {_short(ex['reference'])}"
                f"\nprediction: {_short(ex['prediction'])}"
            )
    if args.json:
        path = report.save(args.json)
        print(f"report written to {path}")
    return 0


def _generation_config(args: argparse.Namespace, task: str) -> GenerationConfig | None:
    """The model's decoding defaults (its ``generation_config.json``, e.g. chosen by ``lmforge tune --task``)
    under the flags given; None (the task's own defaults) when there are neither."""
    from lmforge.predict.generation_config import load_generation_defaults, with_defaults
    from lmforge.predict.tasks import DEFAULT_MAX_NEW_TOKENS

    defaults = load_generation_defaults(args.model)
    flags = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
        "copy_bias": args.copy_bias,
        "source_bias": args.source_bias,
        "source_half_life": args.source_half_life,
    }
    if not defaults and all(v is None for v in flags.values()):
        return None
    if flags["max_new_tokens"] is None and "max_new_tokens" not in defaults:
        flags["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS.get(task, 64)
    return with_defaults(defaults, flags)


def _short(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."
