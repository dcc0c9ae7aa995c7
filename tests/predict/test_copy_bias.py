"""The decoding-time copy mechanism (``CopyBiasProcessor``, ``GenerationConfig.copy_bias`` /
``source_bias``): against hand-computed boosts, through greedy, beam search and the engine's batching."""

from __future__ import annotations

import pytest
import torch

from lmforge.predict import GenerationConfig, generate
from lmforge.predict.processors import CopyBiasProcessor, build_processors
from support.generate import TinyGRU

PROMPT = [5, 6, 7, 5, 8]


def _bias(proc: CopyBiasProcessor, rows: list[list[int]], V: int = 10) -> list[list[float]]:
    scores = torch.zeros(len(rows), V)
    return proc(torch.tensor(rows), scores).tolist()


def _vec(V: int, **at: float) -> list[float]:
    out = [0.0] * V
    for k, v in at.items():
        out[int(k[1:])] = v
    return out


def test_copy_bias_boosts_what_followed_the_longest_match_hand_computed() -> None:
    proc = CopyBiasProcessor(copy_bias=2.0)
    # the first call holds the prompts (the second left-padded): no completion yet, nothing boosted
    assert _bias(proc, [PROMPT, [-1, -1, 9, 5, 9]]) == [_vec(10), _vec(10)]
    # completion "5": 5 is at prompt positions 0 and 3, followed by 6 and 8 / at position 1, followed by 9
    assert _bias(proc, [PROMPT + [5], [-1, -1, 9, 5, 9, 5]]) == [_vec(10, t6=2.0, t8=2.0), _vec(10, t9=2.0)]
    # "5 6" occurs once (positions 0-1): only 7; the one-token match "6" is shorter and does not count.
    # In the second prompt "5 9" ends the prompt (nothing follows it): the longest match WITH a
    # continuation is "9" at position 0, followed by 5
    assert _bias(proc, [PROMPT + [5, 6], [-1, -1, 9, 5, 9, 5, 9]]) == [_vec(10, t7=2.0), _vec(10, t5=2.0)]
    # "9" is nowhere in the first prompt: nothing
    assert _bias(proc, [PROMPT + [5, 6, 9]]) == [_vec(10)]


def test_source_bias_boosts_every_prompt_token() -> None:
    proc = CopyBiasProcessor(source_bias=0.5)
    assert _bias(proc, [PROMPT]) == [_vec(10, t5=0.5, t6=0.5, t7=0.5, t8=0.5)]
    both = CopyBiasProcessor(copy_bias=1.0, source_bias=0.5)
    _bias(both, [PROMPT])
    assert _bias(both, [PROMPT + [7]]) == [_vec(10, t5=1.5, t6=0.5, t7=0.5, t8=0.5)]


def test_source_half_life_decays_by_first_occurrence_hand_computed() -> None:
    proc = CopyBiasProcessor(source_bias=1.0, source_half_life=2)
    got = _bias(proc, [PROMPT, [-1, -1, 8, 8, 5]])
    # PROMPT 5 6 7 5 8: 5 first at 0 -> 1, 6 at 1 -> 2 ** -0.5, 7 at 2 -> 0.5, 8 at 4 -> 0.25 (5 again at 3:
    # its first occurrence counts); the padded row 8 8 5 counts from its first real token
    want = [_vec(10, t5=1.0, t6=2**-0.5, t7=0.5, t8=0.25), _vec(10, t8=1.0, t5=0.5)]
    assert torch.allclose(torch.tensor(got), torch.tensor(want))


def test_built_from_the_config_only_when_on() -> None:
    assert not [p for p in build_processors(GenerationConfig()) if isinstance(p, CopyBiasProcessor)]
    procs = build_processors(
        GenerationConfig(copy_bias=1.5, source_bias=0.25, source_half_life=7, no_repeat_ngram_size=2)
    )
    copy = [p for p in procs if isinstance(p, CopyBiasProcessor)]
    assert len(copy) == 1 and (copy[0].copy_bias, copy[0].source_bias, copy[0].source_half_life) == (1.5, 0.25, 7)
    assert procs.needs_history


