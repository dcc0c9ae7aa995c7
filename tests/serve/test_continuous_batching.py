"""The serve batcher with continuous batching: jobs (streamed or not, n rows, processors, logprobs) give what
``generate`` gives each alone, whatever runs beside them; a job arriving mid-batch starts at the next step;
cancelled jobs free their rows; beam search runs beside the streams; both batching modes over HTTP."""

from __future__ import annotations

import asyncio
import string
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmforge.config import build_config
from lmforge.data.tokenizer import char_tokenizer
from lmforge.models import build_model
from lmforge.predict import GenerationConfig, generate
from lmforge.serve.batcher import Batcher, DoneEvent, ErrorEvent, Job, TokenEvent
from support.serve import SlowModel, make_checkpoint, wait_until

TOK = char_tokenizer([string.printable])


def make_model(family: str):
    torch.manual_seed(0)
    mc = {"family": family, "n_layer": 2, "d_model": 32, "vocab_size": TOK.vocab_size, "init_std": 0.3}
    if family == "transformer":
        mc.update(n_head=2, max_seq_len=64)
    cfg = build_config({"model": mc, "data": {"block_size": 64}, "tokenizer": {"kind": "char"}})
    return build_model(cfg.model).eval()


@pytest.fixture(scope="module", params=["transformer", "lstm"])
def model(request):
    return make_model(request.param)


async def collect(job: Job, timeout: float = 120.0) -> tuple[dict[int, list[int]], dict[int, list], object]:
    """Streamed ids and logprobs per row, then the final event."""
    streamed: dict[int, list[int]] = {}
    lps: dict[int, list] = {}
    while True:
        ev = await asyncio.wait_for(job.events.get(), timeout)
        if isinstance(ev, TokenEvent):
            streamed.setdefault(ev.row, []).extend(ev.ids)
            if ev.logprobs is not None:
                assert len(ev.logprobs) == len(ev.ids)
                lps.setdefault(ev.row, []).extend(ev.logprobs)
        else:
            return streamed, lps, ev


def job(prompts, config, stream=True, **kw) -> Job:
    return Job(prompts=prompts, config=config, loop=asyncio.get_running_loop(), stream=stream, **kw)


