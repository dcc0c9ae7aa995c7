"""Batching of concurrent requests into the generation engine (no fastapi here), two ways.

``continuous`` (the default, :class:`~lmforge.predict.continuous.ContinuousScheduler`): one worker thread
steps a running batch of rows; a request's rows join it at the next decoding step (after their prompt is
prefilled, ``prefill_chunk_size`` tokens per step) and leave it when they end, so a request arriving while
others decode starts within a step instead of waiting for them to finish. Every row keeps its own settings
(sampling, penalties, seed, stop strings, extra processors, logprobs). Beam search, and every request of a
model family whose state cannot be merged row by row (none of lmforge's families; stand-in models), take the
per-request path below in a second worker thread, so they do not block the streams.

``per-request`` (the old path, ``--batching per-request``): requests arrive as :class:`Job` objects on the
event loop; the batcher waits a few milliseconds for more, then runs the jobs that share a batching key
(identical decoding settings) as ONE batched :func:`lmforge.predict.generate` call in a worker thread, so
the event loop keeps serving while the model computes; a request arriving meanwhile waits for that call.
Batching keys: greedy and beam search batch across requests freely (each prompt decodes independently
of its batch mates). Sampling without a seed shares the global RNG, so it batches too; sampling WITH a
seed never batches, because a batch shares one generator and the seed must give the same completions
whatever else is running; nor do jobs with their own processors or logprobs (those run alone through a
private continuous scheduler, which gives per-row processors and logprobs).

Results and streamed tokens go back to each job's asyncio queue. Cancellation: a job is cancelled (client
gone, time limit) by setting its ``cancelled`` event. The continuous scheduler frees its rows at the next
step. On the per-request path a processor the engine calls at every decoding step raises :class:`Cancelled`
once every job of the running batch is cancelled, which stops the engine between two tokens; tokens of a
cancelled job in a batch that goes on are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict import GenerationConfig, GenerationError, GenerationOutput, generate
from lmforge.predict.config import TokenLogprob
from lmforge.predict.continuous import DEFAULT_PREFILL_CHUNK, ContinuousScheduler
from lmforge.predict.processors import LogitsProcessor
from lmforge.predict.requests import Request
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
    """One per id in ``ids`` when the job asked for ``logprobs``."""


@dataclass(frozen=True)
class DoneEvent:
    """The job's slice of the engine output (per prompt of the job, per returned sequence)."""

    output: GenerationOutput
    logprobs: list[list[TokenLogprob]] | None = None
    """Per row (``prompt * n + sequence``), one per returned id, when the job asked for ``logprobs``."""


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
    """Extra logits processors for this job's rows only, each called with one row's ``input_ids`` (1, T)
    and ``scores`` (1, V), after the built-in ones."""
    logprobs: int | None = None
    """k: report each generated token's logprob and its k most likely alternatives (None: off)."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = batch_key(self.config)
            if self.processors or self.logprobs is not None:  # its own processors: never shares a generate call
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


def _deliver(batch: list[tuple[Job, TokenEvent | DoneEvent | ErrorEvent]]) -> None:
    """On the event loop: put each event in its job's queue (unless the job was cancelled meanwhile)."""
    for job, event in batch:
        if not job.cancelled.is_set():
            job.events.put_nowait(event)


class _PerRow:
    """Calls a per-row processor (contract: ``input_ids`` (1, T), ``scores`` (1, V)) on each row of a batch
    (beam search), the row's left padding (negative ids) stripped."""

    def __init__(self, proc: LogitsProcessor) -> None:
        self.proc = proc

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = []
        for b in range(scores.size(0)):
            ids = input_ids[b : b + 1] if input_ids.numel() else input_ids
            if ids.numel():
                ids = ids[:, ids[0] >= 0]
            rows.append(self.proc(ids, scores[b : b + 1]))
        return torch.cat(rows, 0)


Batching = Literal["continuous", "per-request"]


