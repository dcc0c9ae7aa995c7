"""Greedy and sampled decoding of a batch of prompts (``num_beams == 1``).

Every row decodes one token per ``step``; a row that ends (eos, its token budget, a stop string) is
recorded and dropped from the model's state with ``reorder_state``, so the remaining rows keep going
without padding. Scores are the sum of the model's unprocessed log-probabilities.
"""

from __future__ import annotations

import torch

from lmforge.predict.decoding import EOS, LENGTH, STOP, DecodeRun, Hypothesis, prefill
from lmforge.predict.streaming import RowText, finalize_text


def pick(run: DecodeRun, scores: torch.Tensor) -> torch.Tensor:
    """(B, V) processed scores -> (B,) next tokens."""
    if run.sampling:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=run.generator).squeeze(1)
    return scores.argmax(dim=-1)


def sample_search(
    run: DecodeRun, prompts: list[list[int]], budgets: list[int], prompt_ids: list[int]
) -> list[Hypothesis]:
    """Greedy or sampled decoding of a batch; returns ``len(prompts) * R`` hypotheses, prompt-major."""
    model, device, R = run.model, run.device, run.config.num_return_sequences
    state, logits, history = prefill(run, prompts, max(budgets))
    if R > 1:  # one prefill per prompt, then R rows each
        expand = torch.arange(len(prompts), device=device).repeat_interleave(R)
        state = model.reorder_state(state, expand)
        logits = logits[expand]
        history = history[expand] if history is not None else None
    B = len(prompts) * R
    row_budget = [b for b in budgets for _ in range(R)]
    max_steps = max(row_budget)
    budget_t = torch.tensor(row_budget, device=device) if min(row_budget) < max_steps else None
    L = history.size(1) if history is not None else 0
    if history is not None:
        history = torch.cat([history, history.new_full((B, max_steps), -1)], dim=1)

    out = torch.full((B, max_steps), run.pad, dtype=torch.long, device=device)  # (B, steps) new tokens
    sum_lp = torch.zeros(B, dtype=torch.float32, device=device)
    n_gen = [0] * B
    reason = [LENGTH] * B
    rows = list(range(B))  # active row -> output row
    rows_t: torch.Tensor | None = None  # the same on the device, once rows were dropped
    stream_rows = [prompt_ids[b // R] * R + b % R for b in range(B)]
    tracker = (
        RowText(run.tokenizer, run.stops, run.streamer, stream_rows)
        if (run.streamer is not None or run.stops)
        else None
    )
    eos_t = torch.tensor(run.eos, device=device) if run.eos else None
    single_eos = run.eos[0] if len(run.eos) == 1 else None

    for t in range(max_steps):
        scores = logits if logits.dtype == torch.float32 else logits.float()  # (A, V)
        logprobs = scores.log_softmax(dim=-1)
        if run.procs:
            scores = run.procs(history[:, : L + t] if history is not None else scores.new_empty(0, 0), scores)
        tok = pick(run, scores)  # (A,)
        lp = logprobs.gather(1, tok[:, None]).squeeze(1)
        if rows_t is None:
            out[:, t] = tok
            sum_lp += lp
        else:
            out[rows_t, t] = tok
            sum_lp.index_add_(0, rows_t, lp)
        if history is not None:
            history[:, L + t] = tok

        is_eos = None
        if eos_t is not None:
            is_eos = tok == single_eos if single_eos is not None else torch.isin(tok, eos_t)
        last = t + 1 == max_steps
        ended: torch.Tensor | None = is_eos
        if budget_t is not None:
            at_budget = budget_t <= t + 1
            ended = at_budget if ended is None else ended | at_budget
        stopped: set[int] = set()
        if tracker is not None:
            eos_list = is_eos.tolist() if is_eos is not None else None
            for a, (b, tk) in enumerate(zip(rows, tok.tolist(), strict=True)):
                if (eos_list is None or not eos_list[a]) and tracker.add(b, tk):
                    stopped.add(a)
        if not (last or stopped or (ended is not None and bool(ended.any()))):
            logits, state = model.step(tok[:, None], state)
            logits = logits[:, -1, :]
            continue

        # some rows end here: record them, then drop them from the batch
        eos_list = is_eos.tolist() if is_eos is not None else [False] * len(rows)
        ended_list = ended.tolist() if ended is not None else [False] * len(rows)
        keep = []
        for a, b in enumerate(rows):
            if eos_list[a]:
                n_gen[b], reason[b] = t, EOS
            elif a in stopped:
                n_gen[b], reason[b] = t + 1, STOP
            elif ended_list[a] or last:
                n_gen[b], reason[b] = t + 1, LENGTH
            else:
                keep.append(a)
                continue
            if tracker is not None and a not in stopped:
                tracker.finish(b)
        if not keep:
            break
        keep_t = torch.tensor(keep, device=device)
        state = model.reorder_state(state, keep_t)
        rows = [rows[a] for a in keep]
        rows_t = torch.tensor(rows, device=device)
        tok = tok[keep_t]
        budget_t = budget_t[keep_t] if budget_t is not None else None
        history = history[keep_t] if history is not None else None
        logits, state = model.step(tok[:, None], state)
        logits = logits[:, -1, :]

    out_list = out.tolist()
    scores_list = sum_lp.tolist()
    hyps = []
    for b in range(B):
        if tracker is not None:
            ids, text, stop = tracker.result(b)
            ids, text, _ = finalize_text(run.tokenizer, run.stops, ids, text) if not stop else (ids, text, True)
        else:
            ids, text, _ = finalize_text(run.tokenizer, run.stops, out_list[b][: n_gen[b]], None)
        hyps.append(Hypothesis(ids=ids, score=scores_list[b], reason=reason[b], text=text))
    return hyps
