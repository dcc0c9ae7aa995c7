"""Dynamic batching of concurrent requests into the generation engine (no fastapi here).

Requests arrive as :class:`Job` objects on the event loop. The batcher waits a few milliseconds for
more, then runs the jobs that share a batching key (identical decoding settings) as ONE batched
:func:`lmforge.predict.generate` call in a single worker thread, so the event loop keeps serving
while the model computes. Results and streamed tokens go back to each job's asyncio queue.

Batching keys: greedy and beam search batch across requests freely (each prompt decodes independently
of its batch mates). Sampling without a seed shares the global RNG, so it batches too; sampling WITH a
seed never batches, because a batch shares one generator and the seed must give the same completions
whatever else is running.

Cancellation: a job is cancelled (client gone, time limit) by setting its ``cancelled`` event. A
processor the engine calls at every decoding step raises :class:`Cancelled` once every job of the
running batch is cancelled, which stops the engine between two tokens; tokens of a cancelled job in
a batch that goes on are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict import GenerationConfig, GenerationOutput, generate
from lmforge.predict.config import TokenLogprob
from lmforge.predict.processors import LogitsProcessor
from lmforge.serve.protocols import ServedTokenizer

log = logging.getLogger("lmforge.serve")

_seeded = itertools.count()


class Cancelled(Exception):
    """Raised inside the engine to stop a batch whose jobs are all cancelled."""


@dataclass(frozen=True)
class TokenEvent:
    """New token ids of one engine row of a job (``row = prompt * num_return_sequences + sequence``)."""

    row: int
    ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    """One per id when the job asked for ``logprobs``."""


@dataclass(frozen=True)
class DoneEvent:
    """The job's slice of the engine output (per prompt of the job, per returned sequence)."""

    output: GenerationOutput


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


@dataclass(eq=False)
class Job:
    """One request's work: its prompts (token ids) and the engine config they run with."""

    prompts: list[list[int]]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    """Forward :class:`TokenEvent` as tokens are produced (otherwise only the final :class:`DoneEvent`)."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    key: tuple = ()
    processors: list[LogitsProcessor] = field(default_factory=list)
    """Applied to this job's rows only (a job with processors runs in a batch of its own here)."""
    logprobs: int | None = None
    """Top-k alternatives wanted with each token's log-probability (None: no logprobs)."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = batch_key(self.config)
            if self.processors or self.logprobs is not None:
                self.key = (*self.key, "own", next(_seeded))

    @property
    def rows(self) -> int:
        """Rows of the decoding batch this job occupies."""
        return len(self.prompts) * max(self.config.num_return_sequences, self.config.num_beams)

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
        """Hand an event to the job's event loop (safe from the worker thread)."""
        if self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass


def batch_key(config: GenerationConfig) -> tuple:
    """Jobs with equal keys may share one generate call."""
    values = dataclasses.astuple(config)
    sampling = config.do_sample and config.temperature > 0
    if sampling and config.seed is not None:
        return (*values, "seeded", next(_seeded))
    return values


