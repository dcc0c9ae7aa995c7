"""Reliability of ``lmforge train``/``finetune`` (#14.3, 7, 8, 9, repeated flags; #13's full-batch gradient):
every case a user or a crash can cause ends in one line on stderr (exit 2) and leaves earlier work intact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge.train.loop as loop_module
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import Tokenizer, prepare_data
from lmforge.models import build_model
from lmforge.runs import (
    RUN_FILE,
    load_checkpoint,
    save_best,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.train import TrainingError, train
from lmforge.train.memory import check_fits_in_memory

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(400))
TINY = [
    "--tokenizer.kind", "char", "--data.block_size", "16", "--model.n_layer", "1", "--model.d_model", "16",
    "--model.n_head", "2", "--train.batch_size", "4", "--train.eval_batches", "2", "--train.progress", "false",
    "--schedule.warmup_steps", "2",
]  # fmt: skip


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def cfg_for(corpus: Path, *extra: str):
    return load_config(
        overrides=["--data.path", str(corpus), "--data.cache_dir", str(corpus.parent / "cache"), *TINY, *extra]
    )


def cli_args(corpus: Path, out: Path | str, *extra: str) -> list[str]:
    """``lmforge train`` on the tiny config; a field in ``extra`` replaces TINY's (the CLI refuses repeats)."""
    given = {a for a in extra if a.startswith("--")}
    tiny = [a for i in range(0, len(TINY), 2) if TINY[i] not in given for a in TINY[i : i + 2]]
    return ["train", "--data", str(corpus), "--out", str(out), "--sample", "0",
            "--data.cache_dir", str(corpus.parent / "cache"), *tiny, *extra]  # fmt: skip


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> its sha256 (what "untouched" means)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def steps_of(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _env() -> dict[str, str]:
    """The environment of a ``python -m lmforge`` child: this checkout's package first."""
    return {**os.environ, "PYTHONPATH": str(Path(loop_module.__file__).parents[2])}


# ------------------------------------------------------------------------- repeated or conflicting flags
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data.path", "other.txt"], ["--data", "--data.path other.txt", "data.path"]),
        (["--train.max_steps", "5", "--train.max_steps=6"], ["--train.max_steps", "'5'", "'6'", "twice"]),
        (["--out", "elsewhere"], ["--out", "twice", "'elsewhere'"]),
    ],
)
def test_repeated_or_conflicting_flags_are_one_line_errors(corpus, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, *extra)) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert not out.exists() and not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------------ #14.8 --out
def test_out_into_a_users_folder_is_refused_and_left_alone(corpus, tmp_path, capsys, monkeypatch):
    """The issue's case: ``--config config.yaml --out .`` in a folder with the user's commented config and an
    unrelated metrics.jsonl (which used to count as proof of a run: it was appended to, config.yaml replaced)."""
    home = tmp_path / "project"
    home.mkdir()
    (home / "config.yaml").write_text("# my settings, with comments\ntrain:\n  max_steps: 5\n")
    (home / "metrics.jsonl").write_text('{"accuracy": 0.93}\n')
    before = tree_digest(home)
    monkeypatch.chdir(home)
    assert main(["train", "--config", "config.yaml", "--out", ".", "--data", str(corpus), "--sample", "0"]) == 2
    err = one_line_error(capsys)
    assert "not an lmforge run" in err and "config.yaml" in err and "metrics.jsonl" in err
    assert tree_digest(home) == before and sorted(p.name for p in home.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_finetune_refuses_a_users_folder_before_loading_the_model(base_ckpt, corpus, tmp_path, capsys):
    home = tmp_path / "notes"
    home.mkdir()
    (home / "task.json").write_text("{}")
    assert main(["finetune", "--model", str(base_ckpt), "--data", str(corpus), "--out", str(home)]) == 2
    assert "not an lmforge run (task.json)" in one_line_error(capsys)
    assert [p.name for p in home.iterdir()] == ["task.json"]


def test_a_new_run_is_marked_and_can_be_resumed_by_the_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--train.max_steps", "4", "--train.eval_interval", "2")) == 0
    assert (out / RUN_FILE).is_file()
    assert main(cli_args(corpus, out, "--train.max_steps", "6", "--train.eval_interval", "2",
                         "--train.resume", "auto")) == 0  # fmt: skip
    assert steps_of(out) == [2, 4, 6]


# ------------------------------------------------------------------------------ #14.9 one-line errors
def test_out_is_a_file_or_read_only(corpus, tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(cli_args(corpus, f, "--train.max_steps", "4")) == 2
    assert "is a file" in one_line_error(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: let the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    assert main(cli_args(corpus, ro, "--train.max_steps", "4")) == 2
    assert "is not writable" in one_line_error(capsys)
    assert main(cli_args(corpus, ro / "run", "--train.max_steps", "4")) == 2
    assert "cannot be created" in one_line_error(capsys)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_stops_with_one_line(corpus, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "step-0000004" in str(filename):
            _enospc()
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--train.max_steps", "6", "--train.eval_interval", "2")) == 2
    err = one_line_error(capsys)
    assert "no space left" in err and "step-0000004" in err
    verify_checkpoint(out / "checkpoints" / "step-0000002")  # the earlier checkpoint is intact
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no half-written leftovers


def test_disk_full_during_a_metrics_write_stops_with_one_line(corpus, tmp_path, capsys, monkeypatch):
    real_append, calls = loop_module.append_metrics, []

    def append(out_dir, record):
        calls.append(record["step"])
        if len(calls) == 2:
            _enospc()
        real_append(out_dir, record)

    monkeypatch.setattr(loop_module, "append_metrics", append)
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--train.max_steps", "6", "--train.eval_interval", "2")) == 2
    err = one_line_error(capsys)
    assert "no space left" in err and "metrics.jsonl" in err
    verify_checkpoint(out / "checkpoints" / "step-0000002")
    assert steps_of(out) == [2]


def test_a_model_too_big_for_memory_is_refused_with_the_numbers(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--model.d_model", "100000", "--train.max_steps", "4")) == 2
    err = one_line_error(capsys)
    assert "does not fit in memory" in err and "model.d_model 100000" in err and "available" in err
    assert "TB" in err  # ~480 billion parameters
    assert not (out / "checkpoints").exists()


def test_memory_check_passes_small_models_and_counts_the_optimizer(corpus):
    cfg = cfg_for(corpus, "--model.d_model", "64", "--model.n_layer", "2")
    check_fits_in_memory(cfg, 50, torch.device("cpu"), free=64 * 2**20)
    with pytest.raises(TrainingError, match=r"adamw state.*has 100\.0 KB available"):
        check_fits_in_memory(cfg, 50, torch.device("cpu"), free=100 * 1024)


@pytest.mark.parametrize(
    "change, words",
    [
        (["--model.n_layer", "2"], ["model.n_layer 1 -> 2"]),
        (["--tokenizer.kind", "byte"], ["tokenizer.kind 'char' -> 'byte'"]),
    ],
)
def test_resume_with_a_changed_model_or_tokenizer_names_the_fields(corpus, tmp_path, capsys, change, words):
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--train.max_steps", "4", "--train.eval_interval", "2")) == 0
    capsys.readouterr()
    before = tree_digest(out)
    assert main(cli_args(corpus, out, "--train.max_steps", "6", "--train.resume", "auto", *change)) == 2
    err = one_line_error(capsys)
    assert "cannot resume" in err and all(w in err for w in words), err
    assert tree_digest(out) == before


def test_trainer_state_missing_keys_is_named(corpus, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(corpus, "--train.max_steps", "4", "--train.eval_interval", "4"), out, verbose=False)
    path = out / "checkpoints" / "step-0000004"
    ck = load_checkpoint(path)
    assert ck.trainer_state is not None
    del ck.trainer_state["sampler"], ck.trainer_state["bad_evals"]
    save_checkpoint(path, model=ck.state_dict, config_yaml=(path / "config.yaml").read_text(),
                    tokenizer=Tokenizer.load(path), trainer_state=ck.trainer_state, meta=ck.meta)  # fmt: skip
    with pytest.raises(TrainingError, match=r"trainer state lacks sampler, bad_evals"):
        train(cfg_for(corpus, "--train.max_steps", "6", "--train.resume", "auto"), out, verbose=False)


# ----------------------------------------------------------------------------- #14.3 resume and best/
def _plant_best(out: Path, val_loss: float, step: int) -> dict[str, str]:
    """Replace ``OUT/best`` by a model recorded as far better than anything a few steps reach."""
    ck = load_checkpoint(out / "best", load_trainer_state=False)
    save_best(out, model=ck.state_dict, config_yaml=(out / "best" / "config.yaml").read_text(),
              tokenizer=Tokenizer.load(out / "best"), meta={**ck.meta, "val_loss": val_loss, "step": step})  # fmt: skip
    return tree_digest(out / "best")


def test_all_checkpoints_corrupt_stops_and_keeps_best_and_metrics(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(corpus, out, "--train.max_steps", "4", "--train.eval_interval", "2")) == 0
    capsys.readouterr()
    best, metrics = tree_digest(out / "best"), (out / "metrics.jsonl").read_bytes()
    ckpts = sorted((out / "checkpoints").iterdir())
    for ck in ckpts:
        (ck / "model.safetensors").write_bytes(b"garbage")
    # a real process: what the user sees on stderr, warnings included
    r = subprocess.run([sys.executable, "-m", "lmforge", *cli_args(corpus, out, "--train.max_steps", "8",
                                                                   "--train.resume", "auto")],
                       capture_output=True, text=True, env=_env(), timeout=300)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(str(ck / "model.safetensors") in r.stderr for ck in ckpts), r.stderr
    assert tree_digest(out / "best") == best and (out / "metrics.jsonl").read_bytes() == metrics


def test_resume_never_replaces_a_better_best(corpus, tmp_path):
    """Killed between saving best/ and its checkpoint: the checkpoint's counters know an older, worse best."""
    out = tmp_path / "run"
    common = ["--train.eval_interval", "5", "--optim.lr", "1e-2"]
    first = train(cfg_for(corpus, "--train.max_steps", "10", *common), out, verbose=False)
    planted = _plant_best(out, 0.001, 10)
    res = train(cfg_for(corpus, "--train.max_steps", "20", "--train.resume", "auto", *common), out, verbose=False)
    later = [r["val_loss"] for r in res.history if r["step"] > 10]
    assert min(later) < first.best_val_loss  # the resumed run did improve on the checkpoint's best ...
    assert tree_digest(out / "best") == planted  # ... but not on best/, which stays
    assert res.best_val_loss == 0.001 and res.best_step == 10
    assert steps_of(out) == [5, 10, 15, 20]


def test_restart_without_checkpoints_keeps_best_and_writes_each_record_once(corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--train.max_steps", "10", "--train.eval_interval", "5", "--train.resume", "auto"]
    train(cfg_for(corpus, *common), out, verbose=False)
    planted = _plant_best(out, 0.001, 10)
    shutil.rmtree(out / "checkpoints")
    train(cfg_for(corpus, *common), out, verbose=False)
    assert steps_of(out) == [5, 10]
    assert tree_digest(out / "best") == planted


def test_resume_never_refuses_a_directory_with_a_best_model(corpus, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(corpus, "--train.max_steps", "4", "--train.eval_interval", "2"), out, verbose=False)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(TrainingError, match=r"already holds a run \(best\).*--train.resume auto"):
        train(cfg_for(corpus, "--train.max_steps", "4"), out, verbose=False)


# ------------------------------------------------------------------------------------ #14.7 the lock
def test_a_second_train_on_one_out_is_refused_and_the_first_goes_on(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", *cli_args(corpus, out, "--train.max_steps", "100000",
                                                       "--train.eval_interval", "5")]  # fmt: skip
    env = _env()
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():  # the first one is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run([*cmd, "--train.resume", "auto"], capture_output=True, text=True, env=env,
                                timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert "in use by another lmforge train process" in second.stderr
        assert first.poll() is None  # unaffected: still training
        n = len(steps_of(out))
        while len(steps_of(out)) == n:
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    steps = steps_of(out)
    assert steps == sorted(set(steps))  # one writer: no interleaved or repeated records
    verify_checkpoint(sorted((out / "checkpoints").glob("step-*"))[-1])


# ------------------------------------------------------------------- #13 full-batch gradient descent
def test_full_batch_gd_step_is_the_closed_form_full_batch_gradient(corpus, tmp_path):
    """One ``gd`` step moves the weights by ``-lr * grad`` of the mean loss over every block of the training
    split, computed here independently: every block sliced from the token array, one autograd pass."""
    lr = 0.5
    cfg = cfg_for(corpus, "--optim.name", "gd", "--optim.lr", str(lr), "--optim.weight_decay", "0",
                  "--optim.grad_clip", "0", "--schedule.name", "constant", "--schedule.warmup_steps", "0",
                  "--train.max_steps", "1", "--train.batch_size", "64", "--train.eval_interval", "1",
                  "--train.dtype", "float32")  # fmt: skip
    data = prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    reference = build_model(cfg.model, vocab_size=data.tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    reference.load_state_dict(model.state_dict())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    T = cfg.data.block_size
    tokens = torch.as_tensor(data.train.astype("int64"))
    n = (len(tokens) - 1) // T  # every full block with its next-token targets
    x = torch.stack([tokens[i * T : (i + 1) * T] for i in range(n)])
    y = torch.stack([tokens[i * T + 1 : (i + 1) * T + 1] for i in range(n)])
    logits, _ = reference(x)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()

    train(cfg, tmp_path / "gd", data=data, model=model, verbose=False)
    for name, p in model.named_parameters():
        grad = dict(reference.named_parameters())[name].grad
        assert grad is not None
        torch.testing.assert_close((before[name] - p.detach()) / lr, grad, rtol=1e-4, atol=1e-6, msg=name)
