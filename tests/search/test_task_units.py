"""The pieces of ``lmforge tune --task``: the record split, the fine-tune defaults, the decoding search."""

from __future__ import annotations

import pytest

from lmforge.config import RunConfig, build_config
from lmforge.data.tasks import TaskDataError, get_task, split_records
from lmforge.data.tokenizer import char_tokenizer
from lmforge.search import decode_search as D
from lmforge.search.finetune import PRETRAINED_START, WARMUP_FRACTION, finetune_config, set_schedule_length
from lmforge.search.task_plan import plan_tokenizers


def test_split_is_a_seeded_partition() -> None:
    a, b, c = split_records(50, 0), split_records(50, 0), split_records(50, 1)
    assert a == b and a != c
    idx = a["train"] + a["val"] + a["test"]
    assert sorted(idx) == list(range(50))
    assert (len(a["val"]), len(a["test"])) == (5, 5)
    with pytest.raises(TaskDataError, match="too few"):
        split_records(7, 0)


def test_finetune_config_has_pretrained_start_defaults_and_flags_win() -> None:
    model_cfg = RunConfig()
    raw = finetune_config(model_cfg, None, [], "x.jsonl")
    raw["train"] = {"max_steps": None, "max_epochs": 2, "batch_size": 4}
    assert set_schedule_length(raw, 100) == 50
    cfg = build_config(raw)
    assert cfg.optim.lr == PRETRAINED_START["optim"]["lr"] == 5e-5
    assert cfg.optim.weight_decay == 0.0 and cfg.schedule.name == "linear"
    assert cfg.schedule.warmup_steps == int(WARMUP_FRACTION * 50)
    raw = finetune_config(model_cfg, None, ["--optim.lr", "1e-3", "--schedule.name", "cosine"], "x.jsonl")
    assert build_config(raw).optim.lr == 1e-3 and build_config(raw).schedule.name == "cosine"
    assert build_config(raw).optim.weight_decay == 0.0


def test_plan_tokenizers_bpe_and_char_for_real_text_char_for_tiny() -> None:
    assert [c["kind"] for c in plan_tokenizers(["tiny text"])] == ["char"]
    big = plan_tokenizers(["word " * 100_000])
    assert [c["kind"] for c in big] == ["bpe", "char"]  # BPE first: the search's first trial starts from it
    assert 512 <= big[0]["vocab_size"] <= 4096
    assert big[0]["weight"] > big[1]["weight"]  # BPE gets the larger part of the pretraining time


def test_length_budgets_from_target_lengths() -> None:
    tok = char_tokenizer(["abcdefghij "])
    task = get_task("summarization")
    recs = [{"document": "x", "summary": "a" * n} for n in range(1, 11)]  # " " + n chars: 2..11 tokens
    budgets = D.length_budgets(task, recs, tok)
    # 90th percentile of 2..11 is 10.1 -> 11, the median 6.5 -> 7, the longest 11; plus the margin each
    assert budgets == [11 + D.LENGTH_MARGIN, 7 + D.LENGTH_MARGIN]
    # one word of n + 1 tokens each (its space counted): 65 tokens for 10 words, 3 words ~ 19.5 -> 20
    assert D.repeat_ngram_size(task, recs, tok) == 20



def test_decode_candidates_are_a_coordinate_search() -> None:
    tried: dict = {}
    gen = D.candidates([5, 9], tried)

    def score(s: dict) -> float:  # a made-up metric: copying helps, so do blocking repeats and the longer budget
        return (
            float(s["no_repeat_ngram_size"] == 3) + (s["max_new_tokens"] == 9) * 0.5 - (s["num_beams"] > 1)
            + (s["copy_bias"] == 2.0) * 0.25 + (s["source_bias"] == 1.0) * 0.1 + (s["source_half_life"] == 32) * 0.05
        )

    first = next(gen)
    assert first["num_beams"] == 1 and first["max_new_tokens"] == 5 and first["no_repeat_ngram_size"] == 0
    assert first["copy_bias"] == first["source_bias"] == 0.0  # the copy mechanism off first
    tried[D.settings_key(first)] = {"settings": first, "score": score(first)}
    for s in gen:
        assert D.settings_key(s) not in tried  # nothing twice (a resumed search skips what it tried)
        tried[D.settings_key(s)] = {"settings": s, "score": score(s)}
    best = D.best_settings(tried)
    assert best is not None
    assert best["no_repeat_ngram_size"] == 3 and best["max_new_tokens"] == 9 and best["num_beams"] == 1
    assert best["copy_bias"] == 2.0 and best["source_bias"] == 1.0 and best["source_half_life"] == 32
    assert {v["settings"]["copy_bias"] for v in tried.values()} == set(D.COPY_BIASES)
    assert any(v["settings"]["num_beams"] == 4 for v in tried.values())
    # each later stage varied the best of the earlier ones: every 9-token candidate blocks repeats
    assert all(v["settings"]["no_repeat_ngram_size"] == 3 for v in tried.values() if v["settings"]["max_new_tokens"] == 9)


def test_rerank_takes_the_best_trial_of_each_retrieval_setting() -> None:
    """Retrieval is chosen by the task metric: the best trial (by loss) of each setting is re-ranked even when
    the other setting fills the top of the loss ranking."""
    import optuna

    from lmforge.search.task_search import RERANK_TOP, rerank_candidates

    def trial(number: int, k: int, loss: float) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(
            params={"retrieval": k},
            distributions={"retrieval": optuna.distributions.CategoricalDistribution([0, 1])},
            value=loss,
        )
        t.number = number
        return t

    complete = [trial(0, 0, 1.0), trial(1, 0, 1.1), trial(2, 0, 1.2), trial(3, 0, 1.3), trial(4, 1, 1.4)]
    must, rest = rerank_candidates(complete)
    assert [t.number for t in must] == [0, 4]
    assert [t.number for t in rest] == [1, 2][: RERANK_TOP - 1]
    # a task without retrieval (no such parameter): the best trial, then the next of the top
    plain = [optuna.trial.create_trial(params={}, distributions={}, value=v) for v in (1.0, 2.0)]
    must, rest = rerank_candidates(plain)
    assert must == plain[:1] and rest == plain[1:]
