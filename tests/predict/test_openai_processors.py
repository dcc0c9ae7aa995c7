"""OpenAI's presence / frequency penalties and logit_bias against a loop-by-loop reference."""

from __future__ import annotations

import torch

from lmforge.predict.processors import LogitBiasProcessor, PresenceFrequencyPenaltyProcessor


def ref_penalties(prompt_width: int, ids: list[list[int]], scores: torch.Tensor, presence: float, frequency: float):
    out = scores.clone()
    for b, row in enumerate(ids):
        generated = [t for t in row[prompt_width:] if t >= 0]
        for j in set(generated):
            c = generated.count(j)
            out[b, j] -= c * frequency + presence
    return out


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    g = torch.Generator().manual_seed(0)
    V = 9
    prompts = [[-1, 2, 2, 3], [4, 4, 4, 4]]  # the prompt's tokens must not count
    proc = PresenceFrequencyPenaltyProcessor(presence=0.7, frequency=0.3)
    ids = torch.tensor(prompts)
    scores = torch.randn(2, V, generator=g)
    assert torch.allclose(proc(ids, scores), scores)  # the first call: nothing generated yet
    for new in ([1, 4], [1, 8], [2, 4], [1, 4]):
        ids = torch.cat([ids, torch.tensor(new)[:, None]], dim=1)
        scores = torch.randn(2, V, generator=g)
        got = proc(ids, scores)
        assert torch.allclose(got, ref_penalties(4, ids.tolist(), scores, 0.7, 0.3), atol=1e-6)
    # row 0 generated token 1 three times: 3 * 0.3 + 0.7 below the raw score
    assert torch.isclose(scores[0, 1] - got[0, 1], torch.tensor(3 * 0.3 + 0.7))


def test_logit_bias_adds_to_the_named_ids_only():
    scores = torch.zeros(2, 6)
    got = LogitBiasProcessor({1: 5.0, 4: -100.0})(torch.zeros(2, 3, dtype=torch.long), scores)
    expected = torch.tensor([[0, 5, 0, 0, -100, 0]] * 2, dtype=torch.float32)
    assert torch.equal(got, expected) and torch.equal(scores, torch.zeros(2, 6))


def test_penalties_per_row_calls_with_different_prompt_lengths():
    """A scheduler that calls once per row with that row's own (1, T) ids (no padding) gets the same
    penalties as the padded batch layout: each row's prompt is what it held when first seen."""
    g = torch.Generator().manual_seed(1)
    V = 7
    prompts = [[1, 2], [3, 3, 3, 3, 5]]
    batch = PresenceFrequencyPenaltyProcessor(presence=0.4, frequency=0.9)
    per_row = PresenceFrequencyPenaltyProcessor(presence=0.4, frequency=0.9)
    rows = [list(p) for p in prompts]
    for step in range(5):
        width = max(len(r) for r in rows)
        padded = torch.tensor([[-1] * (width - len(r)) + r for r in rows])
        scores = torch.randn(2, V, generator=g)
        got = batch(padded, scores)
        for b, r in enumerate(rows):
            alone = per_row(torch.tensor([r]), scores[b : b + 1])
            ref = ref_penalties(len(prompts[b]), [r], scores[b : b + 1], 0.4, 0.9)
            assert torch.allclose(alone, ref, atol=1e-6) and torch.allclose(got[b : b + 1], ref, atol=1e-6)
        for b, r in enumerate(rows):
            r.append([3, 1, 1, 6, 3][step] if b else [2, 2, 0, 1, 2][step])
