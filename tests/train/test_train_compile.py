"""train.compile: compiled training equals eager within float tolerance; the auto decision follows the
measured numbers in the ledger; the fused optimizer step equals the foreach one."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from lmforge.config import OptimConfig, TransformerConfig, load_config
from lmforge.models import build_model
from lmforge.runs import load_model
from lmforge.train.compile import (
    CompileLedger,
    Record,
    StepTimes,
    choose,
    compile_for_training,
    compile_key,
    compile_ways,
    decide,
    enable_disk_cache,
    remaining_steps,
    repeated_blocks,
)
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(300))


def _cfg(tmp: Path, *extra: str):
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return load_config(overrides=[
        "--data.path", str(corpus), "--data.cache_dir", str(tmp / "cache"), "--tokenizer.kind", "char",
        "--data.block_size", "16", "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "2",
        "--model.dropout", "0.0", "--train.batch_size", "4", "--train.eval_batches", "2",
        "--train.progress", "false", "--schedule.warmup_steps", "2", *extra,
    ])


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TransformerConfig(n_layer=1, d_model=32, n_head=2, dropout=0.0), vocab_size=40, max_seq_len=16)


# ------------------------------------------------------------------------------------ the decision
def test_decide_compiles_only_when_the_remaining_steps_repay_the_measured_compile_time() -> None:
    recs = {"k": Record(device="cpu", eager_step_s=0.10, compiled_step_s=0.08, compile_cold_s=30.0)}
    # saving 20 ms a step: 1,000 steps save 20 s < 30 s to compile; 2,000 steps save 40 s > 30 s
    assert not decide(recs, "k", "cpu", 0.10, 1000).compile
    assert decide(recs, "k", "cpu", 0.10, 2000).compile
    # a warm cache (compiled before) makes the compile cheap: 1,000 steps now repay it
    recs["k"].compile_warm_s = 5.0
    assert decide(recs, "k", "cpu", 0.10, 1000).compile
    # compiled slower than eager never pays
    recs["k"].compiled_step_s = 0.12
    assert not decide(recs, "k", "cpu", 0.10, 10**9).compile


def test_decide_borrows_other_shapes_on_the_same_device_and_is_eager_without_measurements() -> None:
    other = {"a": Record(device="cpu", eager_step_s=1.0, compiled_step_s=0.5, compile_cold_s=10.0),
             "g": Record(device="cuda", eager_step_s=1.0, compiled_step_s=0.1, compile_cold_s=1.0)}
    # a new shape on cpu: ratio 0.5 and cost 10 s from "a" (not the cuda record): 0.1 s x 0.5 x 300 = 15 s > 10 s
    assert decide(other, "new", "cpu", 0.1, 300).compile
    assert not decide(other, "new", "cpu", 0.1, 100).compile
    assert not decide({}, "new", "cpu", 0.1, 10**9).compile  # nothing measured: eager
    assert not decide(other, "new", "cpu", 0.1, None).compile  # no planned length: eager
    # regional compilation borrows only regional measurements (records without "how" are whole-model ones)
    assert not decide(other, "new", "cpu", 0.1, 300, how="regional").compile
    other["r"] = Record(device="cpu", eager_step_s=1.0, compiled_step_s=0.5, compile_cold_s=1.0, how="regional")
    assert decide(other, "new", "cpu", 0.1, 100, how="regional").compile  # 5 s saved > 1 s
    assert not decide(other, "new", "cpu", 0.1, 100, how="whole").compile  # 5 s saved < 10 s
    # choose: the way that saves the most net seconds among those that pay
    keys = {"whole": "new-w", "regional": "new-r"}
    assert choose(other, keys, "cpu", 0.1, 100).how == "regional"  # whole does not pay at 100 steps
    other["r"].compiled_step_s = 0.9  # regional saves 10%: 1,000 steps save 10 s - 1 s; whole 50 s - 10 s
    best = choose(other, keys, "cpu", 0.1, 1000)
    assert best.compile and best.how == "whole" and best.net_s == pytest.approx(40.0)
    assert not choose(other, keys, "cpu", 0.1, 10).compile


def test_remaining_steps_takes_the_tightest_limit() -> None:
    kw = dict(step=10, tokens=640, tokens_per_step=64, elapsed_s=1.0, eager_step_s=0.1)
    assert remaining_steps(max_steps=100, max_tokens=None, max_time=None, **kw) == 90
    assert remaining_steps(max_steps=100, max_tokens=1280, max_time=None, **kw) == 10
    assert remaining_steps(max_steps=None, max_tokens=None, max_time=3.0, **kw) == pytest.approx(20)
    assert remaining_steps(max_steps=None, max_tokens=None, max_time=None, **kw) is None


def test_ledger_round_trip_and_torn_file(tmp_path: Path) -> None:
    ledger = CompileLedger(tmp_path / "ledger.json")
    assert ledger.load() == {}
    ledger.update("k", "cpu", eager_step_s=0.2, compiled_step_s=None)
    ledger.update("k", "cpu", compiled_step_s=0.1)
    rec = CompileLedger(tmp_path / "ledger.json").get("k")
    assert rec is not None and rec.eager_step_s == 0.2 and rec.compiled_step_s == 0.1 and rec.ratio == 0.5
    (tmp_path / "ledger.json").write_text("{not json")
    assert ledger.load() == {}


def test_step_times_leave_out_first_steps() -> None:
    st = StepTimes()
    for s in (5.0, 1.0, 1.2, 0.8):
        st.add(s, compiled=False)
    for s in (9.0, 0.5, 0.7):
        st.add(s, compiled=True)
    assert st.eager_median() == 1.0 and st.compiled_median() == 0.6
    assert st.compile_cost() == pytest.approx(8.4)


def test_compile_key_depends_on_shape_and_model() -> None:
    m, cpu = _tiny(), torch.device("cpu")
    k = compile_key(m, 4, 16, "auto", cpu)
    assert k == compile_key(_tiny(1), 4, 16, "auto", cpu)  # weights do not matter
    assert k != compile_key(m, 8, 16, "auto", cpu)
    assert k != compile_key(m, 4, 16, "bfloat16", cpu)
    other = build_model(TransformerConfig(n_layer=2, d_model=32, n_head=2), vocab_size=40, max_seq_len=16)
    assert k != compile_key(other, 4, 16, "auto", cpu)


def test_regional_compilation_finds_repeated_blocks_only() -> None:
    two = build_model(TransformerConfig(n_layer=2, d_model=32, n_head=2), vocab_size=40, max_seq_len=16)
    assert repeated_blocks(two) == list(two.h) and compile_ways(two) == ["whole", "regional"]
    assert repeated_blocks(_tiny()) == [] and compile_ways(_tiny()) == ["whole"]  # one block: nothing repeats
    lstm = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.LSTM(4, 4), torch.nn.LSTM(4, 4)]))
    assert repeated_blocks(lstm) == []  # torch's fused recurrent layers compile whole
    # the two ways compile different graphs: their measurements are kept apart
    cpu = torch.device("cpu")
    assert compile_key(two, 4, 16, "auto", cpu) == compile_key(two, 4, 16, "auto", cpu, how="whole")  # default
    assert compile_key(two, 4, 16, "auto", cpu) != compile_key(two, 4, 16, "auto", cpu, how="regional")
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_for_training(_tiny(), "regional")


def test_disk_cache_goes_under_lmforge_cache_unless_set(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert enable_disk_cache() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert enable_disk_cache() == tmp_path / "mine"


# ------------------------------------------------------------------------------------- the loop
def test_auto_stays_eager_without_measurements_and_records_the_eager_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "lm-cache"))
    res = train(_cfg(tmp_path, "--train.max_steps", "12", "--train.eval_interval", "6"), tmp_path / "run",
                verbose=False)
    assert not res.compiled
    recs = CompileLedger().load()
    assert len(recs) == 1 and next(iter(recs.values())).eager_step_s is not None
    # the trial's wall time, by phase
    assert set(res.phases) == {"build_s", "train_s", "compile_s", "eval_s", "checkpoint_s"}
    assert res.phases["train_s"] > 0 and res.phases["eval_s"] > 0 and res.phases["checkpoint_s"] > 0
    assert res.phases["compile_s"] == 0


def test_auto_stays_eager_when_another_rank_says_compiling_does_not_pay(tmp_path: Path, monkeypatch) -> None:
    """Ranks measure their own steps; the compile decision must be the same on all of them: here this rank's
    numbers say compile, another rank's do not (``all_true`` is the collective), and the run stays eager."""
    import lmforge.train.loop as loop_mod
    from lmforge.train.compile import Decision
    from lmforge.train.distributed import Distributed

    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "lm-cache"))
    monkeypatch.setattr(loop_mod, "choose", lambda *a, **k: Decision(True, "measured: it pays"))
    asked: list[bool] = []

    def all_true(self: Distributed, flag: bool) -> bool:
        asked.append(flag)
        return False  # some other rank says no

    monkeypatch.setattr(Distributed, "all_true", all_true)
    res = train(_cfg(tmp_path, "--train.max_steps", "12", "--train.eval_interval", "6"), tmp_path / "run",
                verbose=False)
    assert True in asked and not res.compiled


