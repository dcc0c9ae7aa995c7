"""``lmforge.sklearn.LanguageModelEstimator`` inside scikit-learn: params, fit/score/predict, the score
against a hand-computed cross-entropy, model selection with process workers, pickling, errors."""

from __future__ import annotations

import contextlib
import math
import pickle
import random

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score

from lmforge.sklearn import LanguageModelEstimator

FAST = dict(d_model=16, num_layers=1, n_head=2, block_size=16, batch_size=8, max_steps=15, learning_rate=3e-2)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subj, verb, obj = ["the cat", "a dog", "my bird"], ["sat on", "ran to", "saw"], ["the mat", "a house", "the tree"]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n)]


TEXTS = sentences(32)


def test_params_follow_scikit_learn_conventions():
    est = LanguageModelEstimator(learning_rate=0.1, num_layers=3)
    params = est.get_params()
    assert params["learning_rate"] == 0.1 and params["num_layers"] == 3 and params["tokenizer"] == "char"
    assert clone(est).get_params() == params
    assert est.set_params(batch_size=64).batch_size == 64
    with pytest.raises(ValueError, match="Invalid parameter"):
        est.set_params(layers=2)


def test_fit_score_predict():
    est = LanguageModelEstimator(**FAST).fit(TEXTS[:24])
    assert est.__sklearn_is_fitted__() and len(est.history_) >= 1
    score = est.score(TEXTS[24:])
    assert math.isfinite(score) and score < 0
    assert score > -math.log(est.tokenizer_.vocab_size)  # it learned something: better than uniform
    out = est.predict(["the cat", "zebra!"])  # unseen characters map to <unk>
    assert out.dtype == object and len(out) == 2 and all(isinstance(o, str) for o in out)
    assert list(out) == list(est.predict(["the cat", "zebra!"]))  # greedy: deterministic
    # a char model: at most block_size // 2 new tokens, each one character (or a never-trained <unk>)
    assert all(len(o.replace("<unk>", "?")) <= 8 for o in out)


def test_score_is_minus_the_mean_next_token_cross_entropy():
    """Reference: one forward pass over [eot, text 1, eot, text 2, eot] (it fits the context), the ids made
    from the tokenizer's vocabulary by hand (unknown characters -> <unk>), log-softmax and gather."""
    est = LanguageModelEstimator(**{**FAST, "block_size": 64}).fit(TEXTS)
    texts = ["the cat saw.", "qq dog!"]  # q and ! were never seen
    vocab = est.tokenizer_.backend.get_vocab()
    eot, unk = vocab["<|endoftext|>"], vocab["<unk>"]
    ids = [eot]
    for t in texts:
        ids += [vocab.get(ch, unk) for ch in t] + [eot]
    assert unk in ids
    x = torch.tensor(ids[:-1])[None]
    y = torch.tensor(ids[1:])
    with torch.no_grad():
        logp = torch.log_softmax(est.model_(x)[0][0].double(), dim=-1)
    reference = -float(logp[torch.arange(len(y)), y].mean())
    assert est.score(texts) == pytest.approx(-reference, rel=1e-5)


def test_fit_is_seeded_and_gives_the_global_generators_back():
    torch.manual_seed(123)
    np.random.seed(7)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = LanguageModelEstimator(**FAST, seed=3).fit(TEXTS)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
    b = LanguageModelEstimator(**FAST, seed=3).fit(TEXTS)
    c = LanguageModelEstimator(**FAST, seed=4).fit(TEXTS)
    assert a.score(TEXTS[:5]) == b.score(TEXTS[:5]) != c.score(TEXTS[:5])


def test_n_threads_applies_during_fit_only():
    before = torch.get_num_threads()
    seen = []
    est = LanguageModelEstimator(**{**FAST, "max_steps": 2}, n_threads=1)
    original = est._threads

    @contextlib.contextmanager
    def spy():
        with original():
            seen.append(torch.get_num_threads())
            yield

    est._threads = spy
    est.fit(TEXTS)
    assert seen == [1] and torch.get_num_threads() == before


def test_grid_search_with_process_workers_picks_the_best_scoring_candidate():
    """A learning rate of 1e-6 cannot learn in 15 steps; 3e-2 can: the search must pick it by score."""
    grid = {"learning_rate": [1e-6, 3e-2], "num_layers": [1]}
    search = GridSearchCV(LanguageModelEstimator(**FAST), grid, cv=2, n_jobs=2).fit(TEXTS)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.all(scores < 0)
    assert search.best_index_ == int(np.argmax(scores))
    assert search.best_params_["learning_rate"] == 3e-2
    assert scores[1] > scores[0] + 0.1
    assert search.best_estimator_.score(TEXTS) == pytest.approx(search.score(TEXTS))

    cv = cross_val_score(LanguageModelEstimator(**FAST), TEXTS, cv=2, n_jobs=2)
    assert cv.shape == (2,) and np.all(np.isfinite(cv)) and np.all(cv < 0)


def test_a_fitted_estimator_pickles():
    est = LanguageModelEstimator(**FAST).fit(TEXTS)
    back = pickle.loads(pickle.dumps(est))
    assert back.score(TEXTS[:6]) == est.score(TEXTS[:6])
    assert list(back.predict(["a dog"])) == list(est.predict(["a dog"]))


def test_errors_name_the_problem():
    est = LanguageModelEstimator(**FAST)
    with pytest.raises(NotFittedError):
        est.score(TEXTS)
    with pytest.raises(ValueError, match="one string"):
        est.fit("the cat sat")
    with pytest.raises(ValueError, match="item 1 is a int"):
        est.fit(["a", 3])
    with pytest.raises(ValueError, match="no text"):
        est.fit([])
    with pytest.raises(ValueError, match="d_model"):
        LanguageModelEstimator(**{**FAST, "n_head": 3}).fit(TEXTS)
    with pytest.raises(ValueError, match="val_fraction"):
        LanguageModelEstimator(**FAST, val_fraction=0.0).fit(TEXTS)


def test_other_families_and_a_single_text():
    for family in ("gru", "rcnn"):
        est = LanguageModelEstimator(**{**FAST, "family": family, "max_steps": 5}).fit(TEXTS)
        assert math.isfinite(est.score(TEXTS[:4]))
    one = LanguageModelEstimator(**{**FAST, "max_steps": 3}).fit([" ".join(TEXTS)])  # cut, not split by text
    assert math.isfinite(one.score(["the cat"]))
