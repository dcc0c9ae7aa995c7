"""Small stand-in models and tokenizers for the generation-engine tests (imported by tests/test_generate_*.py).

They implement the incremental-state contract of ``lmforge.models.base`` with code paths independent of the
engine: ``forward`` recomputes the whole sequence (``nn.GRU`` over all steps, full causal attention), ``step``
is the cached path. The tests in this file check the stand-ins themselves, so that engine tests can trust them.
"""

from __future__ import annotations

import pytest
import torch

from support.generate import MULTI_PIECES, TinyAttention, TinyGRU, ToyTokenizer


# ------------------------------------------------------------------------------ checks of the stand-ins
@pytest.mark.parametrize("cls", [TinyGRU, TinyAttention])
def test_standin_step_matches_forward_with_padding(cls):
    torch.manual_seed(1)
    model = cls().eval()
    with torch.no_grad():
        a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
        full_a, _ = model(torch.tensor([a]))
        full_b, _ = model(torch.tensor([b]))
        ids = torch.tensor([a, [0, 0, 0] + b])
        valid = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
        logits, state = model.step(ids, model.init_state(2), valid=valid)
        assert torch.allclose(logits[0], full_a[0], atol=1e-5)
        assert torch.allclose(logits[1, 3:], full_b[0], atol=1e-5)
        nxt, _ = model.step(torch.tensor([[4], [4]]), state)
        ref_a, _ = model(torch.tensor([a + [4]]))
        ref_b, _ = model(torch.tensor([b + [4]]))
        assert torch.allclose(nxt[0, 0], ref_a[0, -1], atol=1e-5)
        assert torch.allclose(nxt[1, 0], ref_b[0, -1], atol=1e-5)


def test_toy_tokenizer_roundtrip():
    tok = ToyTokenizer(MULTI_PIECES)
    assert tok.decode(tok.encode("abc cd.ba")) == "abc cd.ba"