@pytest.mark.slow
def test_compiled_training_equals_eager_and_auto_compiles_when_measurements_say_so(
    tmp_path: Path, monkeypatch
) -> None:
    """Same config, same seed: eager, compiled from the start, and auto switching after the probe steps
    (the ledger says compiling pays) reach the same losses and weights within float tolerance."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "lm-cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    args = ("--train.max_steps", "12", "--train.eval_interval", "6", "--model.n_layer", "2")
    eager = train(_cfg(tmp_path, *args, "--train.compile", "false"), tmp_path / "eager", verbose=False)
    compiled = train(_cfg(tmp_path, *args, "--train.compile", "true"), tmp_path / "compiled", verbose=False)
    assert not eager.compiled and compiled.compiled and compiled.phases["compile_s"] > 0
    # both runs measured: a ratio and a compile cost for the whole way's key (the regional key has the eager
    # step only); now tell auto that compiling whole pays
    ledger = CompileLedger()
    recs = {r.how: (k, r) for k, r in ledger.load().items()}
    assert set(recs) == {"whole", "regional"} and recs["regional"][1].compiled_step_s is None
    key, rec = recs["whole"]
    assert rec.eager_step_s and rec.compiled_step_s and rec.compile_cold_s is not None
    ledger.update(key, "cpu", compiled_step_s=rec.eager_step_s * 0.1, compile_warm_s=0.0)
    auto = train(_cfg(tmp_path, *args), tmp_path / "auto", verbose=False)
    assert auto.compiled
    # and that compiling regionally pays more: auto compiles the blocks of a given model in place, and hands
    # the model back with eager blocks
    ledger.update(recs["regional"][0], "cpu", compiled_step_s=rec.eager_step_s * 0.05, compile_warm_s=0.0)
    given, _, _ = load_model(tmp_path / "eager" / "best")  # the same model config: the same ledger keys
    regional = train(_cfg(tmp_path, *args), tmp_path / "regional", model=given, verbose=False)
    assert regional.compiled and all(b._compiled_call_impl is None for b in given.h)
    assert (CompileLedger().get(recs["regional"][0]).compile_warm_s or 0) > 0  # type: ignore[union-attr]  # measured
    for res in (compiled, auto):
        for a, b in zip(eager.history, res.history, strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-5)
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_regional_and_whole_compiled_steps_equal_eager_and_undo_restores_the_model() -> None:
    """Five AdamW steps of a 2-block model: blocks compiled in place (regional) and the model compiled
    whole reach eager's losses and weights within float tolerance; undo leaves eager blocks behind."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = build_model(TransformerConfig(n_layer=2, d_model=32, n_head=2, dropout=0.0), vocab_size=40,
                       max_seq_len=16)
    batches = [(torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))) for _ in range(5)]
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, eps=1e-4)
    runs: dict[str, tuple[list[float], torch.nn.Module]] = {}
    for how in ("eager", "regional", "whole"):
        model = copy.deepcopy(base)
        fwd, undo = (model, lambda: None) if how == "eager" else compile_for_training(model, how)  # type: ignore[arg-type]
        if how == "regional":
            assert fwd is model and all(b._compiled_call_impl is not None for b in model.h)
        opt = build_optimizer(model, cfg)
        losses = []
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            _, loss = fwd(x, y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        undo()
        assert all(b._compiled_call_impl is None for b in model.h)
        runs[how] = (losses, model)
    for how in ("regional", "whole"):
        assert runs[how][0] == pytest.approx(runs["eager"][0], rel=1e-4, abs=1e-5)
        for (name, a), b in zip(runs["eager"][1].named_parameters(), runs[how][1].parameters(), strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (how, name, (a - b).abs().max())


# ---------------------------------------------------------------------------------- the optimizer
def test_fused_adamw_step_equals_foreach_step() -> None:
    """build_optimizer's fused AdamW (CPU) against torch's foreach AdamW as the reference, five steps."""
    a = _tiny()
    b = copy.deepcopy(a)
    # eps 1e-4: the key bias' gradient is zero in exact arithmetic (softmax ignores it), and Adam would
    # blow its rounding noise (1e-9) up to full-size steps of either sign
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, eps=1e-4)
    fused = build_optimizer(a, cfg)
    assert fused.defaults["fused"]
    ref = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    torch.manual_seed(1)
    x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    for model, opt in ((a, fused), (b, ref)):
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), (name, (pa - pb).abs().max())
    assert math.isfinite(float(loss.detach()))
