"""The one training loop (layer 3): pretraining, fine-tuning, search trials and continuation all call
:func:`train`.

The loop knows nothing about search: callers pass :class:`Callback` objects whose ``on_eval`` may stop
training (a pruner), and read the result. Everything needed to continue bit for bit (weights,
optimizer, schedule, sampler position, RNG states, counters) goes into every checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import IGNORE_INDEX, LmforgeError, RunConfig
from lmforge.data import BlockSampler, PreparedData, Tokenizer, eval_batches, full_batches, prepare_data
from lmforge.models import build_model
from lmforge.models.base import LanguageModel
from lmforge.runs import (
    CheckpointError,
    append_metrics,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_best,
    save_checkpoint,
    truncate_metrics,
    write_config,
)
from lmforge.train.distributed import Distributed, RankSlice
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import build_scheduler


class TrainingError(LmforgeError):
    """Training cannot go on (diverged, nothing to train on, run directory in the way...)."""


@dataclass
class LoopState:
    """What callbacks may read while training runs."""

    config: RunConfig
    out_dir: Path
    model: LanguageModel
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_record: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    """Data-parallel rank of this process (callbacks run on every rank; write files only on rank 0)."""
    world_size: int = 1


class Callback:
    """Hooks of the loop. ``on_eval`` returning True stops training (reason ``callback``)."""

    def on_train_start(self, state: LoopState) -> None:  # noqa: B027 (optional hook)
        pass

    def on_eval(self, state: LoopState, record: dict[str, Any]) -> bool:
        return False

    def on_train_end(self, state: LoopState, result: TrainResult) -> None:  # noqa: B027
        pass


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    best_val_loss: float
    best_step: int
    final_val_loss: float
    stop_reason: str
    num_params: int
    history: list[dict[str, Any]]


# ------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA by default; fp32 on CPU."""
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dt = torch.float16 if dtype == "float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dt)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device, autocast: contextlib.AbstractContextManager[Any] | None = None,
                  dist: Distributed | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over ``batches`` -> (loss, counted tokens).

    With ``dist`` (data-parallel), each rank scores its share of every batch's rows and the sums are
    all-reduced: every rank returns the loss over all the rows.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, y = dist.shard(batch) if dist is not None else batch
        n = int((y != IGNORE_INDEX).sum())
        if n == 0:  # nothing to score (an empty shard, all targets masked): the mean loss would be NaN
            continue
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        total += float(loss) * n
        count += n
    model.train(was_training)
    if dist is not None:
        total, count_f = dist.sum([total, float(count)])
        count = int(count_f)
    if count == 0:
        raise TrainingError("validation set has no tokens to score")
    return total / count, count


class _Terminate:
    """SIGTERM -> finish the current step, save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Terminate:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _progress(total: int | None, enabled: bool, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, leave=True)


# ------------------------------------------------------------------------------------------ loop
def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    data: PreparedData | None = None,
    model: LanguageModel | None = None,
    tokenizer: Tokenizer | None = None,
    callbacks: Sequence[Callback] = (),
    sampler: Any = None,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train ``config`` into ``out_dir`` and return a summary.

    ``model``/``tokenizer`` start from given weights (fine-tuning, a mutated child); otherwise a fresh
    model is built. ``data`` skips data preparation (search trials share it). ``config.train.resume``
    decides what happens when ``out_dir`` already holds checkpoints.

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, ``WORLD_SIZE > 1``) every process calls
    this and they train one model with DistributedDataParallel (see :mod:`lmforge.train.distributed`):
    ``train.batch_size`` is per process, rank 0 alone writes the run directory and prints.
    """
    # >>> data-parallel: join the process group for the whole run (a no-op stand-in outside torchrun)
    with Distributed.from_env(resolve_device(config.train.device)) as dist:
        return _train(config, out_dir, data=data, model=model, tokenizer=tokenizer, callbacks=callbacks,
                      sampler=sampler, val_batches=val_batches, verbose=verbose, dist=dist)
    # <<< data-parallel


