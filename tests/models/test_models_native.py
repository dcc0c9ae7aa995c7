"""The C++ decoding step (lmforge.models.native) against the Python fast path it mirrors, and its switches."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

from lmforge.config import TransformerConfig
from lmforge.models import build_model, native

V = 61
pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None, reason="needs a C++ compiler and ninja"
)

CONFIGS = {
    "gpt2": dict(n_layer=2, d_model=32, n_head=4),
    "gelu_tanh": dict(n_layer=2, d_model=32, n_head=4, mlp="gelu_tanh"),
    "llama_gqa": dict(
        n_layer=2, d_model=32, n_head=4, n_kv_head=2, position="rope", norm="rmsnorm", mlp="swiglu", bias=False
    ),
    "parallel_rope": dict(n_layer=3, d_model=48, n_head=3, position="rope", layout="parallel"),
}


@pytest.fixture
def python_only():
    native.set_enabled(False)
    yield
    native.set_enabled(None)


def _decode(model, prompts, valid, steps, use_native):
    """Prefill, then ``steps`` one-token steps; returns every step's logits and the final state."""
    native.set_enabled(use_native)
    try:
        with torch.inference_mode():
            state = model.init_state(prompts.size(0))
            logits, state = model.step(prompts, state, valid=valid)
            out = []
            for _ in range(steps):
                tok = logits[:, -1].argmax(-1, keepdim=True)
                logits, state = model.step(tok, state)
                out.append(logits)
        return torch.cat(out, dim=1), state
    finally:
        native.set_enabled(None)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_native_step_equals_the_python_step(name, padded):
    assert native.build() is not None  # a machine with a compiler must build it
    torch.manual_seed(0)
    model = build_model(TransformerConfig(**CONFIGS[name]), vocab_size=V, max_seq_len=40).eval()
    prompts = torch.randint(0, V, (3, 7))
    valid = None
    if padded:  # left padding of different lengths
        valid = torch.arange(7)[None, :] >= torch.tensor([0, 2, 5])[:, None]
    ours, s1 = _decode(model, prompts, valid, 12, True)
    ref, s2 = _decode(copy.deepcopy(model), prompts, valid, 12, False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert s1.length == s2.length and torch.equal(s1.pos, s2.pos)
    for a, b in zip(s1.kv, s2.kv, strict=True):
        torch.testing.assert_close(a[:, :, :, : s1.length], b[:, :, :, : s2.length], rtol=1e-5, atol=1e-6)


def test_the_native_ops_are_what_decoding_and_reordering_run(monkeypatch):
    model = build_model(TransformerConfig(**CONFIGS["gpt2"]), vocab_size=V, max_seq_len=16).eval()
    calls = []
    real = native.build()

    class Spy:
        def decode_step(self, *a):
            calls.append("step")
            return real.decode_step(*a)

        def reorder(self, *a):
            calls.append("reorder")
            return real.reorder(*a)

    monkeypatch.setattr(native, "_loaded", Spy())
    with torch.inference_mode():
        state = model.init_state(2)
        _, state = model.step(torch.zeros(2, 3, dtype=torch.long), state)
        _, state = model.step(torch.zeros(2, 1, dtype=torch.long), state)
        state = model.reorder_state(state, torch.tensor([1, 0]))
    assert calls == ["step", "reorder"]


def test_native_reorder_equals_index_select():
    torch.manual_seed(0)
    src = [torch.randn(4, 2, 3, 10, 5) for _ in range(2)]
    dst = [torch.full_like(t, float("nan")) for t in src]
    index = torch.tensor([3, 3, 0, 1])
    native.build().reorder(src, dst, index, 2, 7)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[:, :, :, 2:7], s[index][:, :, :, 2:7])
        assert d[:, :, :, :2].isnan().all() and d[:, :, :, 7:].isnan().all()  # slots outside are not touched


def test_env_switch(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.decode_step() is None
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="LMFORGE_NATIVE_DECODE='yes'"):
        native.decode_step()


def test_a_failed_build_falls_back_in_auto_mode_and_raises_when_required(monkeypatch, tmp_path):
    bad = tmp_path / "decode.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_SOURCE", bad)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(native.NativeBuildError, match="building decode.cpp failed"):
        native.decode_step()
    monkeypatch.setenv(native.ENV, "auto")
    with pytest.warns(RuntimeWarning, match="decoding runs in Python"):
        assert native.decode_step() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert native.decode_step() is None
    # another process (fresh module state) in auto mode does not try the same failed build again
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_warned", False)
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("built again"))
    with pytest.warns(RuntimeWarning, match="an earlier attempt"):
        assert native.decode_step() is None
    # and the model decodes in Python meanwhile
    model = build_model(TransformerConfig(**CONFIGS["gpt2"]), vocab_size=V, max_seq_len=16).eval()
    with torch.inference_mode():
        state = model.init_state(1)
        _, state = model.step(torch.zeros(1, 3, dtype=torch.long), state)
        logits, _ = model.step(torch.zeros(1, 1, dtype=torch.long), state)
    assert logits.shape == (1, 1, V)


def test_python_only_fixture_turns_it_off(python_only):
    assert native.decode_step() is None



def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    """A build killed mid-way leaves torch's lock file behind (torch would wait on it forever); a recent one
    belongs to a build in progress in another process. (Loading a second build into this process would abort
    it: the op namespace can be registered once, so ``build`` itself is not called here.)"""
    import os

    lock = tmp_path / "lock"
    lock.touch()
    native._remove_stale_lock(lock)
    assert lock.exists()
    old = lock.stat().st_mtime - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    native._remove_stale_lock(lock)
    assert not lock.exists() and "stale build lock" in capsys.readouterr().err
    native._remove_stale_lock(lock)  # no lock: nothing to do


def test_ninja_next_to_the_interpreter_is_put_on_path(monkeypatch, tmp_path):
    """A virtual environment's programs run without activating it: its bin/ (where the ninja package puts the
    program) is not on PATH, so the build puts it there for torch, and only for the build."""
    import os
    import sys

    bin_dir = tmp_path / "venv-bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    (bin_dir / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with native._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(bin_dir)
    assert os.environ["PATH"] == str(tmp_path / "empty")
