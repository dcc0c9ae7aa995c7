"""The HTML report on studies made here (journal storage, fake trials and trial directories), independent of
how the search engine fills them: figures, leaderboard, importances, Pareto front, partial runs, sample, CLI."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.report import ReportError, build_report, param_importances
from lmforge.report.figures import front
from lmforge.runs import save_checkpoint

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTS = {
    "x": FloatDistribution(-1.0, 1.0),
    "c": CategoricalDistribution(["a", "b", "c"]),
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
}
ALL_FIGURES = {"history.png", "learning_curves.png", "importances.png", "pareto.png", "parallel_coordinates.png"}


def open_study(run: Path, directions=("minimize",)):
    storage = JournalStorage(JournalFileBackend(str(run / "study.journal")))
    return optuna.create_study(storage=storage, study_name="fake", directions=list(directions), load_if_exists=True)


def write_metrics(run: Path, rel: str, curve: list[tuple[int, float]]) -> None:
    d = run / rel
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
        for tokens, loss in curve:
            f.write(json.dumps({"step": tokens // 64, "tokens": tokens, "val_loss": loss, "train_loss": loss}) + "\n")
        f.write('{"step": 99, "tokens": 6')  # a line torn by a writer that is still going


def fake_run(tmp: Path, n: int = 12, seed: int = 0, multi: bool = False) -> Path:
    """``n`` trials whose loss depends on ``x`` only (``c`` and ``optim.lr`` are noise): most finished, two
    pruned, one failed; every trial with a learning curve in ``trials/NNNN``."""
    run = tmp / "run"
    run.mkdir()
    study = open_study(run, ("minimize", "minimize") if multi else ("minimize",))
    rng = random.Random(seed)
    for i in range(n):
        params = {"x": rng.uniform(-1, 1), "c": rng.choice("abc"), "optim.lr": 10 ** rng.uniform(-4, -2)}
        final = 2.0 + 3.0 * params["x"] ** 2 + rng.uniform(0, 0.01)
        state = TrialState.FAIL if i == 3 else TrialState.PRUNED if i in (1, 5) else TrialState.COMPLETE
        points = 2 if state == TrialState.PRUNED else 4
        curve = [(64 * 3**k, final + 1.0 / (k + 1) - 0.25) for k in range(points)]
        rel = f"trials/{i:04d}"
        write_metrics(run, rel, curve)
        size = 1000 * (i + 1)
        values = None
        if state == TrialState.COMPLETE:
            values = [min(v for _, v in curve)] + ([float(size)] if multi else [])
        study.add_trial(
            create_trial(
                state=state,
                params=params,
                distributions=DISTS,
                values=values,
                intermediate_values=dict(curve) if not multi else {},
                user_attrs={
                    "run_dir": rel,
                    "params": size,
                    "tokens": curve[-1][0],
                    "family": "transformer",
                    **({"fail_reason": "diverged"} if state == TrialState.FAIL else {}),
                },
            )
        )
    return run


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def leaderboard(html: str) -> list[list[str]]:
    """Rows of the leaderboard table as cell texts (header first)."""
    table = html[html.index("<h2>Leaderboard") :]
    table = table[: table.index("</table>")]
    return [
        [text_of(c).strip() for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)
    ]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------- full run
def test_report_of_a_single_objective_study(tmp_path):
    run = fake_run(tmp_path)
    path = build_report(run, sample=False)
    assert path == run / "report.html"
    html = path.read_text()
    assert {p.name for p in (run / "figures").glob("*.png")} == ALL_FIGURES
    for name in ALL_FIGURES:
        assert f"src='figures/{name}'" in html
        assert (run / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = leaderboard(html)
    header, body = rows[0], rows[1:]
    assert len(body) == 12 and {"trial", "state", "val_loss", "x", "c", "optim.lr"} <= set(header)
    study = open_study(run)
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    first = dict(zip(header, body[0], strict=True))
    assert first["trial"] == str(best.number) and first["state"] == "complete"
    assert f"<tr class='best'><td>1</td><td>{best.number}</td>" in html
    states = [dict(zip(header, r, strict=True))["state"] for r in body]
    assert states.count("complete") == 9 and states.count("pruned") == 2 and states.count("fail") == 1
    text = text_of(html)
    assert f"best trial {best.number}: val_loss = {best.value:.5g}" in text
    assert "fANOVA" in text  # 9 finished trials: the Optuna importance is used
    assert "diverged" in text


def test_importances_find_the_parameter_that_drives_the_loss(tmp_path):
    """The loss of the fake trials is 2 + 3 x^2 (+ tiny noise): x must come first, by a wide margin."""
    run = fake_run(tmp_path, n=24, seed=1)
    imp, method = param_importances(run)
    assert method.startswith("fANOVA")
    assert set(imp) == {"x", "c", "optim.lr"}
    assert max(imp, key=imp.get) == "x" and imp["x"] > 0.6


def test_correlation_ratio_by_hand(tmp_path):
    """With fewer than 4 finished trials the report falls back to eta^2: between-group over total sum of
    squares of the objective (numeric values in quartile bins)."""
    run = tmp_path / "run"
    run.mkdir()
    study = open_study(run)
    for c, x, v in (("a", 0.0, 1.0), ("a", 0.5, 3.0), ("b", 1.0, 5.0)):
        study.add_trial(
            create_trial(params={"c": c, "x": x}, distributions={"c": DISTS["c"], "x": DISTS["x"]}, value=v)
        )
    imp, method = param_importances(run)
    assert method.startswith("correlation ratio")
    # c: groups {1, 3} and {5}; mean 3; between = 2 * (2 - 3)^2 + (5 - 3)^2 = 6; total = 4 + 0 + 4 = 8 -> 0.75
    # x: three distinct values in three bins -> every value its own group -> 1.0; normalized to sum 1
    assert imp["c"] == pytest.approx(0.75 / 1.75) and imp["x"] == pytest.approx(1.0 / 1.75)


def test_pareto_front_of_a_two_objective_study(tmp_path):
    run = fake_run(tmp_path, n=10, multi=True)
    html = build_report(run, sample=False).read_text()
    assert (run / "figures" / "pareto.png").is_file() and "Pareto front" in html
    study = open_study(run, ("minimize", "minimize"))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    # brute force: a trial is on the front when no other is at least as good in both and better in one
    front = {
        t.number
        for t in done
        if not any(all(a <= b for a, b in zip(u.values, t.values, strict=True)) and u.values != t.values for u in done)
    }
    rows = leaderboard(html)
    marked = {
        int(dict(zip(rows[0], r, strict=True))["trial"])
        for r in rows[1:]
        if dict(zip(rows[0], r, strict=True))["pareto"] == "True"
    }
    assert marked == front
    assert "objective 1" in rows[0]


def test_front_helper_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        pts = [(rng.randint(0, 9), rng.randint(0, 9), i) for i in range(12)]
        brute = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in pts)}
        got = front(pts)
        # ties (the same point twice) keep one representative
        assert {p[:2] for p in got} == {p[:2] for p in brute}
        assert [p[0] for p in got] == sorted(p[0] for p in got)


# ------------------------------------------------------------------------------------- partial runs
def test_report_of_a_run_that_just_started(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    study = open_study(run)
    study.add_trial(
        create_trial(
            state=TrialState.RUNNING,
            params={"x": 0.1},
            distributions={"x": DISTS["x"]},
            intermediate_values={64: 3.2},
            user_attrs={"run_dir": "trials/0000"},
        )
    )
    study.add_trial(create_trial(state=TrialState.WAITING))
    html = build_report(run).read_text()
    text = text_of(html)
    assert (run / "figures" / "history.png").is_file()  # the running trial's last report
    assert not (run / "figures" / "importances.png").exists()
    assert "needs at least 2 finished trials" in text and "no learning curve yet" in text
    assert "no trained model yet" in text
    assert [r[2] for r in leaderboard(html)[1:]] == ["running"]


def test_report_without_a_study_uses_the_trial_directories(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, "trials/0000", [(64, 3.0), (128, 2.5)])
    write_metrics(run, "trials/0001", [(64, 3.1)])
    html = build_report(run).read_text()
    assert {p.name for p in (run / "figures").glob("*.png")} == {"learning_curves.png"}
    assert "no study found" in text_of(html)


def test_an_undrawable_figure_replaces_the_stale_one(tmp_path):
    run = fake_run(tmp_path, n=6)
    build_report(run, sample=False)
    assert (run / "figures" / "importances.png").is_file()
    for t in open_study(run).trials:  # the finished trials' learning curves vanish: no curves any more
        (run / t.user_attrs["run_dir"] / "metrics.jsonl").unlink()
    html = build_report(run, sample=False).read_text()
    assert not (run / "figures" / "learning_curves.png").exists()
    assert "no learning curve yet" in text_of(html)


def test_missing_run_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nope")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- sample
def save_tiny_model(where: Path) -> None:
    torch.manual_seed(0)
    tok = char_tokenizer(["the quick brown fox jumps over the lazy dog"])
    cfg = build_config({"data": {"block_size": 32}, "model": {"n_layer": 1, "d_model": 16, "n_head": 2}})
    model = build_model(cfg.model, vocab_size=tok.vocab_size, max_seq_len=32)
    cfg = cfg.model_copy(update={"model": model.config})
    save_checkpoint(where, model=model, config_yaml=cfg.to_yaml(), tokenizer=tok, meta={"step": 0})


def sample_text(html: str) -> str:
    return re.search(r"<pre>(.*?)</pre>", html, re.S).group(1)


def test_sample_from_the_best_model_is_seeded(tmp_path):
    run = fake_run(tmp_path, n=5)
    save_tiny_model(run / "best")
    a = sample_text(build_report(run, sample_tokens=40, seed=3).read_text())
    b = sample_text(build_report(run, sample_tokens=40, seed=3).read_text())
    c = sample_text(build_report(run, sample_tokens=40, seed=4).read_text())
    assert a == b != c
    alphabet = set("the quick brown fox jumps over the lazy dog") | set("<|endoftext|>&;gtl")
    assert set(a) <= alphabet and len(a) >= 40  # 31 tokens fit a 32-token context, eot tokens spelled out
    assert "best: 31 tokens sampled" in text_of(build_report(run, sample_tokens=40, seed=3).read_text())


def test_sample_falls_back_to_the_best_trials_checkpoint(tmp_path):
    run = fake_run(tmp_path, n=5)
    study = open_study(run)
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    save_tiny_model(run / best.user_attrs["run_dir"] / "best")
    html = build_report(run).read_text()
    assert f"{best.user_attrs['run_dir']}/best: " in text_of(html) and "<pre>" in html


def test_cli_rebuilds_the_report(tmp_path, capsys):
    run = fake_run(tmp_path, n=4)
    assert main(["report", str(run), "--no-sample"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert "sampling skipped" in text_of((run / "report.html").read_text())
    assert main(["report", str(run), "--train.seed", "1"]) == 2