def _train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    data: PreparedData | None,
    model: LanguageModel | None,
    tokenizer: Tokenizer | None,
    callbacks: Sequence[Callback],
    sampler: Any,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None,
    verbose: bool,
    dist: Distributed,
) -> TrainResult:
    cfg = config
    tc = cfg.train
    out = Path(out_dir)
    log = print if verbose and dist.is_main else (lambda *a, **k: None)
    if dist.enabled and sampler is not None:
        raise TrainingError("data-parallel training (torchrun) with an injected sampler is not supported; "
                            "run task fine-tuning in a single process")
    # >>> data-parallel: rank 0 repairs and reads the run directory and prepares (caches) the data first;
    # the other ranks wait here, then read what it left instead of racing it (released after prepare_data)
    if not dist.is_main:
        dist.barrier()
    # <<< data-parallel

    # -- resume policy first: never overwrite a run by accident ----------------------------------
    resume_ckpt = None
    if tc.resume == "never":
        if out.exists() and list_checkpoints(out):
            raise TrainingError(
                f"{out} already holds checkpoints; pass --train.resume auto to continue that run, or choose another --out"
            )
    elif tc.resume == "auto":
        resume_ckpt = latest_checkpoint(out) if out.exists() else None
    else:
        try:
            resume_ckpt = load_checkpoint(Path(tc.resume))
        except (CheckpointError, FileNotFoundError, OSError) as err:
            raise TrainingError(f"train.resume = {tc.resume!r}: {err}") from None

    # every rank gets its own dropout stream; rank 0 is seeded as a single process would be
    seed_everything(tc.seed + dist.rank, tc.deterministic)
    device = dist.device

    # -- data and tokenizer ---------------------------------------------------------------------
    if resume_ckpt is not None and tokenizer is None:
        tokenizer = Tokenizer.load(resume_ckpt.path)
    # >>> task fine-tuning (lmforge.data.tasks): an injected sampler and val_batches replace the LM token
    # streams, so no corpus is prepared; empty stand-in streams keep the rest of the loop unchanged.
    injected = data is None and sampler is not None and val_batches is not None
    if injected:
        if tokenizer is None:
            raise TrainingError("training from an injected sampler needs its tokenizer")
        if cfg.optim.name == "gd":
            raise TrainingError("optim.name 'gd' (full-batch) needs a language-modelling corpus, not task examples")
        empty = np.zeros(0, dtype=np.int64)
        data = PreparedData(train=empty, val=empty, tokenizer=tokenizer, stats={})
    # <<< task fine-tuning
    if data is None:
        data = prepare_data(cfg, tokenizer)
    if dist.is_main:
        dist.barrier()  # data-parallel: the token cache is written, let the other ranks read it
    tokenizer = data.tokenizer
    block = cfg.data.block_size
    for name, arr in (("training", data.train), ("validation", data.val)):
        if len(arr) < block + 1 and not injected:
            raise TrainingError(
                f"the {name} split has {len(arr)} tokens, fewer than one block of {block}+1; "
                "use more data or a smaller data.block_size"
            )

    # -- model ------------------------------------------------------------------------------------
    if model is None:
        model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    elif model.config.vocab_size is not None and model.config.vocab_size < tokenizer.vocab_size:
        raise TrainingError(
            f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    if model.max_seq_len is not None and block > model.max_seq_len:
        raise TrainingError(f"data.block_size ({block}) exceeds the model's context ({model.max_seq_len})")
    cfg = cfg.model_copy(update={"model": model.config})
    config_yaml = cfg.to_yaml()
    model.to(device)
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt.state_dict, strict=True)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, config_yaml)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.total_steps, cfg.optim.lr, tc.max_time)
    # data-parallel: the sampler draws the global batch of batch_size * world_size blocks (what one process
    # with that batch size would draw) and this rank keeps its rows; the evaluation batches are global too
    global_batch = tc.batch_size * dist.world_size
    if sampler is None:
        sampler = BlockSampler(data.train, block, global_batch, seed=tc.seed)
        if dist.enabled:
            sampler = RankSlice(sampler, dist.rank, dist.world_size)
    if val_batches is None:
        val_batches = eval_batches(data.val, block, global_batch, tc.eval_batches)
    val_bytes_per_token = (data.stats.get("val_bytes") or 0) / max(1, data.stats.get("val_tokens") or len(data.val))
    autocast = autocast_context(device, tc.dtype)
    scaler = torch.amp.GradScaler(device.type) if (tc.dtype == "float16" and device.type == "cuda") else None
    gd = cfg.optim.name == "gd"
    # >>> data-parallel: `ddp` is the DistributedDataParallel wrapper (the model itself in one process).
    # Evaluation and full-batch GD call the bare model (no collectives inside; GD all-reduces its gradients).
    ddp = dist.wrap(model)
    fwd = torch.compile(ddp) if tc.compile else ddp
    eval_fwd = model if dist.enabled else fwd
    train_fwd = model if dist.enabled and gd else fwd
    # <<< data-parallel

    state = LoopState(config=cfg, out_dir=out, model=model, rank=dist.rank, world_size=dist.world_size)
    bad_evals = 0
    rollbacks = 0
    history: list[dict[str, Any]] = []
    if resume_ckpt is not None and resume_ckpt.trainer_state is not None:
        ts = resume_ckpt.trainer_state
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        sampler.load_state_dict(ts["sampler"])
        saved_batch = ts["sampler"].get("batch_size") if isinstance(ts["sampler"], dict) else None
        if isinstance(sampler, (BlockSampler, RankSlice)) and saved_batch not in (None, global_batch):
            if dist.is_main:
                warnings.warn(
                    f"resuming a run with global batch {saved_batch} blocks with global batch {global_batch} "
                    f"(train.batch_size {tc.batch_size} x {dist.world_size} processes): training continues at the "
                    "same data position, but its batches differ from those of an uninterrupted run",
                    RuntimeWarning, stacklevel=2)
        # data-parallel checkpoints hold every rank's RNG state; a rank without one keeps its fresh seed
        rank_rngs = ts.get("rng_ranks") or [ts["rng"]]
        if dist.rank < len(rank_rngs):
            restore_rng_state(rank_rngs[dist.rank])
        state.step, state.tokens, state.elapsed_s = int(ts["step"]), int(ts["tokens"]), float(ts["elapsed_s"])
        state.best_val_loss, state.best_step = float(ts["best_val_loss"]), int(ts["best_step"])
        bad_evals = int(ts["bad_evals"])
        history = truncate_metrics(out, state.step, write=dist.is_main)
        scheduler.set_elapsed(state.elapsed_s)
        log(f"resumed from {resume_ckpt.path} at step {state.step}")
    if dist.enabled:  # every rank must start from the same checkpoint, or their collectives go out of step
        starts = dist.gather_object(state.step)
        if len(set(starts)) > 1:
            raise TrainingError(
                f"the processes start from different steps {starts} (by rank): every node must see the same "
                f"run directory {out} (put --out on a shared filesystem)"
            )

    n_params = model.num_params()
    gd_blocks = len(data.train) // (block + 1)
    tokens_per_step = gd_blocks * block if gd else global_batch * block * tc.grad_accum

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "rng": capture_rng_state(), "step": state.step, "tokens": state.tokens,
            "elapsed_s": state.elapsed_s, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "bad_evals": bad_evals,
        }

    def checkpoint(val_loss: float | None) -> Path:
        meta = {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "elapsed_s": state.elapsed_s}
        path = out / "checkpoints" / f"step-{state.step:07d}"
        rngs = dist.gather_object(capture_rng_state()) if dist.enabled else None
        if dist.is_main:
            ts = trainer_state()
            if rngs is not None:
                ts["rng_ranks"] = rngs
            save_checkpoint(path, model=model, config_yaml=config_yaml, tokenizer=tokenizer, trainer_state=ts,
                            meta=meta)
            prune_checkpoints(out, tc.keep_last)
        dist.barrier()  # data-parallel: nobody reads (rolls back to) a half-written checkpoint
        return path

    def rollback() -> None:
        with dist.main_first():  # rank 0 repairs an interrupted checkpoint write before the others read
            ck = latest_checkpoint(out)
        if ck is None or ck.trainer_state is None:
            raise TrainingError(f"loss is NaN/inf for {tc.max_bad_steps} steps in a row and there is no checkpoint "
                                "to roll back to; lower optim.lr or enable clipping (optim.grad_clip)")
        model.load_state_dict(ck.state_dict)
        optimizer.load_state_dict(ck.trainer_state["optimizer"])
        scheduler.load_state_dict(ck.trainer_state["scheduler"])
        # the sampler keeps going: replaying the same batches would diverge again
        state.step, state.tokens = int(ck.trainer_state["step"]), int(ck.trainer_state["tokens"])
        log(f"rolled back to {ck.path} after {tc.max_bad_steps} non-finite losses")

    def micro_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if gd:  # data-parallel: the ranks share the pass, each taking every world_size-th chunk
            return dist.shard_chunks(full_batches(data.train, block, tc.batch_size))
        return (sampler.next_batch() for _ in range(tc.grad_accum))

    def stop_reason() -> str | None:
        if tc.max_steps is not None and state.step >= tc.max_steps:
            return "max_steps"
        if tc.max_tokens is not None and state.tokens >= tc.max_tokens:
            return "max_tokens"
        epoch = state.step if cfg.optim.name == "gd" else sampler.epoch
        if tc.max_epochs is not None and epoch >= tc.max_epochs:
            return "max_epochs"
        if tc.max_time is not None and state.elapsed_s >= tc.max_time:
            return "max_time"
        return None

    def do_eval(train_loss: float) -> dict[str, Any]:
        val_loss, _ = evaluate_loss(eval_fwd, val_batches, device, autocast, dist if dist.enabled else None)
        rec = {
            "step": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 3),
            "time": round(time.time(), 3),
            "train_loss": train_loss, "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bits_per_token": val_loss / math.log(2),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if val_bytes_per_token > 0:
            rec["val_bpb"] = val_loss / math.log(2) / val_bytes_per_token
            if tokenizer.kind == "char":
                rec["val_bpc"] = val_loss / math.log(2)
        return rec

    for cb in callbacks:
        cb.on_train_start(state)
    reason = stop_reason()
    model.train()
    bar = _progress(tc.max_steps, tc.progress and verbose and dist.is_main, state.step)
    losses: list[float] = []
    consecutive_bad = 0
    last_val: float = math.nan
    t_last = time.perf_counter()
    tok_window = 0
    with _Terminate() as term:
        while reason is None:
            t0 = time.perf_counter()
            # -- one optimizer step (accumulated micro-batches) -----------------------------------
            optimizer.zero_grad(set_to_none=True)
            batches = list(micro_batches()) if cfg.optim.name != "gd" else micro_batches()
            step_loss, n_micro, finite = 0.0, 0, True
            for i, (x, y) in enumerate(batches):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # data-parallel: only the last micro-batch's backward all-reduces the accumulated gradients
                last = gd or i == tc.grad_accum - 1
                with ddp.no_sync() if dist.enabled and not last else contextlib.nullcontext():
                    with autocast:
                        _, loss = train_fwd(x, y)
                    if not torch.isfinite(loss):
                        finite = False
                        if not dist.enabled:
                            break
                        # data-parallel: go on, so every rank makes the same collective calls; skipped below
                    # full-batch GD: weight each chunk by its share of all blocks, so the gradient is the full mean
                    scale = x.size(0) / gd_blocks if gd else 1.0 / tc.grad_accum
                    (scaler.scale(loss * scale) if scaler else loss * scale).backward()
                # full-batch GD reports the loss of the whole pass: chunks weighted by their rows
                weight = x.size(0) if gd else 1
                step_loss += float(loss.detach()) * weight
                n_micro += weight
            # >>> data-parallel: GD sums each rank's share of the gradient and of the pass's loss; all ranks
            # skip the step if any saw NaN/inf
            if dist.enabled:
                if gd:
                    dist.all_reduce_grads(model)
                    step_loss, n_rows = dist.sum([step_loss, float(n_micro)])
                    n_micro = int(n_rows)
                finite = dist.all_true(finite)
            # <<< data-parallel
            if finite and cfg.optim.grad_clip > 0:
                if scaler:
                    scaler.unscale_(optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                finite = bool(torch.isfinite(gnorm))
            if not finite:
                # skip: weights, optimizer, schedule and step counter untouched
                optimizer.zero_grad(set_to_none=True)
                consecutive_bad += 1
                if dist.is_main:
                    warnings.warn(f"non-finite loss at step {state.step}; step skipped", RuntimeWarning, stacklevel=1)
                if consecutive_bad >= tc.max_bad_steps:
                    if tc.on_bad_steps == "stop" or rollbacks >= tc.max_rollbacks:
                        raise TrainingError(
                            f"training diverged: non-finite loss in {consecutive_bad} consecutive steps at step "
                            f"{state.step} (optim.lr = {cfg.optim.lr}); lower the learning rate"
                        )
                    rollback()
                    rollbacks += 1
                    consecutive_bad = 0
                continue
            consecutive_bad = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            state.step += 1
            state.tokens += tokens_per_step
            tok_window += tokens_per_step
            losses.append(step_loss / max(1, n_micro))
            state.elapsed_s += time.perf_counter() - t0
            if dist.enabled:  # the same stop decision on every rank: their clocks and SIGTERMs differ
                state.elapsed_s, any_term = dist.max([state.elapsed_s, float(term.requested)])
                term.requested = any_term > 0
            scheduler.set_elapsed(state.elapsed_s)
            reason = stop_reason()
            if term.requested:
                reason = "sigterm"

            if state.step % tc.log_interval == 0 or reason:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_window / max(1e-9, now - t_last):,.0f}",
                                refresh=False)
                t_last, tok_window = now, 0
            bar.update(1)

            # -- evaluation, best, early stopping, callbacks ---------------------------------------
            is_eval = state.step % tc.eval_interval == 0 or reason is not None
            if is_eval:
                t_eval = time.perf_counter()
                # data-parallel: every rank holds as many step losses; their mean over ranks is the global one
                rec = do_eval(dist.mean(float(np.mean(losses))) if losses else math.nan)
                losses = []
                last_val = rec["val_loss"]
                state.last_record = rec
                history.append(rec)
                if dist.is_main:
                    append_metrics(out, rec)
                scheduler.observe(rec["val_loss"])
                improved = rec["val_loss"] < state.best_val_loss - tc.min_delta
                if improved:
                    state.best_val_loss, state.best_step = rec["val_loss"], state.step
                    bad_evals = 0
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{rec['val_loss']:.4f}", refresh=False)
                if tc.patience is not None and bad_evals >= tc.patience and reason is None:
                    reason = "early_stopping"
                cb_stop = False
                for cb in callbacks:
                    cb_stop = bool(cb.on_eval(state, rec)) or cb_stop
                if dist.any_true(cb_stop) and reason is None:  # any rank's callback stops every rank
                    reason = "callback"
                state.elapsed_s += time.perf_counter() - t_eval
                if improved and dist.is_main:
                    save_best(out, model=model, config_yaml=config_yaml, tokenizer=tokenizer,
                              meta={"step": state.step, "tokens": state.tokens, "val_loss": rec["val_loss"],
                                    "elapsed_s": state.elapsed_s})
            ckpt_every = tc.checkpoint_interval or tc.eval_interval
            if state.step % ckpt_every == 0 or reason is not None:
                checkpoint(last_val if is_eval else None)
    bar.close()

    result = TrainResult(
        out_dir=out, step=state.step, tokens=state.tokens, elapsed_s=state.elapsed_s,
        best_val_loss=state.best_val_loss, best_step=state.best_step, final_val_loss=last_val,
        stop_reason=reason or "max_steps", num_params=n_params, history=history,
    )
    for cb in callbacks:
        cb.on_train_end(state, result)
    log(
        f"done: {result.stop_reason} at step {result.step} ({result.tokens:,} tokens, {result.elapsed_s:.1f}s); "
        f"best val loss {result.best_val_loss:.4f} at step {result.best_step}; {n_params:,} parameters; "
        f"best checkpoint: {out / 'best'}"
    )
    return result
