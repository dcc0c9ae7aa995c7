"""Data-parallel runs started by ``torchrun`` itself (a script that joins the process group first, so the
loop reuses it): gradient accumulation and full-batch GD equal one process with twice the batch, and a NaN
or a stopping callback on one rank leads every rank to the same decision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.train.loop import train

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(150))

TINY = [
    "--tokenizer.kind", "char",
    "--data.block_size", "16",
    "--model.n_layer", "1",
    "--model.d_model", "16",
    "--model.n_head", "2",
    "--train.eval_batches", "2",
    "--train.progress", "false",
]  # fmt: skip
ACCUM = ["--train.grad_accum", "2", "--train.max_steps", "8", "--train.eval_interval", "4",
         "--schedule.warmup_steps", "2"]  # fmt: skip
GD = ["--optim.name", "gd", "--optim.lr", "0.5", "--train.max_steps", "3", "--train.eval_interval", "1",
      "--schedule.name", "constant"]  # fmt: skip
CONSENSUS = ["--train.batch_size", "2", "--train.max_steps", "20", "--train.eval_interval", "3"]

WORKER = """
import hashlib, json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import load_config
from lmforge.train.loop import Callback, train
from lmforge.data import prepare_data
from lmforge.models import build_model

base, rank = Path(sys.argv[1]), None
runs = json.loads(sys.argv[2])
dist.init_process_group("gloo")  # the loop must reuse this group and leave it alone
rank = dist.get_rank()


class Record(Callback):
    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def on_eval(self, state, record):
        return self.stop_at is not None and state.step >= self.stop_at

    def on_train_end(self, state, result):
        h = hashlib.sha256()
        for p in state.model.parameters():
            h.update(p.detach().numpy().tobytes())
        self.weights = h.hexdigest()


results = {}
for name, args in runs.items():
    cfg = load_config(overrides=args)
    model, calls = None, []
    cb = Record()
    if name == "consensus":
        # rank 1 alone: a NaN loss on its 4th training forward, and a callback asking to stop at step 6
        data = prepare_data(cfg)
        model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
        orig = model.forward

        def forward(idx, targets=None, orig=orig, model=model):
            logits, loss = orig(idx, targets)
            if model.training:
                calls.append(1)
                if rank == 1 and len(calls) == 4:
                    loss = loss * float("nan")
            return logits, loss

        model.forward = forward
        cb = Record(stop_at=6 if rank == 1 else None)
    res = train(cfg, base / name, model=model, callbacks=[cb], verbose=False)
    results[name] = {"step": res.step, "stop": res.stop_reason, "history": res.history, "weights": cb.weights,
                     "train_forwards": len(calls)}
assert dist.is_initialized()
dist.destroy_process_group()
(base / f"result-{rank}.json").write_text(json.dumps(results))
"""


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def args_for(corpus: Path, *extra: str) -> list[str]:
    return ["--data.path", str(corpus), "--data.cache_dir", str(corpus.parent / "cache"), *TINY, *extra]


def test_torchrun_matches_single_process_and_ranks_agree(corpus, tmp_path):
    # single-process references with the global batch (this also fills the token cache)
    ref_accum = train(
        load_config(overrides=args_for(corpus, "--train.batch_size", "4", *ACCUM)), tmp_path / "ra", verbose=False
    )
    ref_gd = train(
        load_config(overrides=args_for(corpus, "--train.batch_size", "16", *GD)), tmp_path / "rg", verbose=False
    )

    base = tmp_path / "ddp"
    base.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    runs = {
        "accum": args_for(corpus, "--train.batch_size", "2", *ACCUM),
        "gd": args_for(corpus, "--train.batch_size", "8", *GD),  # GD: the ranks share the chunks of one pass
        "consensus": args_for(corpus, *CONSENSUS),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(base),
        json.dumps(runs),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    res = [json.loads((base / f"result-{rank}.json").read_text()) for rank in range(2)]

    # every rank took the same decisions and holds the same weights
    for name in runs:
        a, b = res[0][name], res[1][name]
        assert (a["step"], a["stop"], a["weights"]) == (b["step"], b["stop"], b["weights"]), name
        # every record but its wall-clock timestamp ("time", read by each rank's own clock)
        untimed = [[{k: v for k, v in r.items() if k != "time"} for r in h] for h in (a["history"], b["history"])]
        assert untimed[0] == untimed[1], name

    for name, ref in (("accum", ref_accum), ("gd", ref_gd)):
        got = res[0][name]["history"]
        assert [r["step"] for r in got] == [r["step"] for r in ref.history], name
        assert [r["tokens"] for r in got] == [r["tokens"] for r in ref.history], name
        for g, w in zip(got, ref.history, strict=True):
            assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5), (name, g["step"])
            assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5), (name, g["step"])

    # rank 1's NaN was skipped by both ranks (7 forwards for 6 steps) and its callback stopped both at step 6
    c = res[0]["consensus"]
    assert c["step"] == 6 and c["stop"] == "callback"
    assert res[0]["consensus"]["train_forwards"] == res[1]["consensus"]["train_forwards"] == 7
    assert [json.loads(x)["step"] for x in (base / "consensus" / "metrics.jsonl").read_text().splitlines()] == [3, 6]