def test_jobs_equal_generate_alone_with_mixed_settings(model):
    specs = [
        ([TOK.encode("Hello there")], GenerationConfig(max_new_tokens=12, eos_token_id=[])),
        ([TOK.encode("a"), TOK.encode("xyz")], GenerationConfig(max_new_tokens=9, eos_token_id=[])),
        (
            [TOK.encode("The fox")],
            GenerationConfig(
                max_new_tokens=10, do_sample=True, seed=5, top_k=4, num_return_sequences=3, eos_token_id=[]
            ),
        ),
        ([TOK.encode("Once")], GenerationConfig(max_new_tokens=15, repetition_penalty=1.4, eos_token_id=[])),
    ]
    refs = [generate(model, p, c, tokenizer=TOK) for p, c in specs]

    async def main():
        b = Batcher(model, TOK, max_wait_s=0.0, max_batch_rows=16)
        b.start()
        assert b.scheduler is not None
        try:
            jobs = []
            for i, (p, c) in enumerate(specs):
                jobs.append(job(p, c, stream=i % 2 == 0))
                b.submit(jobs[-1])
                await asyncio.sleep(0.01)  # later jobs join a running batch
            return [await collect(j) for j in jobs], b.scheduler.steps
        finally:
            await b.stop()

    results, steps = asyncio.run(main())
    for (streamed, _, done), ref, (_, c) in zip(results, refs, specs, strict=True):
        assert isinstance(done, DoneEvent), done
        assert done.output.sequences == ref.sequences and done.output.texts == ref.texts
        if streamed:
            n = c.num_return_sequences
            assert streamed == {r: ref.sequences[r // n][r % n] for r in range(len(ref.sequences) * n)}
    assert steps > 0


def test_job_arriving_mid_batch_starts_at_the_next_step(model):
    async def main():
        b = Batcher(SlowModel(model, 0.03), TOK, max_wait_s=0.0)
        b.start()
        sch = b.scheduler
        assert sch is not None
        try:
            long = [job([TOK.encode("Hello")], GenerationConfig(max_new_tokens=55, eos_token_id=[])) for _ in range(4)]
            for j in long:
                b.submit(j)
            assert await asyncio.to_thread(wait_until, lambda: sch.rows_running == 4, 30)
            late = job([TOK.encode("late")], GenerationConfig(max_new_tokens=3, eos_token_id=[]))
            b.submit(late)
            _, _, done = await collect(late)
            assert isinstance(done, DoneEvent)
            assert sch.rows_running == 4  # the long ones are still decoding: it did not wait for them
            for j in long:
                j.cancel()
            return list(sch.timings)
        finally:
            await b.stop()

    timings = asyncio.run(main())
    done = [t for t in timings if t.outcome == "done"]
    assert len(done) == 1 and done[0].steps_to_first_token == 1 and done[0].completion_tokens == 3


def test_cancelled_job_frees_its_rows_and_logprobs_and_processors_reach_the_rows(model):
    banned = generate(model, [TOK.encode("abc")], GenerationConfig(max_new_tokens=1, eos_token_id=[])).sequences[0][0][
        0
    ]

    def ban(input_ids, scores):
        assert input_ids.size(0) == 1 and scores.size(0) == 1
        return scores.index_fill(1, torch.tensor([banned]), float("-inf"))

    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    ref = generate(model, [TOK.encode("abc")], cfg, processors=[ban]).sequences

    async def main():
        b = Batcher(SlowModel(model, 0.05), TOK, max_wait_s=0.0, max_batch_rows=2)
        b.start()
        sch = b.scheduler
        assert sch is not None
        try:
            hog = job([TOK.encode("x"), TOK.encode("y")], GenerationConfig(max_new_tokens=60, eos_token_id=[]))
            b.submit(hog)
            assert await asyncio.to_thread(wait_until, lambda: sch.rows_running == 2, 30)
            mine = job([TOK.encode("abc")], cfg, processors=[ban], logprobs=2)
            b.submit(mine)
            await asyncio.to_thread(wait_until, lambda: sch.steps > 3, 30)
            assert sch.rows_running == 2 and sch.rows_waiting == 1  # no free slot yet
            hog.cancel()
            streamed, lps, done = await collect(mine)
            assert await asyncio.to_thread(wait_until, lambda: not b.running, 10)
            return streamed, lps, done
        finally:
            await b.stop()

    streamed, lps, done = asyncio.run(main())
    assert isinstance(done, DoneEvent) and done.output.sequences == ref and banned not in ref[0][0]
    assert streamed[0] == ref[0][0]
    assert done.logprobs is not None and [lp.token_id for lp in done.logprobs[0]] == ref[0][0]
    assert lps[0] == done.logprobs[0] and all(len(lp.top) == 2 for lp in lps[0])


def test_beam_search_runs_beside_the_streams(model):
    slow = SlowModel(model, 0.03)
    beam_cfg = GenerationConfig(max_new_tokens=40, num_beams=3, eos_token_id=[])
    beam_ref = generate(model, [TOK.encode("beam")], beam_cfg).sequences

    async def main():
        b = Batcher(slow, TOK, max_wait_s=0.0)
        b.start()
        try:
            beam = job([TOK.encode("beam")], beam_cfg, stream=False)
            b.submit(beam)
            assert await asyncio.to_thread(wait_until, lambda: b._generating, 10)
            quick = job([TOK.encode("quick")], GenerationConfig(max_new_tokens=3, eos_token_id=[]))
            b.submit(quick)
            _, _, qdone = await collect(quick)
            beam_still_running = b._generating
            _, _, bdone = await collect(beam)
            return qdone, beam_still_running, bdone
        finally:
            await b.stop()

    qdone, beam_still_running, bdone = asyncio.run(main())
    assert isinstance(qdone, DoneEvent) and beam_still_running  # the stream finished while the beam search ran
    assert isinstance(bdone, DoneEvent) and bdone.output.sequences == beam_ref


def test_refused_job_gets_an_error_event(model):
    async def main():
        b = Batcher(model, TOK, max_wait_s=0.0)
        b.start()
        try:
            bad = job([[10**6]], GenerationConfig(max_new_tokens=3))
            b.submit(bad)
            return (await collect(bad))[2]
        finally:
            await b.stop()

    ev = asyncio.run(main())
    assert isinstance(ev, ErrorEvent) and "vocabulary" in str(ev.error)


# ------------------------------------------------------------------------------------- over HTTP
@pytest.mark.parametrize("batching", ["continuous", "per-request"])
def test_http_concurrent_streams_equal_generate_in_both_modes(tmp_path, batching):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.runs import load_model
    from lmforge.serve.app import load_app

    ckpt = make_checkpoint(tmp_path / "tiny")
    ref_model, tok, _ = load_model(ckpt)
    prompts = ["a", "Hello world", "xyz", "The quick brown fox", "0123", "q"]
    app = load_app(ckpt, model_name="tiny", batching=batching, prefill_chunk_size=8)
    with TestClient(app) as c:
        server = app.state.server
        assert (server.batcher.scheduler is not None) == (batching == "continuous")

        def ask(i: int) -> str:
            body = {"prompt": prompts[i], "max_tokens": 6 + 3 * i, "temperature": 0, "stream": i % 2 == 0}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if not body["stream"]:
                return r.json()["choices"][0]["text"]
            import json

            chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
            return "".join(ch["choices"][0]["text"] for ch in chunks)

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, range(len(prompts))))
        assert c.get("/health").json()["requests_generated"] == len(prompts)
    ref_model.eval()
    from lmforge.predict import generate_text

    want = [
        generate_text(ref_model, tok, [p], GenerationConfig(max_new_tokens=6 + 3 * i))[0][0]
        for i, p in enumerate(prompts)
    ]
    assert got == want
