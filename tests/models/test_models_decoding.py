"""Decoding settings and cache management that change speed, not results: oneDNN off while decoding,
one cache allocation per generation, reorders into spare buffers."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.config import RCNNConfig, RecurrentConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.models.base import without_onednn
from lmforge.predict import GenerationConfig, generate

V = 37


def _transformer(**kw):
    torch.manual_seed(0)
    return build_model(TransformerConfig(n_layer=2, d_model=32, n_head=4, **kw), vocab_size=V, max_seq_len=64).eval()


def test_without_onednn_restores_the_setting_after_nested_and_concurrent_use():
    assert torch.backends.mkldnn.enabled
    inside = threading.Event()
    leave = threading.Event()
    seen = []

    def worker():
        with without_onednn():
            seen.append(torch.backends.mkldnn.enabled)
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=worker)
    with without_onednn():
        t.start()
        assert inside.wait(5)
        with without_onednn():
            assert not torch.backends.mkldnn.enabled
    assert not torch.backends.mkldnn.enabled  # the worker is still inside
    leave.set()
    t.join(5)
    assert seen == [False]
    assert torch.backends.mkldnn.enabled  # the last one out restored it


@pytest.mark.parametrize(
    "model",
    [
        _transformer(),
        build_model(RecurrentConfig(family="lstm", n_layer=1, d_model=16), vocab_size=V),
        build_model(RCNNConfig(n_layer=1, d_model=16, rnn="lstm"), vocab_size=V),
    ],
    ids=["transformer", "lstm", "rcnn"],
)
def test_generate_decodes_without_onednn_and_restores_it(model, monkeypatch):
    flags = []
    real_step = model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: flags.append(torch.backends.mkldnn.enabled) or real_step(*a, **k))
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=3, eos_token_id=[]))
    assert flags and not any(flags)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("beams", [1, 4])
def test_generation_allocates_the_cache_once(beams, monkeypatch):
    model = _transformer()
    grows = []
    real_grow = model._grow
    monkeypatch.setattr(model, "_grow", lambda state, end, exact=False: grows.append(exact) or real_grow(state, end, exact))
    ref = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], GenerationConfig(max_new_tokens=20, num_beams=beams, eos_token_id=[]))
    assert grows == [True]  # the reservation (longest prompt + budget), then no growth while decoding
    monkeypatch.setattr(model, "reserve_state", lambda state, length: None)
    grows.clear()
    out = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], GenerationConfig(max_new_tokens=20, num_beams=beams, eos_token_id=[]))
    assert grows and all(not g for g in grows)  # without it the cache grows on demand ...
    assert out.sequences == ref.sequences  # ... to the same result


def test_reorders_write_into_the_spare_buffers():
    model = _transformer()
    idx = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        state = model.init_state(3)
        model.reserve_state(state, 12)
        _, state = model.step(idx, state)
        first = model.reorder_state(state, torch.tensor([2, 0, 1]))
        assert first.spare is state.kv  # the buffers just read from
        second = model.reorder_state(first, torch.tensor([1, 1, 0]))
        assert second.kv is state.kv  # written in place of the first state's source: no allocation
        assert model.reorder_state(second, torch.tensor([0, 1])).spare is None  # fewer rows: a new buffer
        # rows follow the composition of both orders
        ref = model.init_state(3)
        _, ref = model.step(idx[torch.tensor([2, 0, 1])[torch.tensor([1, 1, 0])]], ref)
        for a, b in zip(second.kv, ref.kv, strict=True):
            torch.testing.assert_close(a[:, :, :, :5], b[:, :, :, :5])


@pytest.mark.parametrize("use_native", [True, False])
def test_beam_like_reorders_skip_the_shared_prompt_and_stay_exact(use_native, monkeypatch):
    """Rows of one prompt share its cache slots: reorders within the groups copy only the slots after them (once
    the spare buffers hold them); a reorder across groups copies everything and regroups. Every row's logits
    must equal a full forward of its own tokens."""
    from lmforge.models import native

    if not use_native:
        monkeypatch.setattr(native, "_enabled_override", False)
    model = _transformer()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, V, (2, 6), generator=g)
    seqs = [prompts[0].tolist()] * 3 + [prompts[1].tolist()] * 3  # 2 prompts x 3 beams
    skipped = []
    with torch.inference_mode():
        state = model.init_state(2)
        model.reserve_state(state, 20)
        _, state = model.step(prompts, state)
        state = model.reorder_state(state, torch.tensor([0, 0, 0, 1, 1, 1]))
        for t in range(10):
            if t == 5:
                index = torch.tensor([4, 1, 2, 3, 0, 5])  # across the groups: rows 0 and 4 swap prompts
            else:  # each row takes a random row of its own group (after the swap: of the new groups)
                members = [torch.nonzero(state.group == state.group[r])[:, 0] for r in range(6)]
                index = torch.stack([m[torch.randint(0, len(m), (1,), generator=g)][0] for m in members])
            state = model.reorder_state(state, index)
            skipped.append(state.spare_ready and state.prefix == 6)
            seqs = [seqs[i] for i in index.tolist()]
            tok = torch.randint(0, V, (6, 1), generator=g)
            logits, state = model.step(tok, state)
            seqs = [s + [int(x)] for s, x in zip(seqs, tok[:, 0].tolist(), strict=True)]
        ref = model(torch.tensor(seqs))[0][:, -1]
    torch.testing.assert_close(logits[:, -1], ref, rtol=0, atol=1e-5)
    assert any(skipped[:5]) and any(skipped[6:]) and not skipped[5]  # skipped before and after the regrouping
