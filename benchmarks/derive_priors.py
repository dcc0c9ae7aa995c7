"""Derive the default space's start points (one per model family) from corpora that no benchmark uses, and
check the rule leave-one-corpus-out (issue #13).

Corpora (``benchmarks/local_corpora.py``; all ship with this machine): ``licenses`` (the licence texts of
/usr/share/common-licenses), ``man`` (section-1 manual page sources), ``changelogs`` (Debian packaging
changelogs), ``perlpod`` (Perl's core documentation). Not Tiny Shakespeare, not the demo corpus (standard
library docstrings), not ``info`` (the benchmark's third corpus).

Candidates, the same on every corpus: per family, the hand-set point (the default grid's values, the start
points before this script) and ``--random`` configurations drawn (seeded) from the default space as
``lmforge tune`` narrows it for ``--ref-budget`` seconds on this machine (the size cap of
``search/sizing.py``; dropout fixed at 0, as for a short run). Each candidate trains like a search trial
(``search.context.trial_config``: warmup-stable, validation on the search's fixed blocks) for ``--tokens``
tokens, or (``--seconds S``, the default) for ``S`` seconds of wall clock, on one thread; its score is its last
validation loss. Equal seconds is the horizon a time budget pays in: a deep recurrent model that is good per
token but slow per second on a CPU loses to a faster one here, as it does in a search (at equal tokens, the
first derivation picked 5-layer GRU / LSTM start points that stayed on the unigram plateau for a whole
90-second benchmark trial).

Per family the start point is the candidate with the best mean rank over all corpora
(:func:`lmforge.search.priors.pick`); ``--write`` puts them into ``default_space.yaml``. The
leave-one-corpus-out table scores the rule: the pick made without corpus X, evaluated on X, beside the
hand-set point and the random candidates on X.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/derive_priors.py --jobs 2 --param-cap 327438 --write

Prints the tables and a final ``RESULT`` JSON line; losses are cached in ``--out/losses-CORPUS.json`` (a rerun
only trains what is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import local_corpora  # noqa: E402

PRIOR_CORPORA = ("licenses", "man", "changelogs", "perlpod")
FAMILIES = ("transformer", "gru", "lstm", "rcnn")
_COMMON = {
    "optim.name": "adamw", "optim.lr": 3.0e-3, "optim.weight_decay": 0.1, "model.dropout": 0.0,
    "train.batch_size": 12, "data.block_size": 128, "schedule.warmup_steps": 16, "model.d_model": 192,
}  # fmt: skip
HAND_SET = {
    "rcnn": {"model.family": "rcnn", "model.n_layer": 1, "model.rnn": "lstm", "model.kernel_size": 3, **_COMMON},
    "gru": {"model.family": "gru", "model.n_layer": 1, "model.residual": False, **_COMMON},
    "transformer": {
        "model.family": "transformer", "model.n_layer": 2, "model.n_head": 4, "model.mlp": "gelu",
        "model.position": "learned", "model.norm": "layernorm", **_COMMON,
    },
    "lstm": {"model.family": "lstm", "model.n_layer": 1, "model.residual": False, **_COMMON},
}  # fmt: skip
"""The hand-set start points the default space had before this script (the default grid's values)."""
MARKER = "# ---- start points: written by benchmarks/derive_priors.py"


# ----------------------------------------------------------------------------------------- candidates
def base_config(path: Path, seed: int) -> dict[str, Any]:
    from lmforge.config import apply_overrides

    return apply_overrides({}, ["--data.path", str(path), "--data.val_fraction", "0.1", "--train.seed", str(seed)])


def narrowed_space(base: dict[str, Any], ref_budget: float, param_cap: int | None) -> tuple[Any, int]:
    """The default space as ``lmforge tune`` narrows it for a ``ref_budget``-second run (or ``param_cap``)."""
    from lmforge.search.budget import Budget, Ledger
    from lmforge.search.context import prepare_search_data
    from lmforge.search.sizing import cap_space, fix_regularization, measure_throughput, size_cap_for_time
    from lmforge.search.space import load_space

    data = prepare_search_data(base, 0, 0)
    vocab = data.tokenizer.vocab_size
    if param_cap is None:
        led = Ledger(Budget(seconds=ref_budget))
        flops, _ = measure_throughput(base, data.prepared.train, vocab)
        seconds = ref_budget * (led.shares["final"] + led.shares["search"] / 8)
        param_cap = size_cap_for_time(flops, seconds, len(data.prepared.train))
    space, _ = cap_space(load_space(), base, vocab, param_cap)
    space, _ = fix_regularization(space, 0.0)
    return space, param_cap


def candidates(space: Any, n_random: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per family: ``{"hand-set": values, "r0": values, ...}`` (random ones drawn from ``space``)."""
    import optuna

    from lmforge.search.study import quiet_optuna

    quiet_optuna()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for i, fam in enumerate(FAMILIES):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed * 100 + i))
        fam_c: dict[str, dict[str, Any]] = {"hand-set": project(space, HAND_SET[fam])}
        for r in range(n_random):
            study.enqueue_trial({"model.family": fam})
            fam_c[f"r{r}"] = space.suggest(study.ask())
        out[fam] = fam_c
    return out


def project(space: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` moved into ``space`` as ``lmforge tune`` moves a start point (nearest allowed value), plus
    the space's fixed values; paths the space does not have are dropped."""
    out: dict[str, Any] = {}
    for b in space.blocks:
        if not b.applies({**out, **values}):
            continue
        out.update(b.fixed)
        for d in b.dists:
            if d.path in values:
                out[d.path] = d.nearest(values[d.path])
    return out


# ------------------------------------------------------------------------------------------ training
def score_corpus(job: tuple[str, Path, dict[str, dict[str, dict[str, Any]]], int, float, int, Path]) -> dict[str, Any]:
    """Train every candidate on one corpus (cached in ``out/losses-NAME.json``); {family: {cand: loss}}."""
    import torch

    from lmforge.search.budget import Fidelity
    from lmforge.search.context import EVAL_BLOCKS, fixed_val_batches, prepare_search_data, trial_config
    from lmforge.train.loop import train

    name, path, cands, tokens, max_time, seed, out = job
    if tokens <= 0:  # an equal-seconds horizon: train to the clock, evaluated once where it stops
        tokens = 10**12
    torch.set_num_threads(1)
    cache = out / f"losses-{name}.json"
    done: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    base = base_config(path, seed)
    data = prepare_search_data(base, 0, seed)
    fid = Fidelity(min_tokens=tokens // 4, max_tokens=tokens, eta=2, rungs=3, tokens_per_step=12 * 128)
    for fam, fam_c in cands.items():
        for cid, values in fam_c.items():
            key = f"{fam}/{cid}"
            if key in done:
                continue
            t0 = time.perf_counter()
            try:
                cfg, _ = trial_config(base, values, fid, max_time)
                res = train(cfg, out / name / fam / cid, data=data.prepared, verbose=False,
                            val_batches=fixed_val_batches(data.prepared.val, cfg, EVAL_BLOCKS))  # fmt: skip
                loss = float(res.final_val_loss)
            except Exception as err:  # a configuration that cannot train ranks last
                print(f"  {name} {key} failed: {str(err)[:160]}", file=sys.stderr)
                loss = math.inf
            done[key] = loss if math.isfinite(loss) else None
            cache.write_text(json.dumps(done, indent=1))
            print(f"[{time.strftime('%H:%M:%S')}] {name} {key}: {loss:.4f} ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    return done


# ------------------------------------------------------------------------------------------- output
def write_starts(space_file: Path, starts: dict[str, dict[str, Any]], header: list[str]) -> None:
    """Replace the ``start:`` section (everything after MARKER) of ``space_file`` with ``starts`` in their
    order (the search tries them in this order)."""
    import yaml

    text = space_file.read_text(encoding="utf-8")
    if MARKER not in text:
        raise SystemExit(f"{space_file}: no line {MARKER!r} to write the start points after")
    head = text[: text.index(MARKER)]
    lines = [MARKER, *[f"# {h}" for h in header], "start:"]
    for fam in starts:
        flow = yaml.safe_dump(starts[fam], default_flow_style=True, sort_keys=False, width=110).strip()
        lines.append(f"  - {flow}".replace("\n", "\n    "))
    space_file.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", default=",".join(PRIOR_CORPORA))
    ap.add_argument("--random", type=int, default=6, help="random candidates per family")
    ap.add_argument("--seconds", type=float, default=10.0, help="horizon: seconds of training per candidate")
    ap.add_argument("--tokens", type=int, default=None, help="horizon: training tokens per candidate instead")
    ap.add_argument("--max-time", type=float, default=60.0, help="with --tokens: seconds a candidate may train at most")
    ap.add_argument("--ref-budget", type=float, default=180.0, help="narrow the space as tune does for this many s")
    ap.add_argument("--param-cap", type=int, default=None, help="instead of measuring: this size cap")
    ap.add_argument("--max-bytes", type=int, default=600_000, help="bytes per corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="corpora trained in parallel (one thread each)")
    ap.add_argument("--out", default="runs/priors")
    ap.add_argument("--write", action="store_true", help="write the start points into default_space.yaml")
    args = ap.parse_args()
    horizon = f"{args.tokens:,} tokens" if args.tokens else f"{args.seconds:g} s"
    tokens, max_time = (args.tokens, args.max_time) if args.tokens else (0, args.seconds)

    from lmforge.search import priors
    from lmforge.search.space import DEFAULT_SPACE_FILE, load_space
    from lmforge.search.study import quiet_optuna

    quiet_optuna()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.corpora.split(",")
    for n in names:
        if n in ("info",):
            raise SystemExit("info is the benchmark's third corpus: priors must not be derived from it")
    paths = {n: local_corpora.build(n, out / "corpora", args.max_bytes) for n in names}
    cached = out / "candidates.json"  # the cached losses belong to these candidates: reuse them
    prev = json.loads(cached.read_text()) if cached.is_file() else None
    if prev and prev.get("random") == args.random and prev.get("seed") == args.seed:
        cap, cands = int(prev["param_cap"]), prev["candidates"]
    else:
        space, cap = narrowed_space(base_config(paths[names[0]], args.seed), args.ref_budget, args.param_cap)
        cands = candidates(space, args.random, args.seed)
        cached.write_text(json.dumps({"param_cap": cap, "random": args.random, "seed": args.seed, "candidates": cands}))
    print(f"size cap {cap:,} parameters ({args.ref_budget:.0f} s reference budget); {len(names)} corpora x "
          f"{sum(len(c) for c in cands.values())} candidates x {horizon}", file=sys.stderr)  # fmt: skip
    jobs = [(n, paths[n], cands, tokens, max_time, args.seed, out) for n in names]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(score_corpus, jobs)
    else:
        results = [score_corpus(j) for j in jobs]
    raw = dict(zip(names, results, strict=True))

    searched = {d.path for d in load_space().dists}  # fixed values (schedule.name...) are not start values
    starts: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"param_cap": cap, "horizon": horizon, "corpora": names, "families": {}}
    loo_all: list[tuple[str, Any]] = []
    for fam in FAMILIES:
        losses = {
            n: {
                cid: (math.inf if raw[n][f"{fam}/{cid}"] is None else float(raw[n][f"{fam}/{cid}"]))
                for cid in cands[fam]
            }
            for n in names
        }
        chosen = priors.pick(losses)
        starts[fam] = {k: v for k, v in cands[fam][chosen].items() if k in searched}
        mr = priors.mean_ranks(losses)
        print(f"\n{fam}: validation loss per corpus (nats/char); mean rank over {len(names)} corpora")
        print(f"{'candidate':<10} " + " ".join(f"{n:>10}" for n in names) + f" {'mean rank':>9}  config")
        for cid in sorted(cands[fam], key=lambda k: mr[k]):
            vals = " ".join(f"{losses[n][cid]:>10.4f}" for n in names)
            short = {k.split(".")[-1]: v for k, v in cands[fam][cid].items() if k != "model.family"}
            print(f"{cid + (' *' if cid == chosen else ''):<10} {vals} {mr[cid]:>9.2f}  {short}")
        rows = priors.leave_one_out(losses, "hand-set")
        loo_all += [(fam, r) for r in rows]
        report["families"][fam] = {"chosen": chosen, "values": starts[fam], "mean_rank": mr,
                                   "losses": {n: {k: (None if not math.isfinite(v) else round(v, 4))
                                                  for k, v in losses[n].items()} for n in names}}  # fmt: skip

    print("\nleave-one-corpus-out: the start point picked on the other corpora, evaluated on the held-out one")
    print(f"{'family':<12} {'held out':<11} {'picked':<9} {'loss':>7} {'rank':>5} {'hand-set':>8} {'rank':>5} "
          f"{'random mean':>11} {'median':>7}")  # fmt: skip
    loo_rec = []
    for fam, r in loo_all:
        print(f"{fam:<12} {r.corpus:<11} {r.picked:<9} {r.picked_loss:>7.4f} {r.picked_rank:>5.1f} "
              f"{r.hand_set_loss:>8.4f} {r.hand_set_rank:>5.1f} {r.random_mean:>11.4f} {r.random_median:>7.4f}")  # fmt: skip
        loo_rec.append({"family": fam, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(r).items()}})
    n = len(loo_all)
    wins_hand = sum(r.picked_loss < r.hand_set_loss for _, r in loo_all)
    wins_rand = sum(r.picked_loss < r.random_median for _, r in loo_all)
    d_hand = statistics.mean(r.picked_loss - r.hand_set_loss for _, r in loo_all)
    print(f"\nheld-out pick beats the hand-set point in {wins_hand}/{n} (mean difference {d_hand:+.4f} nats), "
          f"the random candidates' median in {wins_rand}/{n}; mean held-out rank "
          f"{statistics.mean(r.picked_rank for _, r in loo_all):.2f} vs hand-set "
          f"{statistics.mean(r.hand_set_rank for _, r in loo_all):.2f} (of {loo_all[0][1].n_candidates})")  # fmt: skip
    report["leave_one_out"] = loo_rec
    report["summary"] = {"beats_hand_set": wins_hand, "beats_random_median": wins_rand, "rows": n,
                         "mean_diff_vs_hand_set": round(d_hand, 4)}  # fmt: skip
    # the search tries the start points in order: the family whose pick has the lowest mean loss first
    pick_loss = {f: statistics.mean(report["families"][f]["losses"][n][report["families"][f]["chosen"]] or math.inf
                                    for n in names) for f in FAMILIES}  # fmt: skip
    starts = {f: starts[f] for f in sorted(FAMILIES, key=lambda f: pick_loss[f])}
    print("start point order (mean loss of the pick over the corpora): "
          + ", ".join(f"{f} {pick_loss[f]:.4f}" for f in starts))  # fmt: skip
    if args.write:
        header = [
            f"Derived {time.strftime('%Y-%m-%d')} by `python benchmarks/derive_priors.py --write` (issue #13): per family, the",
            f"candidate (the hand-set default-grid point, or one of {args.random} seeded random draws from this space as a",
            f"{args.ref_budget:.0f}-second budget narrows it) with the best mean rank of validation loss after {horizon}",
            f"of training (one thread) on {len(names)} corpora that no benchmark uses: {', '.join(names)} (benchmarks/local_corpora.py).",
            "Families in the order of their pick's mean loss over these corpora (the search tries them in this order).",
            "Not Tiny Shakespeare, not the demo corpus, not the benchmark's third corpus (info). Leave-one-corpus-out",
            "numbers: benchmarks/RESULTS.md. A value outside the (narrowed) space moves to the nearest allowed one;",
            "paths the user fixes are left out.",
        ]  # fmt: skip
        write_starts(DEFAULT_SPACE_FILE, starts, header)
        print(f"\nwrote {len(starts)} start points to {DEFAULT_SPACE_FILE}", file=sys.stderr)
    print("RESULT " + json.dumps({"bench": "derive_priors", **report}, default=str))


if __name__ == "__main__":
    main()
