"""Beam search over a batch of prompts, as HF transformers (>= 4.50) does it.

N prompts x K beams decode as N * K rows; every step the best K of the candidates that go on are kept
and the model's state is reordered to them (``reorder_state``). A finished hypothesis of ``n`` new tokens
(its end-of-sequence token counted) scores ``sum_logprobs / n ** length_penalty``, and ``early_stopping``
means what it means in HF. With ``do_sample`` the candidates are drawn instead of taken (beam sampling).
"""

from __future__ import annotations

import torch

from lmforge.predict.decoding import EOS, LENGTH, STOP, DecodeRun, Hypothesis, prefill
from lmforge.predict.streaming import finalize_text, find_stop

NEG = -1.0e9
"""An "impossible" beam score (additive, as HF), finite so that sums and sorts stay defined."""


def beam_search(
    run: DecodeRun, prompts: list[list[int]], budgets: list[int], prompt_ids: list[int]
) -> list[Hypothesis]:
    """Beam search over a batch of prompts (N prompts x K beams as rows), as HF transformers does it."""
    cfg, model, device = run.config, run.model, run.device
    N, K, R = len(prompts), cfg.num_beams, cfg.num_return_sequences
    state, logits, prompt_hist = prefill(run, prompts, max(budgets))
    expand = torch.arange(N, device=device).repeat_interleave(K)  # one prefill per prompt, K rows each
    state = model.reorder_state(state, expand)
    logits = logits[expand]
    prompt_hist = prompt_hist[expand] if prompt_hist is not None else None
    V = logits.size(-1)
    max_steps = max(budgets)
    budget_t = torch.tensor(budgets, device=device)  # (N,)
    # candidates per prompt: enough that K of them continue even if the best ones all end in eos
    C = min(max(2, 1 + len(run.eos)) * K, K * V)
    top_k_mask = torch.arange(C, device=device) < K  # (C,)
    eos_t = torch.tensor(run.eos, device=device) if run.eos else None
    lp_pow = cfg.length_penalty

    run_seqs = torch.full((N, K, max_steps), run.pad, dtype=torch.long, device=device)
    run_scores = torch.zeros(N, K, device=device)
    run_scores[:, 1:] = NEG  # all beams start equal: only the first may expand at step 0
    fin_seqs = run_seqs.clone()
    fin_scores = torch.full((N, K), NEG, device=device)
    fin_len = torch.zeros(N, K, dtype=torch.long, device=device)
    fin_reason = torch.zeros(N, K, dtype=torch.long, device=device)
    fin_done = torch.zeros(N, K, dtype=torch.bool, device=device)
    improvable = torch.ones(N, dtype=torch.bool, device=device)
    base = torch.arange(N, device=device)[:, None] * K  # (N, 1) first row of each prompt

    min_budget = min(budgets)
    no_fin = torch.full((N,), NEG, device=device)
    any_full = False  # whether some prompt holds K finished hypotheses (only then can its worst one bar a beam)

    for t in range(max_steps):
        logp = (logits if logits.dtype == torch.float32 else logits.float()).log_softmax(dim=-1)  # (N*K, V)
        if run.procs:
            hist = logp.new_empty(0, 0, dtype=torch.long)
            if prompt_hist is not None:
                hist = torch.cat([prompt_hist, run_seqs[:, :, :t].reshape(N * K, t)], dim=1)
            logp = run.procs(hist, logp)
        acc = (logp.view(N, K, V) + run_scores[:, :, None]).view(N, K * V)
        at_budget = min_budget <= t + 1  # some prompt spends its last token at this step
        fast = not run.stops and not at_budget and not run.sampling
        if fast:
            # when none of the K best candidates ends here (always so without an eos token), they are the K
            # that go on and the finished hypotheses stay as they are: the general path below would give the
            # same result with more ops
            cand_scores, idx = torch.topk(acc, K if eos_t is None else C, dim=-1)  # (N, K or C)
            if eos_t is not None:
                fast = not bool(torch.isin(idx[:, :K] % V, eos_t).any())
        if fast:
            run_scores, idx = cand_scores[:, :K], idx[:, :K]  # (N, K)
            run_beam, tok = idx // V, idx % V
            run_seqs = run_seqs.gather(1, run_beam[:, :, None].expand(N, K, max_steps))
            run_seqs[:, :, t] = tok
        else:
            if run.sampling:
                idx = torch.multinomial(acc.softmax(dim=-1), C, generator=run.generator)
                cand_scores, order = acc.gather(1, idx).sort(dim=-1, descending=True)
                idx = idx.gather(1, order)
            elif run.stops or at_budget:
                cand_scores, idx = torch.topk(acc, C, dim=-1)  # (N, C)
            beam, tok = idx // V, idx % V
            cand_seqs = run_seqs.gather(1, beam[:, :, None].expand(N, C, max_steps))  # (N, C, steps)
            cand_seqs[:, :, t] = tok

            hit_eos = torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(tok, dtype=torch.bool)
            hit = hit_eos | (budget_t <= t + 1)[:, None] if at_budget else hit_eos
            hit_stop = None
            if run.stops:
                tokenizer = run.tokenizer
                assert tokenizer is not None  # stop strings come with a tokenizer (checked by generate)
                texts = [[tokenizer.decode(s) for s in row] for row in cand_seqs[:, :, : t + 1].tolist()]
                hit_stop = (
                    torch.tensor([[find_stop(x, run.stops) >= 0 for x in row] for row in texts], device=device)
                    & ~hit_eos
                )
                hit = hit | hit_stop

            # the best K candidates that go on
            live_scores = cand_scores + hit.float() * NEG
            nxt = torch.topk(live_scores, K, dim=-1).indices  # (N, K)
            run_seqs = cand_seqs.gather(1, nxt[:, :, None].expand(N, K, max_steps))
            run_scores = live_scores.gather(1, nxt)
            run_beam = beam.gather(1, nxt)

            # candidates that end here, among the top K, join the finished hypotheses if they are good enough
            # (not those grown from the placeholder beams of step 0: they only exist when K * V is tiny)
            just = hit & top_k_mask & (cand_scores > NEG / 2)
            if bool(just.any()):
                new_scores = cand_scores / float(t + 1) ** lp_pow
                new_scores = new_scores + (~just | ~improvable[:, None]).float() * NEG
                new_len = torch.full_like(tok, t + 1).masked_fill(hit_eos, t)  # eos is not returned
                new_reason = torch.full_like(tok, LENGTH).masked_fill(hit_eos, EOS)
                if hit_stop is not None:
                    new_reason = new_reason.masked_fill(hit_stop, STOP)
                merged = torch.cat([fin_scores, new_scores], dim=1)
                best = torch.topk(merged, K, dim=-1).indices  # (N, K)
                fin_scores = merged.gather(1, best)
                fin_seqs = torch.cat([fin_seqs, cand_seqs], dim=1).gather(1, best[:, :, None].expand(N, K, max_steps))
                fin_len = torch.cat([fin_len, new_len], dim=1).gather(1, best)
                fin_reason = torch.cat([fin_reason, new_reason], dim=1).gather(1, best)
                fin_done = torch.cat([fin_done, just], dim=1).gather(1, best)
                any_full = bool(fin_done.all(dim=1).any())

        # can a running beam still beat the worst finished one? (HF's heuristics, per prompt) Not asked while
        # nothing has finished and every score is finite (no processor can ban tokens): the answer is yes.
        if not (fast and not any_full and not run.procs):
            gen_len = budget_t if cfg.early_stopping == "never" and lp_pow > 0 else torch.full_like(budget_t, t + 1)
            best_running = run_scores[:, 0] / gen_len.float() ** lp_pow
            worst_fin = torch.where(fin_done.all(dim=1), fin_scores.min(dim=1).values, no_fin) if any_full else no_fin
            improvable = improvable & (best_running > worst_fin)
            if at_budget:
                improvable &= budget_t > t + 1
            if cfg.early_stopping is True and any_full:  # done as soon as K hypotheses finished
                improvable &= ~fin_done.all(dim=1)
            if not bool(improvable.any()):
                break
        if t + 1 == max_steps:
            break
        state = model.reorder_state(state, (base + run_beam).view(-1))
        logits, state = model.step(run_seqs[:, :, t].reshape(N * K, 1), state)
        logits = logits[:, -1, :]

    # a slot never filled (num_return_sequences above the number of possible completions) scores -inf
    seqs, scores = fin_seqs.tolist(), fin_scores.masked_fill(~fin_done, float("-inf")).tolist()
    lens, reasons = fin_len.tolist(), fin_reason.tolist()
    hyps = []
    for n in range(N):
        for r in range(R):
            ids = seqs[n][r][: lens[n][r]]
            ids, text, stopped = finalize_text(run.tokenizer, run.stops, ids, None)
            reason = STOP if stopped else reasons[n][r]
            hyps.append(Hypothesis(ids=ids, score=scores[n][r], reason=reason, text=text))
            if run.streamer is not None:
                run.streamer(prompt_ids[n] * R + r, ids)
    return hyps
