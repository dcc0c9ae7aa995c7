"""Retrieved training examples in task prompts (lmforge.data.retrieval): the index's neighbours against a
hand-made set and scikit-learn's TF-IDF, never the record itself, and one prompt for training and prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.config import TokenizerConfig
from lmforge.data.retrieval import RetrievalIndex, attach, build_index
from lmforge.data.tasks import RETRIEVED, TaskDataError, encode_example, get_task
from lmforge.data.tokenizer import build_tokenizer
from lmforge.predict.tasks import prompt_ids
from lmforge.runs import RetrievalFileError, load_retrieval, save_retrieval
from support.tasks import translation_records

TRAIN = [
    {"source": "open the file", "target": "die Datei öffnen"},
    {"source": "close the window", "target": "das Fenster schließen"},
    {"source": "cannot open file %s", "target": "Datei %s kann nicht geöffnet werden"},
    {"source": "print the version and exit", "target": "Version anzeigen und beenden"},
    {"source": "open the file", "target": "Datei öffnen"},  # the same input as record 0
]


def test_nearest_neighbour_of_a_hand_made_set() -> None:
    index = build_index("translation", TRAIN)
    assert index.neighbours({"source": "close this window"}) == [1]
    assert index.neighbours({"source": "print version, then exit"}) == [3]
    assert index.neighbours({"source": "could not open file"}, k=2) == [2, 0]


def test_never_the_record_itself_nor_its_input() -> None:
    index = build_index("translation", TRAIN)
    for rec in TRAIN:
        for i in index.neighbours(rec, k=3):
            assert TRAIN[i]["source"] != rec["source"]
    # record 0's nearest by text would be itself or its duplicate 4: both are excluded
    assert index.neighbours(TRAIN[0])[0] not in (0, 4)
    assert 0 not in index.neighbours(TRAIN[4], k=4) and 4 not in index.neighbours(TRAIN[0], k=4)


def test_neighbours_match_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    train = translation_records(120, seed=3)
    queries = translation_records(40, seed=4)
    vec = sk.TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)
    a = vec.fit_transform([r["source"] for r in train])
    sims = (vec.transform([r["source"] for r in queries]) @ a.T).toarray()
    index = build_index("translation", train)
    for q, row in zip(queries, sims, strict=True):
        assert np.allclose(index.scores(q["source"]), row)
        row = np.where([r["source"] == q["source"] for r in train], -1.0, row)
        assert row[index.neighbours(q)[0]] == pytest.approx(row.max())


def test_prompt_shows_the_examples_untrained() -> None:
    task = get_task("translation")
    index = build_index(task, TRAIN)
    (rec,) = attach(index, [{"source": "close this window", "target": "dieses Fenster schließen"}])
    assert rec[RETRIEVED] == [TRAIN[1]]
    assert task.format_prompt(rec) == (
        "close the window\nTranslation: das Fenster schließen\n\nclose this window\nTranslation:"
    )
    tok = build_tokenizer(TokenizerConfig(kind="char", vocab_size=256), [r["source"] + r["target"] for r in TRAIN])
    enc = encode_example(task, rec, tok, 512)
    prompt = prompt_ids(task, rec, tok)
    # the prompt of training is the prompt of prediction; only the completion (and <eot>) is trained
    assert enc.ids[: len(prompt)].tolist() == prompt
    assert not enc.trained[: len(prompt)].any() and enc.trained[len(prompt) :].all()
    assert tok.decode(enc.ids[len(prompt) : -1].tolist()) == " dieses Fenster schließen"
    # k = 0 or no index: the plain template
    assert task.format_prompt(attach(None, [rec])[0]) == task.format_prompt(rec)
    assert attach(index, [TRAIN[1]], k=0)[0] == TRAIN[1]


def test_classification_prompt_holds_the_neighbours_label() -> None:
    task = get_task("classification")
    train = [{"text": "a small bird sang", "label": "pos"}, {"text": "the dog ran away", "label": "neg"}]
    (rec,) = attach(build_index(task, train), [{"text": "a bird sang", "label": "pos"}])
    assert task.format_prompt(rec) == "a small bird sang\nLabel: pos\n\na bird sang\nLabel:"


def test_retrieval_file_round_trip(tmp_path: Path) -> None:
    assert load_retrieval(tmp_path) is None
    index = build_index("translation", translation_records(30), k=1)
    (tmp_path / "best").mkdir()
    save_retrieval(tmp_path / "best", index)
    loaded = load_retrieval(tmp_path)  # a run directory: its best/
    assert isinstance(loaded, RetrievalIndex) and loaded.k == 1 and loaded.records == index.records
    queries = translation_records(10, seed=9)
    assert attach(loaded, queries) == attach(index, queries)
    save_retrieval(tmp_path / "best", None)
    assert load_retrieval(tmp_path) is None
    (tmp_path / "retrieval.json").write_text('{"task": "translation", "k": 1, "records": [{"source": 1}]}')
    with pytest.raises(RetrievalFileError, match="retrieval.json"):
        load_retrieval(tmp_path)


def test_refuses_a_task_without_retrieval() -> None:
    with pytest.raises(TaskDataError, match="retrieval"):
        build_index("summarization", [{"document": "a b", "summary": "a"}])


def test_copy_mechanism_copies_from_the_retrieved_target() -> None:
    """The copy mechanism sees the whole prompt: once the completion starts as the example's target does, the
    target's next token is boosted (and nothing from the record's own source, which has no match)."""
    import torch

    from lmforge.predict.processors import CopyBiasProcessor

    task = get_task("translation")
    (rec,) = attach(build_index(task, TRAIN), [{"source": "close this window", "target": "?"}])
    tok = build_tokenizer(TokenizerConfig(kind="char", vocab_size=256), [r["source"] + r["target"] for r in TRAIN])
    prompt = prompt_ids(task, rec, tok)
    done = tok.encode(" das Fenster sch")  # the completion so far: the example target's start
    proc = CopyBiasProcessor(copy_bias=3.0)
    vocab = tok.vocab_size
    for n in range(len(done) + 1):  # one decoding step per token; the first call holds the prompt
        scores = proc(torch.tensor([prompt + done[:n]]), torch.zeros(1, vocab))[0]
    assert torch.nonzero(scores).flatten().tolist() == tok.encode("l")  # "schl" in "das Fenster schließen"
