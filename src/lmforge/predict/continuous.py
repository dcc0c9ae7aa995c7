"""Continuous (iteration-level) batching: a decoding scheduler whose batch changes at every step.

:func:`~lmforge.predict.generate` decodes a fixed batch until its last row ends; a request arriving meanwhile
waits for all of it. :class:`ContinuousScheduler` keeps a running batch of rows instead, and each
:meth:`~ContinuousScheduler.step`

1. drops the rows of cancelled requests;
2. prefills waiting requests: at most ``prefill_chunk_size`` prompt tokens (padding included) per step go
   through one ``model.step`` of the group being prefilled, so a long prompt does not stall the rows in flight;
   when a group's prompts are consumed its rows join the running batch (their states are merged into it with
   :func:`~lmforge.predict.decoding.row_states`);
3. picks every running row's next token from the logits of the last forward, each row with its own
   settings: processors built from its :class:`~lmforge.predict.config.GenerationConfig` (repetition penalty,
   no-repeat n-grams, temperature, top-k, top-p), its request's extra processors (called with that row's
   ``input_ids`` (1, T) and ``scores`` (1, V)), greedy or sampled with its request's ``torch.Generator``,
   its eos ids, token budget and stop strings; rows that end are retired and their requests answered;
4. runs ONE ``model.step`` of one token for all the rows still running.

Results equal :func:`~lmforge.predict.generate`'s for the same request alone: the same processors in the
same order, scores summed from the raw log-softmax, the same stop-string and streaming logic
(:class:`~lmforge.predict.streaming.RowText`), and the rows of a seeded request share one generator and draw
together, in row order, as ``generate`` draws for its batch (``num_return_sequences`` > 1 included). Up to
float rounding: a row decodes in a batch padded differently than alone, as in ``generate`` itself. (One
exception: a seeded request of several prompts that ``generate`` would split into context groups, because
their padded length plus budget exceeds a bounded context, draws here in one group, so other samples.)

Cache design: the running batch is ONE model state whose rows are re-batched when rows join or leave (not
every step): joining concatenates the new group's state (left-padded to a common slot count for the
transformer, whose ``key_valid`` mask hides the padding and whose ``pos`` keeps each row's positions);
leaving selects the kept rows and drops leading slots no row uses, so the slot count stays the longest
row's length. Row capacity is ``max_rows`` (the "slots"). Beam search is not scheduled here (its beams of
a prompt are reordered together every step): callers run it with ``generate``; so are families whose state
:func:`~lmforge.predict.decoding.row_states` does not know (see :meth:`ContinuousScheduler.supports`).

Threads: :meth:`~ContinuousScheduler.submit` and :meth:`~ContinuousScheduler.cancel` may be called from any
thread; :meth:`~ContinuousScheduler.step` from one thread at a time. Callbacks run in the stepping thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from lmforge.models.base import DecodingModel
from lmforge.predict.config import GenerationError, GenerationOutput, TokenLogprob
from lmforge.predict.decoding import EOS, FINISH_REASONS, LENGTH, STOP, RowStateError, RowStates, row_states
from lmforge.predict.engine import _check_ids, _model_device, _plan, _resolve_eos, _vocab_size
from lmforge.predict.processors import build_processors
from lmforge.predict.requests import Prefill, Request, RequestTiming, Row
from lmforge.predict.streaming import GenerationTokenizer, RowText, finalize_text

DEFAULT_PREFILL_CHUNK = 256
"""Prompt tokens (padding included) prefilled per decoding step."""


class ContinuousScheduler:
    """Continuous batching over one model (see the module docstring).

    Read-only counters (for ``/metrics``; plain attributes and properties, read from any thread):

    - ``rows_running``: rows in the running batch;
    - ``rows_prefilling``: rows of the group being prefilled;
    - ``rows_waiting``: rows of submitted requests not yet admitted;
    - ``requests_waiting``: those requests;
    - ``slots_used`` / ``slots_total``: row slots of the running batch and prefill group in use / ``max_rows``;
    - ``cache_tokens``: slots of the running state (its longest row, padding of shorter rows included);
    - ``steps``: scheduler steps that did work; ``decode_steps``: batched one-token forwards;
      ``prefill_steps``: prefill chunk forwards; ``tokens_generated``: tokens picked (eos included);
    - ``requests_done``, ``requests_failed``, ``requests_cancelled``;
    - ``timings``: a deque (last 1024) of :class:`RequestTiming`, one per ended request, and ``on_timing``,
      a callback called with each as it ends (in the stepping thread).
    """

    def __init__(
        self,
        model: DecodingModel,
        tokenizer: GenerationTokenizer | None = None,
        *,
        max_rows: int = 32,
        prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
        on_timing: Callable[[RequestTiming], None] | None = None,
    ) -> None:
        if max_rows < 1:
            raise GenerationError(f"max_rows = {max_rows}: must be at least 1")
        if prefill_chunk_size < 1:
            raise GenerationError(f"prefill_chunk_size = {prefill_chunk_size}: must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.prefill_chunk_size = prefill_chunk_size
        self.on_timing = on_timing
        self.device = _model_device(model)
        self.vocab = _vocab_size(model)
        self.max_seq_len: int | None = getattr(model, "max_seq_len", None)
        self.ops: RowStates = row_states(model.init_state(1, self.device))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._prefill: Prefill | None = None
        self._rows: list[Row] = []
        self._state: Any = None
        self._logits: torch.Tensor | None = None
        """(rows, V) next-token logits of the running rows, from the last forward."""
        self.steps = 0
        self.decode_steps = 0
        self.prefill_steps = 0
        self.tokens_generated = 0
        self.requests_done = 0
        self.requests_failed = 0
        self.requests_cancelled = 0
        self.timings: deque[RequestTiming] = deque(maxlen=1024)

    @staticmethod
    def supports(model: DecodingModel) -> bool:
        """Whether the model's family can be batched continuously (its state can be merged row by row)."""
        try:
            row_states(model.init_state(1, _model_device(model)))
        except RowStateError:
            return False
        return True

    # ----------------------------------------------------------------------------------- counters
    @property
    def rows_running(self) -> int:
        return len(self._rows)

    @property
    def rows_prefilling(self) -> int:
        p = self._prefill
        return sum(r.num_rows for r in p.requests) if p is not None else 0

    @property
    def requests_waiting(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._waiting)

    @property
    def rows_waiting(self) -> int:
        with self._lock:
            return sum(r.num_rows for r in (*self._incoming, *self._waiting))

    @property
    def slots_total(self) -> int:
        return self.max_rows

    @property
    def slots_used(self) -> int:
        return self.rows_running + self.rows_prefilling

    @property
    def cache_tokens(self) -> int:
        st = self._state
        return int(getattr(st, "length", 0)) if st is not None else 0

    @property
    def busy(self) -> bool:
        """Rows running or prefilling, or requests waiting."""
        return bool(self._rows or self._prefill is not None or self._incoming or self._waiting)

    # ------------------------------------------------------------------------------------ requests
    def submit(self, req: Request) -> None:
        """Check and queue a request (any thread). Raises :class:`GenerationError` for a bad one."""
        cfg = req.config
        cfg.validate()
        if cfg.num_beams > 1:
            raise GenerationError("beam search (num_beams > 1) is not batched continuously; use generate")
        if cfg.stop_strings and self.tokenizer is None:
            raise GenerationError("GenerationConfig.stop_strings needs a tokenizer to decode the completion")
        if req.logprobs is not None and (req.logprobs < 0 or isinstance(req.logprobs, bool)):
            raise GenerationError(f"logprobs = {req.logprobs}: must be a non-negative integer or None")
        if not req.prompts:
            raise GenerationError("a request needs at least one prompt")
        req.eos = _resolve_eos(cfg, self.tokenizer)
        _check_ids(req.prompts, req.eos, cfg.pad_token_id, self.vocab)
        req.prompts, req.budgets = _plan([list(p) for p in req.prompts], cfg, self.max_seq_len)
        req.procs = build_processors(cfg, num_eos=len(req.eos))
        req.procs.extend(req.processors)
        req.sampling = cfg.do_sample and cfg.temperature > 0
        if req.sampling and cfg.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        req.submitted = time.perf_counter()
        with self._wake:
            req.submit_step = self.steps
            self._incoming.append(req)
            self._wake.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop a request; its rows are freed at the next step (any thread)."""
        req.cancel()
        with self._wake:
            self._wake.notify_all()

    def fail_all(self, err: BaseException) -> None:
        """Fail every request in flight or waiting with ``err`` and empty the batch (the stepping thread)."""
        with self._lock:
            reqs = [*self._incoming, *self._waiting]
            self._incoming.clear()
            self._waiting.clear()
        reqs += [row.req for row in self._rows]
        if self._prefill is not None:
            reqs += self._prefill.requests
        self._rows, self._state, self._logits, self._prefill = [], None, None, None
        for r in dict.fromkeys(reqs):
            self._fail(r, err)

    def cancel_all(self) -> None:
        with self._wake:
            for r in (*self._incoming, *self._waiting):
                r.cancel()
            for row in self._rows:
                row.req.cancel()
            if self._prefill is not None:
                for r in self._prefill.requests:
                    r.cancel()
            self._wake.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (or ``timeout``); True when there is."""
        with self._wake:
            if not self.busy:
                self._wake.wait(timeout)
            return self.busy

    def wake(self) -> None:
        """Wake a thread blocked in :meth:`wait_for_work` (e.g. to stop it)."""
        with self._wake:
            self._wake.notify_all()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until nothing is left (or ``max_steps``); returns the steps taken."""
        n = 0
        while self.busy and (max_steps is None or n < max_steps):
            self.step()
            n += 1
        return n

    # ----------------------------------------------------------------------------------------- step
    def step(self) -> bool:
        """One scheduler step (see the module docstring); returns whether work remains."""
        self._drop_cancelled()
        with self._lock:  # a request submitted from now on is taken by the next step
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            if not self.busy:
                return False
            self.steps += 1
        decoding = self.model.decoding() if hasattr(self.model, "decoding") else contextlib.nullcontext()
        with torch.inference_mode(), decoding:
            self._prefill_chunk()
            if self._rows:
                self._pick_and_forward()
        return self.busy

    # ------------------------------------------------------------------------------------- prefill
    def _prefill_chunk(self) -> None:
        if self._prefill is None:
            self._prefill = self._start_group()
            if self._prefill is None:
                return
        p = self._prefill
        G, L = p.ids.shape
        width = max(1, self.prefill_chunk_size // G)
        a, b = p.offset, min(L, p.offset + width)
        valid = p.valid[:, a:b] if p.valid is not None else None
        if valid is not None and bool(valid.all()):
            valid = None
        try:
            logits, p.state = self.model.step(p.ids[:, a:b], p.state, valid=valid)
        except Exception as err:  # the group's requests fail; the running rows go on
            self._prefill = None
            for r in p.requests:
                self._fail(r, err)
            return
        self.prefill_steps += 1
        p.offset = b
        if b < L:
            return
        self._prefill = None
        self._admit(p, logits[:, -1, :])

    def _start_group(self) -> Prefill | None:
        """The waiting requests (oldest first) whose rows fit next to the running ones, as a prefill group."""
        free = self.max_rows - len(self._rows)
        group: list[Request] = []
        gone: list[Request] = []
        with self._lock:
            while self._waiting:
                r = self._waiting[0]
                if r.cancelled.is_set():
                    gone.append(self._waiting.popleft())
                    continue
                # a request larger than max_rows still runs, alone
                if r.num_rows > free and (group or self._rows):
                    break
                group.append(self._waiting.popleft())
                free -= r.num_rows
        for r in gone:
            self._ended(r, "cancelled")
        if not group:
            return None
        prompts = [p for r in group for p in r.prompts]
        lengths = [len(p) for p in prompts]
        L = max(lengths)
        pad = [
            r.config.pad_token_id if r.config.pad_token_id is not None else (r.eos[0] if r.eos else 0)
            for r in group
            for _ in r.prompts
        ]
        ids = torch.tensor(
            [[pd] * (L - len(p)) + p for p, pd in zip(prompts, pad, strict=True)], dtype=torch.long, device=self.device
        )
        valid = None
        if min(lengths) < L:
            lens = torch.tensor(lengths, device=self.device)
            valid = torch.arange(L, device=self.device)[None, :] >= (L - lens)[:, None]
        state = self.model.init_state(len(prompts), self.device)
        reserve = getattr(self.model, "reserve_state", None)
        if reserve is not None:
            budget = max(b for r in group for b in r.budgets)
            reserve(state, L + budget if self.max_seq_len is None else min(self.max_seq_len, L + budget))
        return Prefill(requests=group, ids=ids, valid=valid, state=state)

    def _admit(self, p: Prefill, logits: torch.Tensor) -> None:
        """The prefilled group's live rows join the running batch (n rows per prompt)."""
        expand: list[int] = []
        new_rows: list[Row] = []
        first = 0
        for r in p.requests:
            n = r.config.num_return_sequences
            if r.cancelled.is_set():
                self._ended(r, "cancelled")
            else:
                for i, prompt in enumerate(r.prompts):
                    for j in range(n):
                        expand.append(first + i)
                        new_rows.append(self._new_row(r, i * n + j, prompt, r.budgets[i]))
            first += len(r.prompts)
        if not new_rows:
            return
        if expand == list(range(logits.size(0))):  # one row per prompt, none cancelled: no copy
            state, new_logits = p.state, logits
        else:
            index = torch.tensor(expand, device=self.device)
            state = self.ops.select(p.state, index)
            new_logits = logits.index_select(0, index)
        if self._state is None:
            self._state, self._logits = state, new_logits
        else:
            assert self._logits is not None
            self._state = self.ops.concat(self._state, state)
            self._logits = torch.cat([self._logits, new_logits], 0)
        self._rows.extend(new_rows)
        for row in new_rows:
            row.req.rows.append(row)

    def _new_row(self, req: Request, index: int, prompt: list[int], budget: int) -> Row:
        row = Row(req=req, index=index, budget=budget, history=list(prompt), tracker=None)  # type: ignore[arg-type]

        def stream(_: int, ids: list[int]) -> None:
            if req.on_tokens is None or req.cancelled.is_set():
                row.sent += len(ids)
                return
            lps = row.lps[row.sent : row.sent + len(ids)] if req.logprobs is not None else None
            row.sent += len(ids)
            req.on_tokens(index, list(ids), lps)

        stops = list(req.config.stop_strings or [])
        row.tracker = RowText(self.tokenizer, stops, stream if req.on_tokens is not None else None, [index])
        return row

    # -------------------------------------------------------------------------------------- decode
    def _pick_and_forward(self) -> None:
        assert self._logits is not None
        rows = self._rows
        scores = self._logits if self._logits.dtype == torch.float32 else self._logits.float()  # (B, V)
        logprobs = scores.log_softmax(dim=-1)
        toks = self._pick(rows, scores)
        toks_t = torch.tensor(toks, device=self.device)
        lp = logprobs.gather(1, toks_t[:, None]).squeeze(1).tolist()
        top: dict[int, tuple[list[int], list[float]]] = {}
        want = [a for a, row in enumerate(rows) if row.req.logprobs]
        if want:
            k = max(rows[a].req.logprobs or 0 for a in want)
            vals, idx = logprobs[torch.tensor(want, device=self.device)].topk(min(k, logprobs.size(1)), dim=-1)
            for a, v, i in zip(want, vals.tolist(), idx.tolist(), strict=True):
                top[a] = (i, v)
        now = time.perf_counter()
        self.tokens_generated += len(rows)
        keep: list[int] = []
        for a, row in enumerate(rows):
            tok, req = toks[a], row.req
            if req.cancelled.is_set():  # failed in _pick: dropped at the next step
                keep.append(a)
                continue
            if req.first_token is None:
                req.first_token, req.first_token_step = now, self.steps
            req.generated += 1
            row.score += lp[a]
            t = row.n_new
            row.n_new += 1
            if tok in req.eos:
                row.reason = EOS
                row.tracker.finish(0)
                self._finish_row(row)
                continue
            if req.logprobs is not None:
                k = req.logprobs
                ids_k, vals_k = top.get(a, ([], []))
                row.lps.append(TokenLogprob(tok, lp[a], list(zip(ids_k[:k], vals_k[:k], strict=True))))
            row.history.append(tok)
            if row.tracker.add(0, tok):
                row.reason = STOP
                self._finish_row(row)
                continue
            if t + 1 >= row.budget:
                row.reason = LENGTH
                row.tracker.finish(0)
                self._finish_row(row)
                continue
            keep.append(a)
        if len(keep) < len(rows):
            self._keep(keep)
        if not self._rows:
            return
        feed = torch.tensor([toks[a] for a in keep], device=self.device)[:, None]
        self._ensure_room()
        try:
            logits, self._state = self.model.step(feed, self._state)
        except Exception as err:  # every running request fails; the scheduler goes on with the next ones
            failed = list(dict.fromkeys(row.req for row in self._rows))
            self._rows, self._state, self._logits = [], None, None
            for r in failed:
                self._fail(r, err)
            return
        self._logits = logits[:, -1, :]
        self.decode_steps += 1

    def _pick(self, rows: list[Row], scores: torch.Tensor) -> list[int]:
        """Each row's next token: its processors on its own (1, V) scores, then argmax, or a draw from
        its request's generator (the rows sharing one draw together, in row order, as ``generate``)."""
        toks: list[int | None] = [None] * len(rows)
        greedy_all: list[int] | None = None
        draws: dict[int, list[tuple[int, torch.Tensor]]] = {}
        gens: dict[int, torch.Tensor | None] = {}
        for a, row in enumerate(rows):
            req = row.req
            if not req.procs and not req.sampling:
                if greedy_all is None:
                    greedy_all = scores.argmax(dim=-1).tolist()
                toks[a] = greedy_all[a]
                continue
            s = scores[a : a + 1]
            if req.cancelled.is_set():  # failed earlier in this step (its rows leave at the next one)
                toks[a] = int(s.argmax(dim=-1))
                continue
            if req.procs:
                if req.procs.needs_history:
                    hist = torch.tensor([row.history], dtype=torch.long, device=self.device)
                else:
                    hist = s.new_empty(0, 0, dtype=torch.long)
                try:
                    s = req.procs(hist, s)
                except Exception as err:  # a processor of this request failed: only it fails
                    self._fail(req, err)
                    req.cancel()
                    toks[a] = int(scores[a].argmax())
                    continue
            if not req.sampling:
                toks[a] = int(s.argmax(dim=-1))
                continue
            key = id(req.generator) if req.generator is not None else 0
            draws.setdefault(key, []).append((a, s))
            gens[key] = req.generator  # type: ignore[assignment]
        for key, items in draws.items():
            probs = torch.softmax(torch.cat([s for _, s in items], 0), dim=-1)
            gen = gens[key]
            drawn = torch.multinomial(probs, 1, generator=gen if isinstance(gen, torch.Generator) else None)
            for (a, _), t in zip(items, drawn.squeeze(1).tolist(), strict=True):
                toks[a] = t
        return [int(t) for t in toks]  # type: ignore[arg-type]

    def _ensure_room(self) -> None:
        """Before a one-token forward: a bounded cache must have a free slot (drop unused leading slots)."""
        C = self.max_seq_len
        if C is not None and self.cache_tokens + 1 > C:
            self._state = self.ops.select(self._state, torch.arange(len(self._rows), device=self.device))

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[a] for a in keep]
        if not keep:
            self._state, self._logits = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._state = self.ops.select(self._state, index)
        assert self._logits is not None
        self._logits = self._logits.index_select(0, index)

    def _drop_cancelled(self) -> None:
        if self._rows:
            keep = [a for a, row in enumerate(self._rows) if not row.req.cancelled.is_set()]
            if len(keep) < len(self._rows):
                gone = {id(row.req): row.req for row in self._rows if row.req.cancelled.is_set()}
                self._keep(keep)
                for r in gone.values():
                    self._ended(r, "cancelled")
        p = self._prefill
        if p is not None and all(r.cancelled.is_set() for r in p.requests):
            self._prefill = None
            for r in p.requests:
                self._ended(r, "cancelled")
        with self._lock:
            if any(r.cancelled.is_set() for r in self._waiting):
                gone_w = [r for r in self._waiting if r.cancelled.is_set()]
                self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
            else:
                gone_w = []
        for r in gone_w:
            self._ended(r, "cancelled")

    # ------------------------------------------------------------------------------------ results
    def _finish_row(self, row: Row) -> None:
        tok = self.tokenizer
        stops = list(row.req.config.stop_strings or [])
        ids, text, stop = row.tracker.result(0)
        if not stop:
            ids, text, _ = finalize_text(tok, stops, ids, text)
        row.ids, row.text = ids, text
        req = row.req
        req.finished += 1
        if req.finished == req.num_rows:
            self._answer(req)

    def _answer(self, req: Request) -> None:
        n = req.config.num_return_sequences
        rows = sorted(req.rows, key=lambda r: r.index)
        out = GenerationOutput(
            sequences=[[r.ids for r in rows[i * n : (i + 1) * n]] for i in range(len(req.prompts))],
            scores=[[r.score for r in rows[i * n : (i + 1) * n]] for i in range(len(req.prompts))],
            finish_reasons=[
                [FINISH_REASONS[r.reason] for r in rows[i * n : (i + 1) * n]] for i in range(len(req.prompts))
            ],
            texts=[[r.text or "" for r in rows[i * n : (i + 1) * n]] for i in range(len(req.prompts))]
            if self.tokenizer is not None
            else None,
        )
        lps = [r.lps[: len(r.ids)] for r in rows] if req.logprobs is not None else None
        if not req.cancelled.is_set() and req.on_done is not None:
            req.on_done(out, lps)
        self._ended(req, "cancelled" if req.cancelled.is_set() else "done")

    def _fail(self, req: Request, err: BaseException) -> None:
        if not req.cancelled.is_set() and req.on_error is not None:
            req.on_error(err)
        self._ended(req, "error")

    def _ended(self, req: Request, outcome: str) -> None:
        if req.ended:
            return
        req.ended = True
        if outcome == "done":
            self.requests_done += 1
        elif outcome == "error":
            self.requests_failed += 1
        else:
            self.requests_cancelled += 1
        now = time.perf_counter()
        timing = RequestTiming(
            ttft_s=None if req.first_token is None else req.first_token - req.submitted,
            e2e_s=now - req.submitted,
            prompt_tokens=sum(len(p) for p in req.prompts),
            completion_tokens=req.generated,
            outcome=outcome,
            steps_to_first_token=None if req.first_token_step is None else req.first_token_step - req.submit_step,
        )
        self.timings.append(timing)
        if self.on_timing is not None:
            self.on_timing(timing)