class Batcher:
    """Runs the jobs: continuously batched (default) or per request (see the module docstring).

    ``max_batch_rows`` bounds the decoding rows of the running batch, or of one generate call (a single
    larger job still runs alone). Start it inside the event loop with :meth:`start`; :meth:`submit` queues
    a job. ``scheduler`` is the :class:`~lmforge.predict.continuous.ContinuousScheduler` (None when
    batching per request, or for a model it cannot batch): its counters (rows running / waiting, slots,
    steps, per-request timings) are the ones ``/metrics`` reads.
    """

    def __init__(
        self,
        model: DecodingModel,
        tokenizer: ServedTokenizer,
        *,
        max_wait_s: float = 0.005,
        max_batch_rows: int = 32,
        batching: Batching = "continuous",
        prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_wait_s = max_wait_s
        self.max_batch_rows = max_batch_rows
        self.batching = batching
        self.prefill_chunk_size = prefill_chunk_size
        self.scheduler: ContinuousScheduler | None = None
        if batching == "continuous":
            if ContinuousScheduler.supports(model):
                self.scheduler = ContinuousScheduler(
                    model, tokenizer, max_rows=max_batch_rows, prefill_chunk_size=prefill_chunk_size
                )
            else:
                log.warning("continuous batching cannot merge this model's decoding state: serving per request")
        self._queue: asyncio.Queue[Job] | None = None
        self._pending: deque[Job] = deque()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._outbox: list[tuple[Job, TokenEvent | DoneEvent | ErrorEvent]] = []
        self.batches_run = 0
        """Generate calls made, plus busy periods of the continuous scheduler (for tests and ``/health``)."""
        self.jobs_run = 0
        self._generating = False

    @property
    def running(self) -> bool:
        """A generate call is in progress, or the continuous scheduler has work."""
        return self._generating or (self.scheduler is not None and self.scheduler.busy)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the collecting task on the running event loop, and the scheduler's thread (idempotent)."""
        loop = asyncio.get_running_loop()
        if self.scheduler is not None and (self._worker is None or not self._worker.is_alive()):
            self._stopping.clear()
            self._worker = threading.Thread(target=self._step_loop, name="lmforge-continuous", daemon=True)
            self._worker.start()
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pending.clear()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-generate")
        self._task = loop.create_task(self._collect(), name="lmforge-batcher")

    async def stop(self) -> None:
        """Cancel queued jobs, stop the task; a running generate call stops at its next token, the
        continuous scheduler at its next step."""
        for job in self._drain():
            job.cancel()
        if self.scheduler is not None:
            self.scheduler.cancel_all()
            self._stopping.set()
            self.scheduler.wake()
            worker, self._worker = self._worker, None
            if worker is not None:
                await asyncio.to_thread(worker.join, 10.0)
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
        if self.scheduler is not None and job.config.num_beams == 1:
            self._submit_continuous(job)
            return
        assert self._queue is not None
        self._queue.put_nowait(job)

    @property
    def queued(self) -> int:
        waiting = self.scheduler.requests_waiting if self.scheduler is not None else 0
        return waiting + len(self._pending) + (self._queue.qsize() if self._queue is not None else 0)

    # ------------------------------------------------------------------------------- continuous path
    def _submit_continuous(self, job: Job, scheduler: ContinuousScheduler | None = None) -> None:
        """Hand the job to the scheduler (errors in the request become its :class:`ErrorEvent`)."""
        sch = scheduler or self.scheduler
        assert sch is not None

        def send(event: TokenEvent | DoneEvent | ErrorEvent) -> None:
            if scheduler is not None:  # a private scheduler, stepped by the per-request worker
                job.post(event)
            else:  # the shared scheduler's thread: delivered once per step by _flush
                self._send(event, job)

        def on_tokens(row: int, ids: list[int], logprobs: list[TokenLogprob] | None) -> None:
            if job.stream:
                send(TokenEvent(row, ids, logprobs))

        def on_done(output: GenerationOutput, logprobs: list[list[TokenLogprob]] | None) -> None:
            send(DoneEvent(output, logprobs))

        def on_error(err: BaseException) -> None:
            if not isinstance(err, ValueError):
                log.error("generation failed: %s: %s", type(err).__name__, err)
            send(ErrorEvent(err))

        req = Request(
            prompts=job.prompts,
            config=job.config,
            processors=list(job.processors),
            logprobs=job.logprobs,
            on_tokens=on_tokens,
            on_done=on_done,
            on_error=on_error,
            cancelled=job.cancelled,
        )
        try:
            sch.submit(req)
        except Exception as err:  # a request the engine refuses (400), not a server failure
            job.post(ErrorEvent(err))
            return
        self.jobs_run += 1

    def _send(self, event: TokenEvent | DoneEvent | ErrorEvent, job: Job) -> None:
        """Queue an event of the step in progress (the scheduler's thread); :meth:`_flush` delivers them."""
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand a step's events to the event loop(s) in one call each: one wake-up per step, not per token."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, TokenEvent | DoneEvent | ErrorEvent]]] = {}
        for job, event in items:
            if not job.cancelled.is_set():
                by_loop.setdefault(job.loop, []).append((job, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

    def _step_loop(self) -> None:
        """The scheduler's thread: wait for work, then step until there is none (one busy period)."""
        sch = self.scheduler
        assert sch is not None
        while not self._stopping.is_set():
            if not sch.wait_for_work(timeout=0.5) or self._stopping.is_set():
                continue
            if self.max_wait_s > 0 and not sch.rows_running:  # let concurrent requests join the first step
                self._stopping.wait(self.max_wait_s)
            self.batches_run += 1
            while sch.busy and not self._stopping.is_set():
                try:
                    sch.step()
                except Exception as err:  # a scheduler bug: fail what is in flight, keep serving
                    log.exception("continuous batching step failed")
                    sch.fail_all(err)
                finally:
                    self._flush()
                time.sleep(0)  # let the event loop take the GIL between two steps

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
            self._generating = True
            try:
                await loop.run_in_executor(self._executor, self._run, group)
            except Exception as err:  # e.g. the executor shut down while stopping: fail the jobs, keep serving
                log.exception("batch failed")
                for job in group:
                    job.post(ErrorEvent(err))
            finally:
                self._generating = False

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
        live = [job for job in jobs if not job.cancelled.is_set()]
        if not live:
            return
        first_job = jobs[0]
        if first_job.config.num_beams == 1 and (first_job.processors or first_job.logprobs is not None):
            self._run_alone(first_job)  # its key is its own: the group is this job
            return
        if first_job.logprobs is not None:
            first_job.post(ErrorEvent(GenerationError("logprobs are not available with beam search (num_beams > 1)")))
            return
        prompts = [p for job in jobs for p in job.prompts]
        R = first_job.config.num_return_sequences
        owner: list[tuple[Job, int]] = []  # engine prompt -> (job, the job's first engine prompt)
        start = 0
        for job in jobs:
            owner.extend((job, start) for _ in job.prompts)
            start += len(job.prompts)

        def streamer(row: int, ids: list[int]) -> None:
            job, first = owner[row // R]
            if job.stream and not job.cancelled.is_set():
                job.post(TokenEvent(row - first * R, list(ids)))

        self.batches_run += 1
        self.jobs_run += len(live)
        try:
            out = generate(
                self.model,
                prompts,
                first_job.config,
                tokenizer=self.tokenizer,
                streamer=streamer,
                processors=[_CancelCheck(jobs), *(_PerRow(p) for p in first_job.processors)],
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
            job.post(DoneEvent(part))
            start = end

    def _run_alone(self, job: Job) -> None:
        """A job with its own processors or logprobs, on the per-request path: decoded alone by a private
        continuous scheduler (per-row processors with (1, T) ids, and logprobs, which generate lacks)."""
        if not ContinuousScheduler.supports(self.model):
            job.post(
                ErrorEvent(GenerationError("logprobs and extra processors need a model lmforge can batch row by row"))
            )
            return
        sch = ContinuousScheduler(
            self.model, self.tokenizer, max_rows=max(job.rows, 1), prefill_chunk_size=self.prefill_chunk_size
        )
        self.batches_run += 1
        before = self.jobs_run
        self._submit_continuous(job, sch)
        if self.jobs_run == before:
            return  # refused: the job has its error
        sch.run_until_idle()
