"""Data-parallel training: ``lmforge train --nproc 2`` equals one process with twice the batch (loss curve,
run directory layout), and a 2-process run resumed by 1 process continues the same curve."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_config
from lmforge.data import BlockSampler
from lmforge.train.distributed import Distributed, DistributedError, RankSlice, dist_env
from lmforge.train.loop import train

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(400))

B = 4  # per-process batch
TINY = [
    "--tokenizer.kind", "char",
    "--data.block_size", "16",
    "--model.n_layer", "1",
    "--model.d_model", "16",
    "--model.n_head", "2",
    "--train.eval_batches", "2",
    "--train.eval_interval", "5",
    "--train.progress", "false",
    "--schedule.warmup_steps", "2",
    "--schedule.total_steps", "20",
]  # fmt: skip


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def overrides(corpus: Path, *extra: str) -> list[str]:
    return ["--data.path", str(corpus), "--data.cache_dir", str(corpus.parent / "cache"), *TINY, *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def layout(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")}


def assert_same_curve(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("train_loss", "val_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)


# ------------------------------------------------------------------------------------ unit level
def test_rank_slices_partition_the_single_process_batch():
    tokens = np.arange(16 * 23 + 1) % 97  # 23 blocks: batches of 6 cross epoch boundaries
    ref = BlockSampler(tokens, 16, 6, seed=3)
    ranks = [RankSlice(BlockSampler(tokens, 16, 6, seed=3), r, 2) for r in range(2)]
    for _ in range(9):
        x, y = ref.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert ranks[1].state_dict() == ref.state_dict() and ranks[0].epoch == ref.epoch


def test_environment_errors_are_one_line(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="RANK, WORLD_SIZE and LOCAL_RANK must be integers"):
        dist_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        Distributed.from_env(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not Distributed.from_env(torch.device("cpu")).enabled


def test_resume_with_another_global_batch_warns(corpus, tmp_path):
    out = tmp_path / "run"
    train(
        load_config(overrides=overrides(corpus, "--train.batch_size", "4", "--train.max_steps", "5")),
        out,
        verbose=False,
    )
    with pytest.warns(RuntimeWarning, match="global batch 4 blocks with global batch 8"):
        res = train(
            load_config(
                overrides=overrides(
                    corpus, "--train.batch_size", "8", "--train.max_steps", "10", "--train.resume", "auto"
                )
            ),
            out,
            verbose=False,
        )
    assert res.step == 10


def test_cli_rejects_bad_nproc(corpus, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", "--data", str(corpus), "--out", str(tmp_path / "o"), "--nproc", "0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--nproc must be at least 1" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------- end to end
def test_two_processes_equal_one_with_double_batch_and_resume_with_one(corpus, tmp_path):
    # reference: one process, batch 2B, 20 steps
    ref = tmp_path / "ref"
    train(
        load_config(overrides=overrides(corpus, "--train.batch_size", str(2 * B), "--train.max_steps", "20")),
        ref,
        verbose=False,
    )

    # 2 processes of batch B for the first 10 steps, through the command line
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        "--nproc",
        "2",
        "--out",
        str(out),
        "--sample",
        "0",
        *overrides(corpus, "--train.batch_size", str(B), "--train.max_steps", "10"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: max_steps at step 10") == 1  # rank 0 alone reports
    assert_same_curve(metrics(out), metrics(ref)[:2])
    # the run directory looks like a single-process one (two checkpoints of the same files, no strays)
    ckpt_files = {
        p.removeprefix("checkpoints/step-0000015") for p in layout(ref) if p.startswith("checkpoints/step-0000015")
    }
    want = {"config.yaml", "metrics.jsonl", "checkpoints"} | {p for p in layout(ref) if p.startswith("best")}
    want |= {f"checkpoints/step-{s:07d}{f}" for s in (5, 10) for f in ckpt_files}
    want |= {".train.lock", "lmforge-run.json"}  # the command line's claim on --out (rank 0's lock, the run marker)
    assert layout(out) == want
    assert json.loads((out / "best" / "meta.json").read_text())["step"] == 10

    # one process of batch 2B takes over: same global batch, so the curve goes on exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = train(
            load_config(
                overrides=overrides(
                    corpus, "--train.batch_size", str(2 * B), "--train.max_steps", "20", "--train.resume", "auto"
                )
            ),
            out,
            verbose=False,
        )
    assert res.step == 20
    assert_same_curve(metrics(out), metrics(ref))
