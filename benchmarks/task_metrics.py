"""What the task metrics mean: each task's score after a short fine-tune, next to a trivial baseline.

Four small self-made data sets (seeded templates, test examples never seen in training):

- summarization: "[filler.] The baker painted the fence in the village. [filler...]" -> "baker painted the
  fence"; baseline lead-N (the document's first N words, N = the mean summary length).
- translation: English -> a word-mapped toy language with its own word order ("the big cat sees the dog" ->
  "miko bo ravu vim"); baseline: copy the source.
- classification: reviews whose label follows from a keyword (positive / negative / neutral); baseline: the
  majority label.
- semantic parsing: "subtract 3 from 9" -> "(sub 9 3)"; baseline: the most frequent training output.

A small transformer (byte-level BPE) is first trained as a language model on the task inputs only (the
"base"), then fine-tuned per task and evaluated, all through the command line (``lmforge train``,
``lmforge finetune``, ``lmforge eval``). About 3 CPU-minutes (7 minutes wall on 2 busy shared cores).

    python benchmarks/task_metrics.py [--steps 250] [--base-steps 150] [--n-train 600] [--n-test 60]

Prints a table, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.cli import main
from lmforge.evaluate import metrics as M

# ------------------------------------------------------------------------------------------ data
NOUNS = ["baker", "farmer", "pilot", "mayor", "teacher", "sailor", "doctor", "painter", "singer", "chef"]
ACTS = [
    "painted the fence",
    "fixed the roof",
    "sold the car",
    "found a key",
    "cooked dinner",
    "wrote a letter",
    "lost a bet",
    "won the race",
    "fed the goats",
    "missed the train",
]
PLACES = ["in the village", "at the harbour", "near the school", "in the city", "at the market"]
FILLERS = [
    "It was a cold morning.",
    "Nobody expected it.",
    "The weather was fine.",
    "Many people watched.",
    "Later everyone went home.",
    "The news spread fast.",
    "It had rained all week.",
]


def summarization(rng: random.Random) -> dict[str, str]:
    noun, act, place = rng.choice(NOUNS), rng.choice(ACTS), rng.choice(PLACES)
    key = f"The {noun} {act} {place}."
    before = rng.sample(FILLERS, rng.choice([0, 0, 1]))
    after = rng.sample([f for f in FILLERS if f not in before], rng.choice([1, 2]))
    return {"document": " ".join([*before, key, *after]), "summary": f"{noun} {act}"}


EN_NOUNS = {"cat": "miko", "dog": "ravu", "bird": "tesi", "fish": "lopa", "horse": "denu", "child": "kari"}
EN_ADJS = {"big": "bo", "small": "ni", "red": "ra", "old": "ka", "happy": "fe"}
EN_VERBS = {"sees": "vim", "eats": "nak", "follows": "sul", "likes": "pem"}


def translation(rng: random.Random) -> dict[str, str]:
    a, n1, v, n2 = (
        rng.choice(list(EN_ADJS)),
        rng.choice(list(EN_NOUNS)),
        rng.choice(list(EN_VERBS)),
        rng.choice(list(EN_NOUNS)),
    )
    # toy grammar: noun before adjective, verb last, no articles
    return {
        "source": f"the {a} {n1} {v} the {n2}",
        "target": f"{EN_NOUNS[n1]} {EN_ADJS[a]} {EN_NOUNS[n2]} {EN_VERBS[v]}",
    }


POSITIVE = ["great", "wonderful", "excellent", "lovely"]
NEGATIVE = ["awful", "boring", "terrible", "dull"]
NEUTRAL = ["long", "short", "recent", "french"]
TOPICS = ["film", "book", "meal", "show", "concert"]


def classification(rng: random.Random) -> dict[str, str]:
    label = rng.choices(["positive", "negative", "neutral"], weights=[45, 35, 20])[0]
    word = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    words = [rng.choice(word), rng.choice(NEUTRAL)]
    rng.shuffle(words)
    return {"text": f"the {rng.choice(TOPICS)} was {words[0]} and {words[1]}", "label": label}


def semantic_parsing(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice(["add", "sub", "mul", "div", "plus"])
    text = {
        "add": f"add {a} and {b}",
        "sub": f"subtract {a} from {b}",
        "mul": f"multiply {a} by {b}",
        "div": f"divide {a} by {b}",
        "plus": f"what is {a} plus {b}",
    }[op]
    parse = {
        "add": f"(add {a} {b})",
        "sub": f"(sub {b} {a})",
        "mul": f"(mul {a} {b})",
        "div": f"(div {a} {b})",
        "plus": f"(add {a} {b})",
    }[op]
    return {"text": text, "parse": parse}


TASKS = {
    "summarization": (summarization, "document", ["rouge1", "rouge2", "rougeL"]),
    "translation": (translation, "source", ["bleu", "chrf"]),
    "classification": (classification, "text", ["accuracy", "macro_f1"]),
    "semantic-parsing": (semantic_parsing, "text", ["exact_match"]),
}


def make_split(make, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [make(rng) for _ in range(n_train)]
    seen = {json.dumps(r, sort_keys=True) for r in train}
    test: list[dict] = []
    while len(test) < n_test:
        r = make(rng)
        if json.dumps(r, sort_keys=True) not in seen:
            test.append(r)
    return train, test


# -------------------------------------------------------------------------------------- baselines
def baseline(task: str, train: list[dict], test: list[dict]) -> tuple[str, dict[str, float]]:
    if task == "summarization":
        n = round(sum(len(r["summary"].split()) for r in train) / len(train))
        preds = [" ".join(r["document"].split()[:n]) for r in test]
        return f"lead-{n}", M.rouge(preds, [r["summary"] for r in test])[0]
    if task == "translation":
        return "copy source", M.bleu_chrf([r["source"] for r in test], [r["target"] for r in test])[0]
    if task == "classification":
        major = Counter(r["label"] for r in train).most_common(1)[0][0]
        labels = sorted({r["label"] for r in train})
        return f"majority ({major})", M.classification([major] * len(test), [r["label"] for r in test], labels)[0]
    common = Counter(r["parse"] for r in train).most_common(1)[0][0]
    return f"most frequent {common}", M.exact_match([common] * len(test), [r["parse"] for r in test])[0]


# ------------------------------------------------------------------------------------------- runs
def cli(*args: str) -> None:
    """Run an lmforge command in-process, its output silenced; stop on failure."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(list(args))
    if rc != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed ({rc}):\n{buf.getvalue()[-2000:]}")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    splits = {
        t: make_split(make, args.n_train, args.n_test, seed=i) for i, (t, (make, _, _)) in enumerate(TASKS.items())
    }
    # base model: language modelling on the task inputs only (no outputs, no templates)
    rng = random.Random(0)
    inputs = [r[field] for t, (_, field, _) in TASKS.items() for r in splits[t][0]]
    rng.shuffle(inputs)
    corpus = work / "inputs.txt"
    corpus.write_text("\n".join(inputs) + "\n", encoding="utf-8")
    common = ["--train.progress", "false", "--data.cache_dir", str(work / "cache"), "--train.seed", str(args.seed)]
    t0 = time.perf_counter()
    cli(
        "train",
        "--data",
        str(corpus),
        "--out",
        str(work / "base"),
        "--sample",
        "0",
        "--tokenizer.kind",
        "bpe",
        "--tokenizer.vocab_size",
        "512",
        "--model.n_layer",
        "2",
        "--model.d_model",
        "64",
        "--model.n_head",
        "4",
        "--data.block_size",
        "64",
        "--train.max_steps",
        str(args.base_steps),
        "--train.batch_size",
        "16",
        "--train.eval_interval",
        str(args.base_steps),
        "--train.eval_batches",
        "4",
        "--optim.lr",
        "3e-3",
        "--schedule.warmup_steps",
        "20",
        *common,
    )
    base_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for task, (_, _, metric_names) in TASKS.items():
        train, test = splits[task]
        tr, te = write_jsonl(work / f"{task}-train.jsonl", train), write_jsonl(work / f"{task}-test.jsonl", test)
        out = work / f"ft-{task}"
        t0 = time.perf_counter()
        cli(
            "finetune",
            "--model",
            str(work / "base"),
            "--data",
            str(tr),
            "--task",
            task,
            "--out",
            str(out),
            "--data.block_size",
            "64",
            "--data.val_fraction",
            "0.05",
            "--train.max_steps",
            str(args.steps),
            "--train.batch_size",
            "16",
            "--train.eval_interval",
            str(args.steps),
            "--train.eval_batches",
            "4",
            "--optim.lr",
            "2e-3",
            "--schedule.warmup_steps",
            "20",
            *common,
        )
        ft_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cli(
            "eval",
            str(out),
            "--data",
            str(te),
            "--json",
            str(work / f"{task}-report.json"),
            "--max-new-tokens",
            "16",
            "--batch-size",
            "32",
        )
        ev_s = time.perf_counter() - t0
        report = json.loads((work / f"{task}-report.json").read_text())
        name, base_scores = baseline(task, train, test)
        results[task] = {
            "baseline": name,
            "metrics": {m: {"baseline": base_scores[m], "finetuned": report["metrics"][m]} for m in metric_names},
            "completion_ppl": report["metrics"]["completion_ppl"],
            "finetune_s": round(ft_s, 1),
            "eval_s": round(ev_s, 1),
            "example": {k: report["examples"][0][k] for k in ("prompt", "reference", "prediction")},
        }
    return {"base_s": round(base_s, 1), "tasks": results}


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=250, help="fine-tuning steps per task")
    ap.add_argument("--base-steps", type=int, default=150, help="language-model steps of the base model")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        res = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="lmforge-task-metrics-") as d:
            res = run(args, Path(d))
    total = time.perf_counter() - t0

    print(
        f"base LM: {args.base_steps} steps ({res['base_s']}s); fine-tune: {args.steps} steps per task, "
        f"{args.n_train} training / {args.n_test} unseen test examples\n"
    )
    print(f"{'task':<17} {'metric':<12} {'baseline':>9} {'fine-tuned':>11}  baseline is")
    print("-" * 78)
    for task, r in res["tasks"].items():
        for i, (m, v) in enumerate(r["metrics"].items()):
            print(
                f"{task if i == 0 else '':<17} {m:<12} {v['baseline']:>9.1f} {v['finetuned']:>11.1f}  "
                f"{r['baseline'] if i == 0 else ''}"
            )
    print("\nexample predictions (first test example):")
    for task, r in res["tasks"].items():
        ex = r["example"]
        print(f"  {task:<17} {ex['prompt']!r:.70} -> {ex['prediction']!r} (reference {ex['reference']!r})")
    res["total_s"] = round(total, 1)
    res["config"] = {"steps": args.steps, "base_steps": args.base_steps, "n_train": args.n_train, "n_test": args.n_test}
    print("RESULT " + json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    main_cli()
