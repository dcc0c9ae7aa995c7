"""The training loop: exact resume after SIGKILL, SIGTERM, NaN handling, early stopping, best checkpoint."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.train.loop import Callback, TrainingError, train

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(400))

TINY = [
    "--tokenizer.kind",
    "char",
    "--data.block_size",
    "16",
    "--model.n_layer",
    "1",
    "--model.d_model",
    "16",
    "--model.n_head",
    "2",
    "--train.batch_size",
    "4",
    "--train.eval_batches",
    "2",
    "--train.progress",
    "false",
    "--schedule.warmup_steps",
    "2",
]


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def cfg_for(corpus: Path, *extra: str):
    return load_config(
        overrides=["--data.path", str(corpus), "--data.cache_dir", str(corpus.parent / "cache"), *TINY, *extra]
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    return load_file(ckpts[-1] / "model.safetensors")


def test_metrics_best_and_layout(corpus, tmp_path):
    out = tmp_path / "run"
    res = train(cfg_for(corpus, "--train.max_steps", "30", "--train.eval_interval", "10"), out, verbose=False)
    assert res.step == 30 and res.stop_reason == "max_steps"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30]
    for r in recs:
        assert {"step", "tokens", "elapsed_s", "train_loss", "val_loss"} <= set(r)
    best = json.loads((out / "best" / "meta.json").read_text())
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in recs))
    assert (out / "config.yaml").exists() and (out / "best" / "config.yaml").exists()
    assert recs[-1]["tokens"] == 30 * 4 * 16


def test_checkpoint_steps_write_checkpoints_there_and_at_the_stop_and_best_from_memory(corpus, tmp_path):
    """Search trials: checkpoints only at the given steps (rungs) and where training stops; best/ is the
    same model, written from its in-memory copy, as a run that writes it at every improvement."""
    args = ("--train.max_steps", "30", "--train.eval_interval", "5", "--train.keep_last", "10",
            "--train.deterministic", "true", "--model.tie_embeddings", "true")
    every, trial = tmp_path / "every", tmp_path / "trial"
    res_every = train(cfg_for(corpus, *args), every, verbose=False)
    res_trial = train(cfg_for(corpus, *args), trial, verbose=False, checkpoint_steps={10})
    names = lambda out: sorted(p.name for p in (out / "checkpoints").glob("step-*"))  # noqa: E731
    assert names(every) == [f"step-{s:07d}" for s in (5, 10, 15, 20, 25, 30)]
    assert names(trial) == ["step-0000010", "step-0000030"]
    assert res_trial.best_step == res_every.best_step and res_trial.best_val_loss == res_every.best_val_loss
    for out in (every, trial):
        assert json.loads((out / "best" / "meta.json").read_text())["step"] == res_every.best_step
    wa, wb = load_file(every / "best" / "model.safetensors"), load_file(trial / "best" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # tied weights stored once


def test_refuses_existing_run_without_resume(corpus, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(corpus, "--train.max_steps", "10", "--train.eval_interval", "5"), out, verbose=False)
    with pytest.raises(TrainingError, match="resume"):
        train(cfg_for(corpus, "--train.max_steps", "10"), out, verbose=False)


def test_resume_in_process_equals_uninterrupted(corpus, tmp_path):
    common = ["--train.eval_interval", "10", "--train.deterministic", "true", "--model.dropout", "0.1"]
    a = tmp_path / "a"
    train(cfg_for(corpus, "--train.max_steps", "40", *common), a, verbose=False)
    b = tmp_path / "b"
    train(cfg_for(corpus, "--train.max_steps", "20", "--schedule.total_steps", "40", *common), b, verbose=False)
    train(cfg_for(corpus, "--train.max_steps", "40", "--train.resume", "auto", *common), b, verbose=False)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _cli(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--sample",
        "0",
        "--data.cache_dir",
        str(corpus.parent / "cache"),
        *TINY,
        *extra,
    ]


def _wait_for(pred, timeout: float = 120.0) -> None:
    t = time.time()
    while not pred():
        if time.time() - t > timeout:
            raise TimeoutError
        time.sleep(0.05)


def test_sigkill_then_resume_is_bitwise_identical(corpus, tmp_path):
    common = [
        "--train.max_steps",
        "120",
        "--train.eval_interval",
        "10",
        "--train.checkpoint_interval",
        "5",
        "--train.deterministic",
        "true",
        "--train.resume",
        "auto",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cli(corpus, ref, *common), check=True, capture_output=True)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(corpus, out, *common), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("step-*")))
        time.sleep(random.uniform(0.0, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cli(corpus, out, *common), check=True, capture_output=True)
    wa, wb = final_weights(ref), final_weights(out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 120


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = _cli(corpus, out, "--train.max_steps", "100000", "--train.eval_interval", "7", "--train.keep_last", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the handler is installed before the first step: wait until training runs
    _wait_for(lambda: any((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("step-*")))
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "sigterm" in output
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert (ckpts[-1] / "COMPLETE").exists()
    stopped_at = int(re.search(r"sigterm at step (\d+)", output).group(1))
    assert json.loads((ckpts[-1] / "meta.json").read_text())["step"] == stopped_at


class _NaNAt:
    """Wraps a model: forward returns a NaN loss on the given call numbers; checks nothing moved meanwhile."""

    def __init__(self, model, bad_calls: set[int]):
        self.model, self.bad, self.calls, self.snapshot = model, bad_calls, 0, None
        self.unchanged_after_skip: list[bool] = []
        self._orig = model.forward
        model.forward = self.forward

    def forward(self, idx, targets=None):
        self.calls += 1
        if self.snapshot is not None and self.model.training:
            now = [p.detach().clone() for p in self.model.parameters()]
            self.unchanged_after_skip.append(all(torch.equal(a, b) for a, b in zip(self.snapshot, now, strict=True)))
            self.snapshot = None
        logits, loss = self._orig(idx, targets)
        if self.calls in self.bad:
            self.snapshot = [p.detach().clone() for p in self.model.parameters()]
            loss = loss * float("nan")
        return logits, loss


def _model_for(cfg):
    from lmforge.data import prepare_data
    from lmforge.models import build_model

    data = prepare_data(cfg)
    return data, build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)


def test_nan_step_is_skipped_without_touching_state(corpus, tmp_path):
    cfg = cfg_for(corpus, "--train.max_steps", "10", "--train.eval_interval", "100")
    data, model = _model_for(cfg)
    wrap = _NaNAt(model, {4})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = train(cfg, tmp_path / "run", data=data, model=model, verbose=False)
    assert res.step == 10  # the skipped step did not count
    assert wrap.unchanged_after_skip == [True]


def test_persistent_nan_stops_with_clear_error(corpus, tmp_path):
    cfg = cfg_for(corpus, "--train.max_steps", "10", "--train.on_bad_steps", "stop")
    data, model = _model_for(cfg)
    _NaNAt(model, set(range(3, 100)))
    with pytest.raises(TrainingError, match="diverged"), pytest.warns(RuntimeWarning):
        train(cfg, tmp_path / "run", data=data, model=model, verbose=False)


def test_nan_rolls_back_to_last_checkpoint(corpus, tmp_path):
    cfg = cfg_for(corpus, "--train.max_steps", "12", "--train.eval_interval", "4")
    data, model = _model_for(cfg)
    _NaNAt(model, {8, 9, 10})  # three in a row after the step-4 checkpoint
    with pytest.warns(RuntimeWarning):
        res = train(cfg, tmp_path / "run", data=data, model=model, verbose=False)
    assert res.step == 12


def test_early_stopping(corpus, tmp_path):
    cfg = cfg_for(
        corpus,
        "--train.max_steps",
        "1000",
        "--train.eval_interval",
        "5",
        "--train.patience",
        "2",
        "--train.min_delta",
        "100",
    )
    res = train(cfg, tmp_path / "run", verbose=False)
    assert res.stop_reason == "early_stopping" and res.step == 15


def test_callback_can_stop(corpus, tmp_path):
    class StopAt(Callback):
        def __init__(self):
            self.seen = []

        def on_eval(self, state, record):
            self.seen.append(record["step"])
            return record["step"] >= 10

    cb = StopAt()
    res = train(
        cfg_for(corpus, "--train.max_steps", "100", "--train.eval_interval", "5"),
        tmp_path / "r",
        callbacks=[cb],
        verbose=False,
    )
    assert res.stop_reason == "callback" and res.step == 10 and cb.seen == [5, 10]


def test_a_step_callback_stops_at_its_step_and_the_stop_is_evaluated(corpus, tmp_path):
    class StopAfter(Callback):
        def on_step(self, state):
            return state.step >= 7

    res = train(
        cfg_for(corpus, "--train.max_steps", "100", "--train.eval_interval", "5"),
        tmp_path / "r",
        callbacks=[StopAfter()],
        verbose=False,
    )
    assert res.stop_reason == "callback" and res.step == 7
    assert [r["step"] for r in res.history if r.get("val_loss") is not None][-1] == 7  # scored where it stopped


@pytest.mark.parametrize("opt", ["gd", "sgd", "momentum", "adam", "adamw", "muon"])
def test_every_optimizer_lowers_the_loss(corpus, tmp_path, opt):
    lr = {"gd": "0.5", "sgd": "0.5", "momentum": "0.1", "muon": "3e-3"}.get(opt, "3e-3")
    steps = "4" if opt == "gd" else "40"
    cfg = cfg_for(
        corpus,
        "--optim.name",
        opt,
        "--optim.lr",
        lr,
        "--train.max_steps",
        steps,
        "--train.eval_interval",
        "1" if opt == "gd" else "10",
        "--schedule.name",
        "constant",
        "--schedule.warmup_steps",
        "0",
    )
    res = train(cfg, tmp_path / opt, verbose=False)
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"] or res.best_val_loss < 3.0


def test_cli_rejects_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\t\n")
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", "--data", str(empty), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "empty" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


class FakeClock:
    """A seconds counter that advances ``tick`` at every reading: the loop's time becomes a function of how
    often it looks at the clock, the same on a loaded machine as on an idle one."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_horizon_decays_the_learning_rate_by_the_clock(corpus, tmp_path):
    out = tmp_path / "timed"
    lr, min_lr, max_time = 1e-3, 1e-5, 1.5
    cfg = cfg_for(
        corpus, "--train.max_steps", "100000", "--train.max_time", str(max_time), "--train.eval_interval", "5",
        "--schedule.name", "cosine", "--schedule.horizon", "time", "--optim.lr", str(lr), "--schedule.min_lr",
        str(min_lr),
    )
    res = train(cfg, out, verbose=False, clock=FakeClock(0.05))
    assert res.stop_reason == "max_time" and 10 < res.step < 100000
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) >= 5
    lrs = [r["lr"] for r in recs]
    assert lrs == sorted(lrs, reverse=True)  # decays (warmup of 2 steps lies before the first record)
    for r in recs:  # each record's lr is the cosine of its own training time (elapsed_s is rounded to 1 ms)
        p = min(1.0, r["elapsed_s"] / max_time)
        assert r["lr"] == pytest.approx(min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (lr - min_lr), abs=1e-6)
    assert recs[-1]["elapsed_s"] >= max_time and lrs[-1] == pytest.approx(min_lr)  # the clock ended the decay
