"""SIGTERM to ``lmforge train --nproc 2``: the launcher passes it on, both ranks stop after the same step,
rank 0 saves that step's checkpoint, and the command exits 0 (as a single process does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(200))

TINY = [
    "--tokenizer.kind", "char",
    "--data.block_size", "16",
    "--model.n_layer", "1",
    "--model.d_model", "16",
    "--model.n_head", "2",
    "--train.batch_size", "4",
    "--train.eval_batches", "2",
    "--train.progress", "false",
    # SIGTERM handling, not compilation: a cold inductor compile of the DDP model (a fresh CI machine) can
    # outlast the launcher's 30-s grace period
    "--train.compile", "false",
]  # fmt: skip


def test_sigterm_stops_every_rank_at_one_checkpoint(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "lmforge", "train", "--nproc", "2", "--data", str(corpus), "--out", str(out),
        "--sample", "0", "--data.cache_dir", str(tmp_path / "cache"), *TINY,
        "--train.max_steps", "1000000", "--train.eval_interval", "7", "--train.keep_last", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t = time.time()
        while not any((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("step-*")):
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode} before training: {proc.communicate()[0][-3000:]}")
            assert time.time() - t < 240, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("done: sigterm at step") == 1, output[-3000:]  # one report, from rank 0
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    step = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    assert f"done: sigterm at step {step} " in output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == step and len({r["step"] for r in recs}) == len(recs)  # no duplicate lines
