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


def test_a_sigterm_arriving_during_the_ranks_agreement_stops_at_the_next_step(tmp_path, monkeypatch) -> None:
    """The loop acts on the ranks' agreed answer, never on its own flag read after the agreement (one rank
    would stop while the others train on, and their collectives would hang), and the signal is not lost: it
    is agreed on at the next step."""
    from lmforge.config import load_config
    from lmforge.train.distributed import Distributed
    from lmforge.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(200)), encoding="utf-8")
    cfg = load_config(overrides=[
        "--data.path", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--tokenizer.kind", "char",
        "--data.block_size", "16", "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "2",
        "--train.batch_size", "4", "--train.eval_batches", "1", "--train.progress", "false",
        "--train.max_steps", "40", "--train.eval_interval", "20", "--train.compile", "false",
    ])  # fmt: skip
    calls: list[bool] = []
    agree = Distributed.agree_on_stop

    def agree_then_signal(self: Distributed, elapsed_s: float, terminate: bool) -> tuple[float, bool]:
        answer = agree(self, elapsed_s, terminate)
        calls.append(answer[1])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # lands after the answer was formed
            time.sleep(0.01)
        return answer

    monkeypatch.setattr(Distributed, "agree_on_stop", agree_then_signal)
    res = train(cfg, tmp_path / "run", verbose=False)
    assert calls == [False, False, False, True]
    assert res.stop_reason == "sigterm" and res.step == 4
