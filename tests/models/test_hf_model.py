"""Family ``hf``: a local Hugging Face causal LM behind the lmforge contract, checked against HF itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lmforge.config import ConfigError, HFModelConfig  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.models.base import ContextLengthError  # noqa: E402
from lmforge.models.hf import HFCausalLM, HFLoadError  # noqa: E402

V = 100


def save_tiny(kind: str, path: Path) -> Path:
    """A tiny random GPT-2 or Llama checkpoint (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=V,
            max_position_embeddings=48,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def pair(hf_dir):
    """(lmforge wrapper, independently loaded HF reference model)."""
    from transformers import AutoModelForCausalLM

    model = build_model(HFModelConfig(path=str(hf_dir))).eval()
    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return model, ref


def test_build_through_registry(pair, hf_dir):
    model, ref = pair
    assert isinstance(model, HFCausalLM)
    assert model.max_seq_len == 48 and model.config.vocab_size == V
    assert model.num_params() == sum(p.numel() for p in ref.parameters())
    assert model.num_params(exclude_embeddings=True) < model.num_params()
    assert model.flops_per_token(16) > 6 * model.num_params(exclude_embeddings=True)


def test_forward_logits_and_loss_match_hf(pair):
    model, ref = pair
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (3, 12), generator=g)
    targets = torch.randint(0, V, (3, 12), generator=g)
    targets[0, :5] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets)
        ref_logits = ref(input_ids=idx).logits
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    # brute-force loss over the kept targets
    keep = targets != -100
    expected = -torch.log_softmax(ref_logits, -1)[keep].gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ContextLengthError):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_incremental_left_padded_matches_each_row_alone(pair):
    model, ref = pair
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, V, (n,), generator=g) for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(3, T, dtype=torch.long)
    valid = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = r
        valid[i, T - len(r) :] = True
    cont = torch.randint(1, V, (3, 4), generator=g)
    with torch.no_grad():
        state = model.init_state(3)
        logits, state = model.step(idx, state, valid)
        steps = []
        for t in range(cont.size(1)):
            out, state = model.step(cont[:, t : t + 1], state)
            steps.append(out[:, 0])
        assert model.state_length(state) == T + cont.size(1)
        for i, r in enumerate(rows):
            full = torch.cat([r, cont[i]])
            ref_logits = ref(input_ids=full[None]).logits[0]  # (len, V) of the row alone, no padding
            torch.testing.assert_close(logits[i, T - len(r) :], ref_logits[: len(r)], rtol=0, atol=1e-5)
            for t in range(cont.size(1)):
                torch.testing.assert_close(steps[t][i], ref_logits[len(r) + t], rtol=0, atol=1e-5)


def test_reorder_state_selects_rows_and_keeps_the_original(pair):
    model, ref = pair
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (2, 6), generator=g)
    nxt = torch.randint(0, V, (3, 1), generator=g)
    with torch.no_grad():
        _, state = model.step(idx, model.init_state(2))
        order = torch.tensor([1, 1, 0])
        reordered = model.reorder_state(state, order)
        out, _ = model.step(nxt, reordered)
        for j, i in enumerate(order.tolist()):
            ref_logits = ref(input_ids=torch.cat([idx[i], nxt[j]])[None]).logits[0, -1]
            torch.testing.assert_close(out[j, 0], ref_logits, rtol=0, atol=1e-5)
        # the original state was not changed by the reorder: it still continues row 0 and 1
        out0, _ = model.step(nxt[:2], state)
        ref0 = ref(input_ids=torch.cat([idx, nxt[:2]], 1)).logits[:, -1]
        torch.testing.assert_close(out0[:, 0], ref0, rtol=0, atol=1e-5)


def test_context_limit_on_step(pair):
    model, _ = pair
    state = model.init_state(1)
    with torch.no_grad():
        _, state = model.step(torch.zeros(1, 48, dtype=torch.long), state)
        with pytest.raises(ContextLengthError):
            model.step(torch.zeros(1, 1, dtype=torch.long), state)


def test_user_errors(tmp_path, hf_dir):
    with pytest.raises(HFLoadError, match="no such directory"):
        build_model(HFModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFLoadError, match="config.json"):
        build_model(HFModelConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="vocab"):
        build_model(HFModelConfig(path=str(hf_dir)), vocab_size=V + 1)
    with pytest.raises(ConfigError, match="positions"):
        build_model(HFModelConfig(path=str(hf_dir)), max_seq_len=49)


def test_hf_model_trains(hf_dir):
    """A few optimizer steps lower the loss on a fixed batch (the wrapper is differentiable end to end)."""
    model = build_model(HFModelConfig(path=str(hf_dir)), vocab_size=V, max_seq_len=16).train()
    assert model.max_seq_len == 48  # block size does not shrink the checkpoint's context
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V, (4, 16), generator=g)
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(5):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
