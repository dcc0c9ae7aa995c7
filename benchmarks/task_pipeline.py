"""Real-data task benchmark (issue #12): ``lmforge tune --task`` against trivial and classical baselines.

Three tasks on real text that ships with this machine (built by ``benchmarks/task_data.py``, cached in
``benchmarks/.data/``; names, sizes and licences in RESULTS.md):

- summarization: man page DESCRIPTION -> its NAME line (ROUGE-L). Baselines: lead-k (the document's
  first k words, k = 1..30 chosen on the training records), the first sentence, and TF-IDF nearest
  neighbour (the summary of the most similar training document).
- translation: English -> German UI messages of the gettext catalogues (BLEU, chrF). Baselines: copy the
  source; word by word with an IBM Model 1 dictionary learnt from the training pairs (unknown words
  copied); TF-IDF nearest neighbour (a translation memory: the target of the most similar training source).
- classification: Debian package description -> Section, 12 classes (accuracy, macro-F1). Baselines: the
  majority label; TF-IDF (word 1-2-grams) + logistic regression, C chosen by 3-fold CV on the training set.

lmforge rows, each evaluated on the same test records with the same scorer as the baselines
(:func:`lmforge.evaluate.metrics.score` over ``lmforge eval``'s predictions):

- ``tune``: ``lmforge tune --data train.jsonl --task T --budget B --out DIR``, then ``lmforge eval DIR`` with
  the decoding settings tune chose (``DIR/best/generation_config.json``), and again with its copy mechanism
  off (``--copy-bias 0 --source-bias 0``) to show what that adds.
- ``manual``: the route before ``tune --task``: ``lmforge train`` a BPE language model on the training
  records' text for 40% of B, ``lmforge finetune --task T`` it for 60% of B (both stopped by the clock),
  then ``lmforge eval``.

Goals (issue #12): summarization ROUGE-L above the best lead-k; translation BLEU at least twice copy-source
BLEU; classification accuracy within 3 points of TF-IDF + logistic regression.

    python benchmarks/task_pipeline.py [--task summarization] [--budget 20m] [--systems baselines,manual,tune]

Prints one table per task and a final line starting with ``RESULT`` (JSON); runs are kept in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import task_data  # noqa: E402

from lmforge.data.tasks import get_task  # noqa: E402
from lmforge.evaluate import metrics as M  # noqa: E402

Record = dict[str, str]
HEADLINE = {"summarization": "rougeL", "translation": "bleu", "classification": "accuracy"}
INPUT = {"summarization": "document", "translation": "source", "classification": "text"}
MAX_NEW = {"summarization": 32, "translation": 48, "classification": 8}
# the manual route's model: (block size, layers, width, heads, BPE vocabulary)
MANUAL_MODEL = {
    "summarization": (256, 4, 128, 4, 2000),
    "translation": (96, 4, 128, 4, 2000),
    "classification": (64, 4, 128, 4, 2000),
}


def score(
    task: str, predictions: Sequence[str], test: Sequence[Record], labels: Sequence[str] = ()
) -> dict[str, float]:
    """The task's metric of ``predictions`` on ``test`` (the one evaluator of every row)."""
    t = get_task(task)
    refs = [t.reference(r).strip() for r in test]
    kwargs: dict[str, Any] = {"labels": list(labels)} if task == "classification" else {}
    return M.score(t.metric, [p.strip() for p in predictions], refs, **kwargs)[0]


# -------------------------------------------------------------------------------------- baselines
def _tfidf_neighbour(train_x: Sequence[str], train_y: Sequence[str], test_x: Sequence[str], analyzer: str) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer=analyzer, ngram_range=(1, 2) if analyzer == "word" else (2, 4), sublinear_tf=True)
    a = vec.fit_transform(train_x)
    b = vec.transform(test_x)
    best = np.asarray((b @ a.T).argmax(axis=1)).ravel()
    return [train_y[i] for i in best]


def lead(doc: str, k: int) -> str:
    return " ".join(doc.split()[:k])


def first_sentence(doc: str) -> str:
    m = re.search(r"(?<=[.!?])\s", doc)
    return doc[: m.start()] if m else doc


