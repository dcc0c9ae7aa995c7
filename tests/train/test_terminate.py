"""SIGTERM as a request: the flag is set, the previous handler comes back, and a loop still inside the block
``stuck_after_s`` seconds after the signal gets every thread's stack on stderr (what a launcher's 30-s kill
would otherwise hide)."""

from __future__ import annotations

import os
import signal
import time

from lmforge.train.terminate import TerminateRequest


def test_sigterm_sets_the_flag_and_restores_the_handler(capfd) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with TerminateRequest(stuck_after_s=60) as term:
        assert not term.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        assert term.requested
    assert signal.getsignal(signal.SIGTERM) is before
    time.sleep(0.1)
    assert "Traceback" not in capfd.readouterr().err  # left in time: no stack dump


def test_a_loop_stuck_after_sigterm_dumps_its_stacks(capfd) -> None:
    with TerminateRequest(stuck_after_s=0.2) as term:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.6)  # "stuck"
        assert term.requested
    err = capfd.readouterr().err
    assert "most recent call first" in err and "test_a_loop_stuck_after_sigterm_dumps_its_stacks" in err