def _flat_model(V: int = 10) -> TinyGRU:
    """A model whose next-token logits are -0.01 * id whatever the input: the biases decide, ties go low."""
    model = TinyGRU(vocab_size=V, sharpness=0.0).eval()
    with torch.no_grad():
        model.head.bias.copy_(-0.01 * torch.arange(V, dtype=torch.float32))
    return model


# hand-computed for PROMPT = 3 4 5 3 6 with copy 1.0, source 0.5: step 0 boosts the prompt's tokens (3 is
# the lowest); "3" is followed by 4 and 6 (4 is lower); "3 4" by 5; "3 4 5" by 3; "3 4 5 3" by 6; "... 6"
# ends the prompt (no continuation): back to the prompt's tokens, 3
COPY_PROMPT = [3, 4, 5, 3, 6]
COPIED = [3, 4, 5, 3, 6, 3]


# over 5 tokens the greedy path earns the most bias at every step, so it is the beams' best too
@pytest.mark.parametrize("beams", [1, 2, 3])
def test_generation_copies_the_source_greedy_and_beam(beams: int) -> None:
    model = _flat_model()
    n = 6 if beams == 1 else 5
    cfg = GenerationConfig(max_new_tokens=n, eos_token_id=[], copy_bias=1.0, source_bias=0.5, num_beams=beams)
    out = generate(model, [COPY_PROMPT, [9, 9] + COPY_PROMPT], cfg)
    # the second prompt (also left-padded in the batch) holds 9 too: step 0 takes 3 all the same
    assert out.sequences[0][0] == COPIED[:n]
    assert out.sequences[1][0] == COPIED[:n]
    plain = generate(model, [COPY_PROMPT], GenerationConfig(max_new_tokens=n, eos_token_id=[], num_beams=beams))
    assert plain.sequences[0][0] == [0] * n  # off: the model's own choice


def test_coverage_does_not_copy_a_span_twice() -> None:
    """Prompt 3 4 5: the copy reaches its end (3 4 5), then the source bias picks 3 again; "3" is followed
    by 4 in the prompt, but that 4 was copied already: no copy bias, so 3 (the lowest id) again and again,
    where a copy without coverage would loop 3 4 5 3 4 5."""
    model = _flat_model()
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=[], copy_bias=1.0, source_bias=0.5)
    assert generate(model, [[3, 4, 5]], cfg).sequences[0][0] == [3, 4, 5, 3, 3, 3]
    proc = CopyBiasProcessor(copy_bias=2.0)
    _bias(proc, [PROMPT])
    assert _bias(proc, [PROMPT + [5]]) == [_vec(10, t6=2.0, t8=2.0)]
    # 8 (position 4) was boosted and produced: copied; "8" now ends the prompt, nothing follows it
    assert _bias(proc, [PROMPT + [5, 8]]) == [_vec(10)]
    # "5" again: position 1 (6) is still open, position 4 (8) was copied
    assert _bias(proc, [PROMPT + [5, 8, 5]]) == [_vec(10, t6=2.0)]


def test_engine_batches_equal_a_row_by_row_reference() -> None:
    model = TinyGRU(seed=1).eval()
    prompts = [[1, 2, 3, 1, 4, 2], [5, 6], [3, 4, 3, 7, 8, 9, 3]]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[], copy_bias=2.0, source_bias=0.5)
    out = generate(model, prompts, cfg)
    changed = False
    for i, p in enumerate(prompts):
        proc = CopyBiasProcessor(2.0, 0.5)
        seq = list(p)
        for _ in range(10):
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0][:, -1].float()
            seq.append(int(proc(torch.tensor([seq]), logits).argmax()))
        assert out.sequences[i] == [seq[len(p) :]]
        plain = generate(model, [p], GenerationConfig(max_new_tokens=10, eos_token_id=[])).sequences[0][0]
        changed |= plain != seq[len(p) :]
    assert changed  # it does something on this model
