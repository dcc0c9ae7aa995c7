"""--out checks and the per-run-directory lock (#14.7, #14.8, #14.9)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from lmforge.runs import OutDirError, RunLockedError, check_out_dir, claim_run_dir, describe_os_error, run_lock


def test_new_empty_and_existing_runs_are_accepted(tmp_path: Path) -> None:
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    assert check_out_dir(run)


def test_a_users_folder_is_refused_with_the_files_named(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("# my precious comments\n")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(OutDirError, match=r"not an lmforge run \(config.yaml, notes.txt\)"):
        check_out_dir(tmp_path)


def test_a_file_and_a_read_only_parent_are_one_line_errors(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutDirError, match="is a file"):
        check_out_dir(f)
    with pytest.raises(OutDirError, match="cannot be created"):
        check_out_dir(f / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutDirError, match="cannot be created"):
            check_out_dir(ro / "run")


def test_disk_full_is_described_in_one_line(tmp_path: Path) -> None:
    msg = describe_os_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x")
    assert "no space left" in msg and "\n" not in msg


def _hold(path: str, started, release) -> None:
    with run_lock(path, "train"):
        started.set()
        release.wait(30)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), started, release))
    p.start()
    try:
        assert started.wait(60)
        with pytest.raises(RunLockedError, match="in use by another lmforge train"):
            with run_lock(tmp_path, "train"):
                pass
    finally:
        release.set()
        p.join(30)
    with run_lock(tmp_path, "train"):  # free again once the holder is gone
        pass


def test_non_writer_ranks_do_not_judge_the_folder_rank_0_is_creating(tmp_path: Path) -> None:
    """Under torchrun rank 0 writes ``lmforge-run.json`` (through a temporary sibling) while the other ranks
    enter ``claim_run_dir``: they must not refuse the half-written folder (the launcher checked it)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-lmforge-run.json-1b46230c").write_text("{")  # rank 0, mid atomic write
    with claim_run_dir(out, "train", writer=False) as got:
        assert got == out
    with pytest.raises(OutDirError, match="not an lmforge run"):  # the writer still checks
        with claim_run_dir(out, "train"):
            pass