def summarization_baselines(train: list[Record], test: list[Record]) -> dict[str, dict[str, float]]:
    pick = train[:: max(1, len(train) // 800)]  # k is chosen on (a regular sample of) the training records
    on_train = {k: score("summarization", [lead(r["document"], k) for r in pick], pick)["rougeL"] for k in range(1, 31)}
    k = max(on_train, key=lambda j: on_train[j])
    docs = [r["document"] for r in test]
    return {
        f"trivial: lead-{k} (best k of 1..30 on train)": score("summarization", [lead(d, k) for d in docs], test),
        "classical: first sentence": score("summarization", [first_sentence(d) for d in docs], test),
        "classical: TF-IDF nearest neighbour's summary": score(
            "summarization",
            _tfidf_neighbour([r["document"] for r in train], [r["summary"] for r in train], docs, "word"),
            test,
        ),
    }


_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")


def ibm1_dictionary(pairs: Sequence[tuple[str, str]], iterations: int = 6) -> dict[str, str]:
    """IBM Model 1 (EM over word alignments, with a NULL source word): each source word -> its most
    probable target word. Lower-cased source words; targets keep their case."""
    src = [[w.lower() for w in _WORD.findall(s)] + ["<null>"] for s, _ in pairs]
    tgt = [_WORD.findall(t) for _, t in pairs]
    t_prob: dict[tuple[str, str], float] = defaultdict(lambda: 1.0)
    for _ in range(iterations):
        count: dict[tuple[str, str], float] = defaultdict(float)
        total: dict[str, float] = defaultdict(float)
        for es, fs in zip(src, tgt, strict=True):
            for f in fs:
                z = sum(t_prob[(e, f)] for e in es)
                for e in es:
                    c = t_prob[(e, f)] / z
                    count[(e, f)] += c
                    total[e] += c
        t_prob = defaultdict(float, {(e, f): c / total[e] for (e, f), c in count.items()})
    best: dict[str, tuple[float, str]] = {}
    for (e, f), p in t_prob.items():
        if e != "<null>" and p > best.get(e, (0.0, ""))[0]:
            best[e] = (p, f)
    return {e: f for e, (_, f) in best.items()}


def word_by_word(source: str, dictionary: dict[str, str]) -> str:
    out = [dictionary.get(w.lower(), w) for w in _WORD.findall(source)]
    return re.sub(r" ([^\w\s])", r"\1", " ".join(out))


def translation_baselines(train: list[Record], test: list[Record]) -> dict[str, dict[str, float]]:
    src = [r["source"] for r in test]
    dictionary = ibm1_dictionary([(r["source"], r["target"]) for r in train])
    return {
        "trivial: copy source": score("translation", src, test),
        "classical: word by word (IBM Model 1 dictionary)": score(
            "translation", [word_by_word(s, dictionary) for s in src], test
        ),
        "classical: TF-IDF nearest neighbour (translation memory)": score(
            "translation",
            _tfidf_neighbour([r["source"] for r in train], [r["target"] for r in train], src, "char_wb"),
            test,
        ),
    }


def classification_baselines(train: list[Record], test: list[Record]) -> dict[str, dict[str, float]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    labels = sorted({r["label"] for r in train + test})
    major = Counter(r["label"] for r in train).most_common(1)[0][0]
    x, y = [r["text"] for r in train], [r["label"] for r in train]
    pipe = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), LogisticRegression(max_iter=2000)
    )
    grid = GridSearchCV(pipe, {"logisticregression__C": [3.0, 10.0, 30.0, 100.0]}, cv=3, n_jobs=1).fit(x, y)
    c = grid.best_params_["logisticregression__C"]
    preds = list(grid.predict([r["text"] for r in test]))
    return {
        f"trivial: majority label ({major})": score("classification", [major] * len(test), test, labels),
        f"classical: TF-IDF + logistic regression (C={c:g} by 3-fold CV)": score("classification", preds, test, labels),
    }


BASELINES: dict[str, Callable[[list[Record], list[Record]], dict[str, dict[str, float]]]] = {
    "summarization": summarization_baselines,
    "translation": translation_baselines,
    "classification": classification_baselines,
}


# ------------------------------------------------------------------------------------ lmforge runs
def seconds(budget: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*(s|m|min|h)?\s*", budget)
    if not m:
        raise SystemExit(f"--budget {budget!r}: expected a duration such as 90s, 20m or 1h")
    return float(m.group(1)) * {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def lmforge(args: Sequence[str], log: Path, threads: int) -> float:
    """Run ``lmforge ARGS`` in a subprocess (output to ``log``); its wall seconds. Stops on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ lmforge {' '.join(args)}\n")
        fh.flush()
        rc = subprocess.run([sys.executable, "-m", "lmforge", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc.returncode != 0:
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"lmforge {' '.join(args[:2])} failed (rc {rc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def evaluate(
    task: str, model_dir: Path, test_path: Path, test: list[Record], work: Path, threads: int,
    flags: Sequence[str] = (), name: str | None = None,
) -> dict:
    """``lmforge eval`` of ``model_dir`` on the test records (with its own decoding defaults under ``flags``),
    scored here."""
    report_path = work / f"eval-{name or model_dir.name}.json"
    wall = lmforge(
        ["eval", str(model_dir), "--data", str(test_path), "--json", str(report_path), "--batch-size", "32"]
        + list(flags)
        + ["--device", "cpu", "--show", "0"],
        work / "log.txt",
        threads,
    )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    preds = [e["prediction"] for e in report["examples"]]
    labels = sorted({r["label"] for r in test}) if task == "classification" else ()
    return {"scores": score(task, preds, test, labels), "eval_s": round(wall, 1), "examples": report["examples"][:3]}


def run_tune(
    task: str, train_path: Path, test_path: Path, test: list[Record], work: Path, a: argparse.Namespace
) -> dict:
    out = work / "tune"
    wall = lmforge(
        ["tune", "--data", str(train_path), "--task", task, "--budget", a.budget, "--out", str(out)],
        work / "log.txt",
        a.threads,
    )
    # tune's model decodes with the settings its decode step chose (DIR/best/generation_config.json)
    res = evaluate(task, out, test_path, test, work, a.threads)
    if task != "classification":  # the same model without the copy mechanism, to show what it adds
        off = ["--copy-bias", "0", "--source-bias", "0"]
        res["copy_off"] = evaluate(task, out, test_path, test, work, a.threads, off, name="tune-copy-off")
    summary = out / "summary.json"
    if summary.is_file():
        res["tune_summary"] = json.loads(summary.read_text(encoding="utf-8"))
    return {**res, "run_s": round(wall, 1)}


def run_manual(
    task: str, train_path: Path, test_path: Path, test: list[Record], train: list[Record], work: Path, a
) -> dict:
    budget = seconds(a.manual_budget or a.budget)
    block, layers, width, heads, vocab = MANUAL_MODEL[task]
    corpus = work / "corpus.txt"
    texts = [v for r in train for v in r.values()] if task != "classification" else [r["text"] for r in train]
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    common = ["--train.progress", "false", "--data.cache_dir", str(work / "cache"), "--train.max_steps", "null"]
    common += ["--schedule.horizon", "time", "--train.eval_batches", "8"]
    t_lm = lmforge(
        ["train", "--data", str(corpus), "--out", str(work / "manual-lm"), "--sample", "0"]
        + ["--tokenizer.kind", "bpe", "--tokenizer.vocab_size", str(vocab), "--data.block_size", str(block)]
        + ["--model.n_layer", str(layers), "--model.d_model", str(width), "--model.n_head", str(heads)]
        + ["--train.batch_size", "16", "--optim.lr", "2e-3", "--schedule.warmup_steps", "50"]
        + ["--train.max_time", f"{0.4 * budget:.0f}", "--train.eval_interval", "200", *common],
        work / "log.txt",
        a.threads,
    )
    t_ft = lmforge(
        ["finetune", "--model", str(work / "manual-lm"), "--data", str(train_path), "--task", task]
        + ["--out", str(work / "manual"), "--data.val_fraction", "0.05", "--train.batch_size", "16"]
        + ["--optim.lr", "1e-3", "--schedule.warmup_steps", "30"]
        + ["--train.max_time", f"{0.6 * budget:.0f}", "--train.eval_interval", "200", *common],
        work / "log.txt",
        a.threads,
    )
    gen = [] if task == "classification" else ["--max-new-tokens", str(MAX_NEW[task])]
    res = evaluate(task, work / "manual", test_path, test, work, a.threads, gen)
    return {**res, "run_s": round(t_lm + t_ft, 1)}


# ---------------------------------------------------------------------------------------- report
def tune_choices(summary: dict) -> str:
    """What tune chose: retrieved examples per prompt, and the re-ranked trials' validation scores."""
    key = summary.get("primary_metric", "?")
    rerank = (summary.get("search") or {}).get("rerank") or {}
    trials = "; ".join(
        f"trial {n} (retrieval {r['params'].get('retrieval', 0)}): {r[key]:.2f}" for n, r in sorted(rerank.items())
    )
    k = (summary.get("retrieval") or {}).get("k")
    return f"tune: retrieval k={k}; re-ranking on its validation records ({key}): {trials or 'none'}"


def goal(task: str, rows: dict[str, dict[str, float]]) -> tuple[str, float | None]:
    """The issue's goal for ``task`` and the gap of the tune row to it (positive: met by that much)."""
    tune = next((v for k, v in rows.items() if k.startswith("lmforge tune")), None)
    if task == "summarization":
        ref = max(v["rougeL"] for k, v in rows.items() if "lead-" in k)
        return f"ROUGE-L > best lead-k ({ref:.2f})", None if tune is None else tune["rougeL"] - ref
    if task == "translation":
        ref = 2 * next(v["bleu"] for k, v in rows.items() if "copy source" in k)
        return f"BLEU >= 2 x copy-source BLEU ({ref:.2f})", None if tune is None else tune["bleu"] - ref
    ref = next(v["accuracy"] for k, v in rows.items() if "logistic" in k) - 3
    return f"accuracy >= TF-IDF+LR accuracy - 3 ({ref:.2f})", None if tune is None else tune["accuracy"] - ref


def print_table(task: str, info: dict, rows: dict[str, dict[str, float]], goal_text: str, gap: float | None) -> None:
    names = {"summarization": ["rouge1", "rouge2", "rougeL"], "translation": ["bleu", "chrf"]}.get(
        task, ["accuracy", "macro_f1"]
    )
    print(f"\n== {task}: {info['train']} train / {info['test']} test records ({info['name']})")
    print(f"{'system':<62}" + "".join(f"{n:>9}" for n in names))
    for name, s in rows.items():
        print(f"{name:<62}" + "".join(f"{s.get(n, float('nan')):>9.2f}" for n in names))
    print(f"goal: {goal_text}; tune's margin: {'not run' if gap is None else f'{gap:+.2f}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=task_data.TASKS, action="append", help="repeatable (default: all three)")
    ap.add_argument("--budget", default="20m", help="lmforge tune --budget per task (default 20m, as issue #12)")
    ap.add_argument("--manual-budget", default=None, help="the manual route's wall time per task (default: --budget)")
    ap.add_argument("--systems", default="baselines,manual,tune", help="comma list of baselines, manual, tune")
    ap.add_argument("--n-train", type=int, default=None, help="default per task: see benchmarks/task_data.py")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="data split seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the lmforge subprocesses")
    ap.add_argument("--workdir", default=None, help="runs go here (default benchmarks/.data/runs/BUDGET)")
    a = ap.parse_args()
    systems = {s.strip() for s in a.systems.split(",") if s.strip()}
    root = Path(a.workdir) if a.workdir else task_data.DATA_DIR / "runs" / a.budget
    results: dict[str, Any] = {"budget": a.budget, "manual_budget": a.manual_budget or a.budget, "tasks": {}}
    load0 = os.getloadavg()[0]
    for task in a.task or list(task_data.TASKS):
        train_path, test_path, info = task_data.build(task, a.n_train, a.n_test, a.seed)
        train = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
        test = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
        work = root / task
        work.mkdir(parents=True, exist_ok=True)
        rows: dict[str, dict[str, float]] = {}
        extra: dict[str, Any] = {}
        if "baselines" in systems:
            t0 = time.perf_counter()
            rows.update(BASELINES[task](train, test))
            extra["baselines_s"] = round(time.perf_counter() - t0, 1)
        if "tune" in systems:
            try:
                r = run_tune(task, train_path, test_path, test, work, a)
                rows[f"lmforge tune --task {task} --budget {a.budget}"] = r["scores"]
                if "copy_off" in r:
                    rows["  the same model, copy mechanism off (--copy-bias 0 --source-bias 0)"] = r["copy_off"]["scores"]
                extra["tune"] = r
            except RuntimeError as err:
                extra["tune_error"] = str(err)
                print(err, file=sys.stderr)
            # kept in case the manual route does not finish in the benchmark's time window
            (work / "partial.json").write_text(json.dumps({"rows": rows, **extra}, indent=1, default=str), encoding="utf-8")
        if "manual" in systems:
            try:
                r = run_manual(task, train_path, test_path, test, train, work, a)
                rows[f"lmforge manual: train BPE LM + finetune ({a.manual_budget or a.budget})"] = r["scores"]
                extra["manual"] = r
            except RuntimeError as err:
                extra["manual_error"] = str(err)
                print(err, file=sys.stderr)
        goal_text, gap = goal(task, rows) if "baselines" in systems else ("(baselines not run)", None)
        print_table(task, info, rows, goal_text, gap)
        if "tune" in extra:
            print(tune_choices(extra["tune"].get("tune_summary") or {}))
        results["tasks"][task] = {
            "data": {k: info[k] for k in ("name", "records", "train", "test")},
            "rows": rows,
            "goal": goal_text,
            "tune_margin": gap,
            **extra,
        }
        (work / "results.json").write_text(json.dumps(results["tasks"][task], indent=1, default=str), encoding="utf-8")
    results["load_average_start_end"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
    results["cpus"] = os.cpu_count()
    print("RESULT " + json.dumps({k: v for k, v in results.items()}, sort_keys=True, default=str)[:20000])


if __name__ == "__main__":
    main()