class _CancelCheck:
    """A logits processor that changes nothing and stops the engine once all jobs are cancelled."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if all(j.cancelled.is_set() for j in self.jobs):
            raise Cancelled
        return scores


class Batcher:
    """Collects jobs for ``max_wait_s`` and runs compatible ones together in one worker thread.

    ``max_batch_rows`` bounds the decoding rows of one call (a single larger job still runs alone).
    Start it inside the event loop with :meth:`start`; :meth:`submit` queues a job.
    """

    def __init__(
        self, model: DecodingModel, tokenizer: ServedTokenizer, *, max_wait_s: float = 0.005, max_batch_rows: int = 32
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_wait_s = max_wait_s
        self.max_batch_rows = max_batch_rows
        self._queue: asyncio.Queue[Job] | None = None
        self._pending: deque[Job] = deque()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches_run = 0
        """Generate calls made (for tests and ``/health``)."""
        self.jobs_run = 0
        self.running = False
        """A generate call is in progress."""

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the collecting task on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pending.clear()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-generate")
        self._task = loop.create_task(self._collect(), name="lmforge-batcher")

    async def stop(self) -> None:
        """Cancel queued jobs, stop the task; a running generate call stops at its next token."""
        for job in self._drain():
            job.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def submit(self, job: Job) -> None:
        self.start()
        assert self._queue is not None
        self._queue.put_nowait(job)

    @property
    def queued(self) -> int:
        return len(self._pending) + (self._queue.qsize() if self._queue is not None else 0)

    # --------------------------------------------------------------------------------------- loop
    def _drain(self) -> list[Job]:
        jobs = list(self._pending)
        self._pending.clear()
        while self._queue is not None and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        return jobs

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
                if self.max_wait_s > 0:  # let concurrent requests join this batch
                    await asyncio.sleep(self.max_wait_s)
            while not self._queue.empty():
                self._pending.append(self._queue.get_nowait())
            group = self._take_group()
            if not group:
                continue
            self.running = True
            try:
                await loop.run_in_executor(self._executor, self._run, group)
            except Exception as err:  # e.g. the executor shut down while stopping: fail the jobs, keep serving
                log.exception("batch failed")
                for job in group:
                    job.post(ErrorEvent(err))
            finally:
                self.running = False

    def _take_group(self) -> list[Job]:
        """The oldest live job and the later ones with its key, up to ``max_batch_rows`` rows."""
        while self._pending and self._pending[0].cancelled.is_set():
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        group, rows, rest = [first], first.rows, deque[Job]()
        for job in self._pending:
            if job.cancelled.is_set():
                continue
            if job.key == first.key and rows + job.rows <= self.max_batch_rows:
                group.append(job)
                rows += job.rows
            else:
                rest.append(job)
        self._pending = rest
        return group

    # ------------------------------------------------------------------------------ worker thread
    def _run(self, jobs: list[Job]) -> None:
        """One batched generate call for ``jobs`` (same key); runs in the worker thread."""
        prompts = [p for job in jobs for p in job.prompts]
        R = jobs[0].config.num_return_sequences
        owner: list[tuple[Job, int]] = []  # engine prompt -> (job, the job's first engine prompt)
        start = 0
        for job in jobs:
            owner.extend((job, start) for _ in job.prompts)
            start += len(job.prompts)

        def streamer(row: int, ids: list[int]) -> None:
            job, first = owner[row // R]
            if job.stream and job.logprobs is None and not job.cancelled.is_set():
                job.post(TokenEvent(row - first * R, list(ids)))

        live = [job for job in jobs if not job.cancelled.is_set()]
        if not live:
            return
        self.batches_run += 1
        self.jobs_run += len(live)
        try:
            out = generate(
                self.model,
                prompts,
                jobs[0].config,
                tokenizer=self.tokenizer,
                streamer=streamer,
                processors=[_CancelCheck(jobs), *(jobs[0].processors if len(jobs) == 1 else [])],
            )
        except Cancelled:
            return
        except Exception as err:  # reported to the requests; the server goes on
            if not isinstance(err, ValueError):
                log.exception("generation failed")
            for job in jobs:
                job.post(ErrorEvent(err))
            return
        start = 0
        for job in jobs:
            end = start + len(job.prompts)
            part = GenerationOutput(
                sequences=out.sequences[start:end],
                scores=out.scores[start:end],
                finish_reasons=out.finish_reasons[start:end],
                texts=out.texts[start:end] if out.texts is not None else None,
            )
            if job.logprobs is not None:  # the whole rows at the end, each token with its logprobs
                for p, seqs in enumerate(part.sequences):
                    for s, ids in enumerate(seqs):
                        lps = token_logprobs(self.model, job.prompts[p], ids, job.logprobs)
                        job.post(TokenEvent(p * R + s, list(ids), lps))
            job.post(DoneEvent(part))
            start = end


def token_logprobs(model: DecodingModel, prompt: list[int], ids: list[int], top: int) -> list[TokenLogprob]:
    """Each of ``ids``' log-probability under ``model`` after ``prompt`` (one teacher-forced step over
    prompt + ids: the model's own distribution, before temperature or other processors)."""
    if not ids:
        return []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seq = torch.tensor([[*prompt, *ids[:-1]]], dtype=torch.long, device=device)
    with torch.inference_mode():
        state = model.init_state(1, device)
        logits, _ = model.step(seq, state)
    lp = logits[0, len(prompt) - 1 :].float().log_softmax(-1)  # (len(ids), V)
    chosen = lp.gather(1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()
    out = []
    if top > 0:
        values, indices = lp.topk(min(top, lp.size(-1)), dim=-1)
        alts = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        alts = [[] for _ in ids]
    for t, c, a in zip(ids, chosen, alts, strict=True):
        out.append(TokenLogprob(token_id=t, logprob=c, top=a))
    return out
