"""The report of a real (tiny) ``lmforge tune`` run: written by ``lmforge tune`` after its pipeline, rebuilt
by ``lmforge report``, and extended by regularized evolution on the same study."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge.cli import main
from lmforge.search.context import CONTEXT_ATTR
from lmforge.search.evolution import run_evolution
from lmforge.search.study import create_or_load, open_storage

BASE = ["--data.block_size", "16", "--train.batch_size", "4", "--model.n_layer", "1", "--model.d_model", "16"]
SPACE = """
params:
  model.family: [transformer, gru]
  optim.lr: {float: [1.0e-3, 3.0e-2], log: true}
"""


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.slow
def test_pipeline_report_then_evolution_on_the_same_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house while small bird sang".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))}) + "\n"
            for _ in range(120)
        )
    )
    (tmp_path / "space.yaml").write_text(SPACE)
    run = tmp_path / "run"
    args = ["tune", "--out", str(run), "--data", str(docs), "--space", str(tmp_path / "space.yaml"), "--quiet"]
    args += ["--budget", "6ktok", "--sampler", "random", "--pruner", "none", "--n-trials", "3"]
    assert main([*args, "--trial-tokens", str(8 * 64), "--seed", "1", *BASE]) == 0
    capsys.readouterr()
    summary = json.loads((run / "summary.json").read_text())
    html = (run / "report.html").read_text()  # written by lmforge tune after its pipeline
    text = text_of(html)
    assert f"final model test_loss {summary['best']['test_loss']:.5g}" in text
    assert "pipeline steps search: done, final: done, decode: skipped, evaluate: done" in text
    assert "best: 15 tokens sampled" in text and "<pre>" in html  # from DIR/best; 15 of a 16-token context
    for name in ("history", "learning_curves", "parallel_coordinates"):
        assert (run / "figures" / f"{name}.png").is_file()

    # evolution continues the same study: children of the pipeline's trials
    state = json.loads((run / "pipeline.json").read_text())
    study = create_or_load(open_storage(state["storage"]), state["study_name"], 1)
    ctx = dict(study.user_attrs[CONTEXT_ATTR], n_trials=None, search_tokens=None, deadline_unix=None)
    study.set_user_attr(CONTEXT_ATTR, ctx)
    assert run_evolution(state["study_name"], state["storage"], population=2, sample=2, max_trials=2) == 2
    children = [t for t in study.get_trials() if "parent" in t.user_attrs]
    assert len(children) == 2 and all(t.state.name == "COMPLETE" for t in children)

    assert main(["report", str(run), "--no-sample"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    html = (run / "report.html").read_text()
    assert (run / "figures" / "lineage.png").is_file()
    for c in children:
        assert f"{c.user_attrs['mutation']} of {c.user_attrs['parent']}" in html
