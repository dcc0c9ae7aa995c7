"""The one training loop (layer 3): pretraining, fine-tuning, search trials and continuation all call
:func:`train`.

The loop knows nothing about search: callers pass :class:`Callback` objects whose ``on_eval`` may stop
training (a pruner), and read the result. Everything needed to continue bit for bit (weights,
optimizer, schedule, sampler position, RNG states, counters) goes into every checkpoint.

What varies between runs lives beside the loop, not inside it: the device and precision
(:mod:`~lmforge.train.device`), one or N data-parallel processes (:mod:`~lmforge.train.distributed`: the
loop calls its methods at every point where ranks must agree) and the kind of data
(:mod:`~lmforge.train.data_source`: token streams or task examples). :class:`_Trainer` holds one run's
objects and counters; its methods are the steps of the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import RunConfig
from lmforge.data import BlockSampler, PreparedData, Tokenizer
from lmforge.data.sampler import Batch
from lmforge.models import build_model
from lmforge.models.base import LanguageModel
from lmforge.runs import (
    BEST_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    Checkpoint,
    append_metrics,
    capture_rng_state,
    latest_checkpoint,
    prune_checkpoints,
    save_best,
    save_checkpoint,
    snapshot_weights,
    truncate_metrics,
    write_config,
)
from lmforge.train.callbacks import Callback, LoopState, TrainResult
from lmforge.train.compile import (
    PROBE_STEPS,
    CompileLedger,
    StepTimes,
    choose,
    compile_key,
    compile_ways,
    eager_calls,
    enable_disk_cache,
    remaining_steps,
)
from lmforge.train.data_source import BatchSampler, DataSource, open_data_source
from lmforge.train.device import autocast_context, grad_scaler, resolve_device, seed_everything, to_device
from lmforge.train.distributed import Distributed, RankSlice
from lmforge.train.errors import TrainingError, write_errors
from lmforge.train.evaluation import evaluate_loss
from lmforge.train.memory import check_fits_in_memory
from lmforge.train.optim import build_optimizer
from lmforge.train.progress import ProgressBar, progress_bar
from lmforge.train.resume import best_so_far, check_resume_matches, check_trainer_state, resume_checkpoint
from lmforge.train.schedule import build_scheduler
from lmforge.train.terminate import TerminateRequest

# the loop's public names, importable from here as before the adapters moved out
__all__ = [
    "Callback",
    "LoopState",
    "TrainResult",
    "TrainingError",
    "autocast_context",
    "evaluate_loss",
    "resolve_device",
    "seed_everything",
    "train",
]


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    data: PreparedData | None = None,
    model: LanguageModel | None = None,
    tokenizer: Tokenizer | None = None,
    callbacks: Sequence[Callback] = (),
    sampler: BatchSampler | None = None,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    verbose: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    checkpoint_steps: Container[int] | None = None,
) -> TrainResult:
    """Train ``config`` into ``out_dir`` and return a summary.

    ``model``/``tokenizer`` start from given weights (fine-tuning, a mutated child); otherwise a fresh
    model is built. ``data`` skips data preparation (search trials share it). ``config.train.resume``
    decides what happens when ``out_dir`` already holds checkpoints. ``sampler`` and ``val_batches``
    without ``data`` train on task examples (see :mod:`lmforge.train.data_source`).

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, ``WORLD_SIZE > 1``) every process calls
    this and they train one model with DistributedDataParallel (see :mod:`lmforge.train.distributed`):
    ``train.batch_size`` is per process, rank 0 alone writes the run directory and prints.

    ``clock`` is the seconds counter that measures training time (``train.max_time``, the time horizon of
    the schedule, ``elapsed_s``); tests pass a fake one.

    ``checkpoint_steps`` (search trials: the evaluations at the pruner's rungs) replaces the periodic
    checkpoints of ``train.checkpoint_interval``: checkpoints are written at these steps and where training
    stops (where a trial can be resumed), and ``best/`` is kept in memory when the validation loss improves
    and written with the next checkpoint (it is what a trial can be chosen by), not at every improvement.
    """
    tc = config.train
    out = Path(out_dir)
    # join the process group for the whole run (a no-op stand-in outside torchrun)
    with Distributed.from_env(resolve_device(tc.device)) as dist:
        if dist.enabled and sampler is not None:
            raise TrainingError("data-parallel training (torchrun) with an injected sampler is not supported; "
                                "run task fine-tuning in a single process")
        # rank 0 repairs and reads the run directory and prepares (caches) the data first; the other ranks
        # then read what it left instead of racing it
        with dist.main_first():
            resume_ckpt = resume_checkpoint(tc, out)
            if resume_ckpt is not None:  # before anything is built from it: the same model and tokenizer
                check_resume_matches(config, resume_ckpt)
            # every rank gets its own dropout stream; rank 0 is seeded as a single process would be
            seed_everything(tc.seed + dist.rank, tc.deterministic)
            if resume_ckpt is not None and tokenizer is None:
                tokenizer = Tokenizer.load(resume_ckpt.path)
            source = open_data_source(config, data, tokenizer, sampler, val_batches)
        trainer = _Trainer(config, out, source=source, model=model, resume_ckpt=resume_ckpt,
                           callbacks=callbacks, dist=dist, verbose=verbose, clock=clock,
                           checkpoint_steps=checkpoint_steps)
        return trainer.run()


def _model_for(cfg: RunConfig, model: LanguageModel | None, tokenizer: Tokenizer,
               device: torch.device) -> LanguageModel:
    """The given model checked against the tokenizer and block size, or a fresh one built from ``cfg``
    (after checking that it will train in the memory ``device`` has)."""
    block = cfg.data.block_size
    if model is None:
        check_fits_in_memory(cfg, tokenizer.vocab_size, device)
        model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=cfg.max_seq_len)
    elif model.config.vocab_size is not None and model.config.vocab_size < tokenizer.vocab_size:
        raise TrainingError(
            f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({tokenizer.vocab_size})"
        )
    if model.max_seq_len is not None and block > model.max_seq_len:
        raise TrainingError(f"data.block_size ({block}) exceeds the model's context ({model.max_seq_len})")
    return model


@contextlib.contextmanager
def _undo_on_exit(undo: Callable[[], None]) -> Iterator[None]:
    """Restore the caller's model (eager blocks) when training ends, however it ends."""
    try:
        yield
    finally:
        undo()


class _Trainer:
    """One call of :func:`train`: the objects it built and the counters that go into every checkpoint."""

    def __init__(
        self,
        config: RunConfig,
        out: Path,
        *,
        source: DataSource,
        model: LanguageModel | None,
        resume_ckpt: Checkpoint | None,
        callbacks: Sequence[Callback],
        dist: Distributed,
        verbose: bool,
        clock: Callable[[], float],
        checkpoint_steps: Container[int] | None = None,
    ) -> None:
        t_build = time.perf_counter()
        self.checkpoint_steps = checkpoint_steps
        # with checkpoint_steps: the best weights wait here (a CPU copy and best/'s meta) for the next checkpoint
        self.pending_best: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self.out = out
        self.clock = clock
        self.phases: dict[str, float] = {"build_s": 0.0, "train_s": 0.0, "compile_s": 0.0, "eval_s": 0.0,
                                         "checkpoint_s": 0.0}
        self.source = source
        self.callbacks = callbacks
        self.dist = dist
        self.verbose = verbose
        self.tokenizer = tokenizer = source.tokenizer
        tc = self.tc = config.train
        self.block = block = config.data.block_size
        source.check_fits(block)

        # -- model ----------------------------------------------------------------------------------
        model = self.model = _model_for(config, model, tokenizer, dist.device)
        cfg = self.cfg = config.model_copy(update={"model": model.config})
        self.config_yaml = cfg.to_yaml()
        device = self.device = dist.device
        model.to(device)
        if resume_ckpt is not None:
            model.load_state_dict(resume_ckpt.state_dict, strict=True)
        if dist.is_main:
            with write_errors(out / CONFIG_FILE):
                out.mkdir(parents=True, exist_ok=True)
                write_config(out, self.config_yaml)

        # -- optimization -----------------------------------------------------------------------------
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.total_steps, cfg.optim.lr, tc.max_time)
        # data-parallel: the batches are global (batch_size * world_size blocks), each rank keeps its rows
        self.global_batch = tc.batch_size * dist.world_size
        self.sampler = source.sampler(block, self.global_batch, tc.seed, dist)
        self.val_batches = source.val_batches(block, self.global_batch, tc.eval_batches)
        self.val_bytes_per_token = source.val_bytes_per_token
        self.autocast = autocast_context(device, tc.dtype)
        self.scaler = grad_scaler(device, tc.dtype)
        self.gd = cfg.optim.name == "gd"
        # train.compile: true compiles now; auto runs eager and decides after PROBE_STEPS measured steps
        # (single process, minibatch steps only: a switch under data-parallel would re-wrap the model)
        self.compiled = tc.compile is True
        self.probing = tc.compile == "auto" and not dist.enabled and not self.gd
        if self.compiled or self.probing:
            enable_disk_cache()
        self.calls = dist.model_calls(model, self.compiled, self.gd)
        self.step_times = StepTimes()
        self.compile_note = f"compiled {self.calls.how} (train.compile true)" if self.compiled else "eager"

        # -- counters ---------------------------------------------------------------------------------
        self.state = LoopState(config=cfg, out_dir=out, model=model, rank=dist.rank, world_size=dist.world_size)
        self.bad_evals = 0
        self.rollbacks = 0
        self.consecutive_bad = 0
        self.history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.last_val: float = math.nan
        if resume_ckpt is not None and resume_ckpt.trainer_state is not None:
            self.restore(resume_ckpt)
        elif (out / METRICS_FILE).exists():  # starting at step 0: a restarted run redoes every record
            self.history = truncate_metrics(out, 0, write=dist.is_main)
        self.keep_better_best()
        dist.check_same_start(self.state.step, out)

        self.n_params = model.num_params()
        self.gd_blocks = source.full_batch_blocks(block) if self.gd else 0
        self.tokens_per_step = (self.gd_blocks * block if self.gd
                                else self.global_batch * block * tc.grad_accum)
        self.compile_keys = {how: compile_key(model, self.global_batch * tc.grad_accum, block, tc.dtype, device, how)
                             for how in compile_ways(model)}
        self.phases["build_s"] = time.perf_counter() - t_build

    def log(self, message: str) -> None:
        if self.verbose and self.dist.is_main:
            print(message)

    # ------------------------------------------------------------------------------- checkpoints
    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``'s trainer state exactly where it stopped (weights are already loaded)."""
        ts = check_trainer_state(ckpt)
        tc, state, dist = self.tc, self.state, self.dist
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.sampler.load_state_dict(ts["sampler"])
        saved_batch = ts["sampler"].get("batch_size") if isinstance(ts["sampler"], dict) else None
        if isinstance(self.sampler, (BlockSampler, RankSlice)) and saved_batch not in (None, self.global_batch):
            if dist.is_main:
                warnings.warn(
                    f"resuming a run with global batch {saved_batch} blocks with global batch {self.global_batch} "
                    f"(train.batch_size {tc.batch_size} x {dist.world_size} processes): training continues at the "
                    "same data position, but its batches differ from those of an uninterrupted run",
                    RuntimeWarning, stacklevel=2)
        dist.restore_rank_rng(ts)
        state.step, state.tokens, state.elapsed_s = int(ts["step"]), int(ts["tokens"]), float(ts["elapsed_s"])
        state.best_val_loss, state.best_step = float(ts["best_val_loss"]), int(ts["best_step"])
        self.bad_evals = int(ts["bad_evals"])
        self.history = truncate_metrics(self.out, state.step, write=dist.is_main)
        self.scheduler.set_elapsed(state.elapsed_s)
        self.log(f"resumed from {ckpt.path} at step {state.step}")

    def keep_better_best(self) -> None:
        """Start "best so far" from ``OUT/best`` when it records a lower loss than the counters say (a run
        restarted without a checkpoint, or killed between saving best/ and its checkpoint): a resumed run
        never replaces an intact best model with a worse one."""
        best, state = best_so_far(self.out), self.state
        if best is not None and best.val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = best.val_loss, best.step

    def trainer_state(self) -> dict[str, Any]:
        state = self.state
        return {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": capture_rng_state(), "step": state.step,
            "tokens": state.tokens, "elapsed_s": state.elapsed_s, "best_val_loss": state.best_val_loss,
            "best_step": state.best_step, "bad_evals": self.bad_evals,
        }

    def write_best(self, weights: torch.nn.Module | dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        if self.dist.is_main:
            with write_errors(self.out / BEST_DIR):
                save_best(self.out, model=weights, config_yaml=self.config_yaml, tokenizer=self.tokenizer, meta=meta)
        self.phases["checkpoint_s"] += time.perf_counter() - t0

    def flush_best(self) -> None:
        """Write the best weights kept in memory (``checkpoint_steps``), before the checkpoint that counts them."""
        if self.pending_best is not None:
            weights, meta = self.pending_best
            self.pending_best = None
            self.write_best(weights, meta)

    def checkpoint(self, val_loss: float | None) -> Path:
        self.flush_best()  # a checkpoint's best_val_loss never names a best/ that is not on disk
        t0 = time.perf_counter()
        state, dist = self.state, self.dist
        meta = {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "elapsed_s": state.elapsed_s}
        path = self.out / "checkpoints" / f"step-{state.step:07d}"
        rngs = dist.rank_rng_states()
        if dist.is_main:
            ts = self.trainer_state()
            if rngs is not None:
                ts["rng_ranks"] = rngs
            with write_errors(path):
                save_checkpoint(path, model=self.model, config_yaml=self.config_yaml, tokenizer=self.tokenizer,
                                trainer_state=ts, meta=meta)
                prune_checkpoints(self.out, self.tc.keep_last)
        dist.barrier()  # data-parallel: nobody reads (rolls back to) a half-written checkpoint
        self.phases["checkpoint_s"] += time.perf_counter() - t0
        return path

    def rollback(self) -> None:
        tc, state = self.tc, self.state
        with self.dist.main_first():  # rank 0 repairs an interrupted checkpoint write before the others read
            ck = latest_checkpoint(self.out)
        if ck is None or ck.trainer_state is None:
            raise TrainingError(f"loss is NaN/inf for {tc.max_bad_steps} steps in a row and there is no checkpoint "
                                "to roll back to; lower optim.lr or enable clipping (optim.grad_clip)")
        self.model.load_state_dict(ck.state_dict)
        self.optimizer.load_state_dict(ck.trainer_state["optimizer"])
        self.scheduler.load_state_dict(ck.trainer_state["scheduler"])
        # the sampler keeps going: replaying the same batches would diverge again
        state.step, state.tokens = int(ck.trainer_state["step"]), int(ck.trainer_state["tokens"])
        self.log(f"rolled back to {ck.path} after {tc.max_bad_steps} non-finite losses")

    # ----------------------------------------------------------------------------------- a step
    def micro_batches(self) -> Iterable[Batch]:
        if self.gd:  # data-parallel: the ranks share the pass, each taking every world_size-th chunk
            return self.dist.shard_chunks(self.source.full_batches(self.block, self.tc.batch_size))
        return [self.sampler.next_batch() for _ in range(self.tc.grad_accum)]

    def forward_backward(self) -> tuple[float, int, bool]:
        """Accumulate the gradient of one step -> (summed loss, its weight, every loss finite)."""
        tc, gd, dist = self.tc, self.gd, self.dist
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, n_micro, finite = 0.0, 0, True
        for i, (xb, yb) in enumerate(self.micro_batches()):
            x, y = to_device(xb, self.device), to_device(yb, self.device)
            last = gd or i == tc.grad_accum - 1
            with dist.no_sync(self.calls.wrapped, last):
                with self.autocast:
                    _, loss = self.calls.train(x, y)
                # full-batch GD: weight each chunk by its share of all blocks, so the gradient is the full mean
                scale = x.size(0) / self.gd_blocks if gd else 1.0 / tc.grad_accum
                (self.scaler.scale(loss * scale) if self.scaler else loss * scale).backward()
            # the one host sync of a micro-batch, after its backward is queued; a non-finite loss leaves
            # non-finite gradients, and the step is skipped (the gradients are zeroed) either way
            value = float(loss.detach())
            if not math.isfinite(value):
                finite = False
                if not dist.enabled:
                    break
                # data-parallel: go on, so every rank makes the same collective calls; skipped later
            # full-batch GD reports the loss of the whole pass: chunks weighted by their rows
            weight = x.size(0) if gd else 1
            step_loss += value * weight
            n_micro += weight
        return dist.reduce_step(self.model, gd, step_loss, n_micro, finite)

    def step(self) -> bool:
        """One optimizer step; False when a non-finite loss or gradient made it skip (nothing changed)."""
        step_loss, n_micro, finite = self.forward_backward()
        grad_clip = self.cfg.optim.grad_clip
        if finite and grad_clip > 0:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            finite = bool(torch.isfinite(gnorm))
        if not finite:
            self.skip_step()
            return False
        self.consecutive_bad = 0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.losses.append(step_loss / max(1, n_micro))
        return True

    def skip_step(self) -> None:
        """Weights, optimizer, schedule and step counter stay untouched; too many in a row stop the run or
        roll it back to the last checkpoint."""
        tc, state = self.tc, self.state
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_bad += 1
        if self.dist.is_main:
            warnings.warn(f"non-finite loss at step {state.step}; step skipped", RuntimeWarning, stacklevel=1)
        if self.consecutive_bad >= tc.max_bad_steps:
            if tc.on_bad_steps == "stop" or self.rollbacks >= tc.max_rollbacks:
                raise TrainingError(
                    f"training diverged: non-finite loss in {self.consecutive_bad} consecutive steps at step "
                    f"{state.step} (optim.lr = {self.cfg.optim.lr}); lower the learning rate"
                )
            self.rollback()
            self.rollbacks += 1
            self.consecutive_bad = 0

    def stop_reason(self) -> str | None:
        tc, state = self.tc, self.state
        if tc.max_steps is not None and state.step >= tc.max_steps:
            return "max_steps"
        if tc.max_tokens is not None and state.tokens >= tc.max_tokens:
            return "max_tokens"
        epoch = state.step if self.gd else self.sampler.epoch
        if tc.max_epochs is not None and epoch >= tc.max_epochs:
            return "max_epochs"
        if tc.max_time is not None and state.elapsed_s >= tc.max_time:
            return "max_time"
        return None

    # ------------------------------------------------------------------------------- evaluation
    def eval_record(self, train_loss: float) -> dict[str, Any]:
        state, dist = self.state, self.dist
        # evaluation stays eager: compiling its inference-mode graph too would cost a second compile
        with eager_calls() if self.compiled else contextlib.nullcontext():
            val_loss, _ = evaluate_loss(self.calls.eval, self.val_batches, self.device, self.autocast,
                                        dist if dist.enabled else None)
        rec = {
            "step": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 3),
            "time": round(time.time(), 3),
            "train_loss": train_loss, "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bits_per_token": val_loss / math.log(2),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.val_bytes_per_token > 0:
            rec["val_bpb"] = val_loss / math.log(2) / self.val_bytes_per_token
            if self.tokenizer.kind == "char":
                rec["val_bpc"] = val_loss / math.log(2)
        return rec

    def evaluate(self, reason: str | None, bar: ProgressBar) -> str | None:
        """Evaluate, record, track the best model, early-stop and ask the callbacks -> the stop reason."""
        tc, state, dist = self.tc, self.state, self.dist
        t_eval = self.clock()
        t_phase = time.perf_counter()
        # data-parallel: every rank holds as many step losses; their mean over ranks is the global one
        rec = self.eval_record(dist.mean(float(np.mean(self.losses))) if self.losses else math.nan)
        self.losses = []
        self.last_val = rec["val_loss"]
        state.last_record = rec
        self.history.append(rec)
        if dist.is_main:
            with write_errors(self.out / METRICS_FILE):
                append_metrics(self.out, rec)
        self.scheduler.observe(rec["val_loss"])
        improved = rec["val_loss"] < state.best_val_loss - tc.min_delta
        if improved:
            state.best_val_loss, state.best_step = rec["val_loss"], state.step
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        bar.set_postfix(loss=f"{rec['train_loss']:.4f}", val=f"{rec['val_loss']:.4f}", refresh=False)
        if tc.patience is not None and self.bad_evals >= tc.patience and reason is None:
            reason = "early_stopping"
        cb_stop = False
        for cb in self.callbacks:
            cb_stop = bool(cb.on_eval(state, rec)) or cb_stop
        if dist.any_true(cb_stop) and reason is None:  # any rank's callback stops every rank
            reason = "callback"
        state.elapsed_s += self.clock() - t_eval
        self.phases["eval_s"] += time.perf_counter() - t_phase
        if improved:
            meta = {"step": state.step, "tokens": state.tokens, "val_loss": rec["val_loss"],
                    "elapsed_s": state.elapsed_s}
            if self.checkpoint_steps is None:
                self.write_best(self.model, meta)
            elif dist.is_main:
                t_copy = time.perf_counter()
                self.pending_best = (snapshot_weights(self.model), meta)
                self.phases["checkpoint_s"] += time.perf_counter() - t_copy
        return reason

    def checkpoint_due(self) -> bool:
        """A periodic checkpoint at this step: every ``train.checkpoint_interval`` (else ``eval_interval``)
        steps, or at ``checkpoint_steps`` where those are given."""
        if self.checkpoint_steps is not None:
            return self.state.step in self.checkpoint_steps
        return self.state.step % (self.tc.checkpoint_interval or self.tc.eval_interval) == 0

    # ---------------------------------------------------------------------------------- compile
    def maybe_compile(self) -> None:
        """``train.compile: auto``: after PROBE_STEPS timed eager steps, compile when the measured numbers say
        the remaining planned steps repay it, whole or regionally, whichever saves more
        (:func:`~lmforge.train.compile.choose`); decided once."""
        eager = self.step_times.eager_median()
        if not self.probing or eager is None or len(self.step_times.eager) < PROBE_STEPS + 1:
            return
        self.probing = False
        tc, state = self.tc, self.state
        left = remaining_steps(step=state.step, max_steps=tc.max_steps, max_tokens=tc.max_tokens, tokens=state.tokens,
                               tokens_per_step=self.tokens_per_step, max_time=tc.max_time,
                               elapsed_s=state.elapsed_s, eager_step_s=eager)
        verdict = choose(CompileLedger().load(), self.compile_keys, self.device.type, eager, left)
        # every rank measured its own steps: compile only where all of them say it pays, so that the ranks
        # never run different graphs (or one of them stalls in a compile the others skipped)
        agreed = self.dist.all_true(verdict.compile)
        why = verdict.why if agreed == verdict.compile else "another rank's measurements say it does not pay"
        if agreed:
            self.calls = self.dist.model_calls(self.model, True, False, wrapped=self.calls.wrapped, how=verdict.how)
            self.compiled = True
        how = f"compiled {self.calls.how}" if agreed else "eager"
        self.compile_note = f"{how} (train.compile auto: {why})"

    def record_step_times(self) -> None:
        """Write this run's measured step times and compile cost to the ledger the ``auto`` decision reads."""
        st = self.step_times
        if not self.dist.is_main or (not st.eager[1:] and not st.compiled):
            return
        ledger = CompileLedger()
        for how, key in self.compile_keys.items():  # the eager step time is every way's baseline
            if how != self.calls.how:
                ledger.update(key, self.device.type, how=how, eager_step_s=st.eager_median())
                continue
            before = ledger.get(key)
            warm = before is not None and (before.compile_cold_s is not None or before.compile_warm_s is not None)
            cost = st.compile_cost()
            ledger.update(key, self.device.type, how=how, eager_step_s=st.eager_median(),
                          compiled_step_s=st.compiled_median(),
                          compile_warm_s=cost if warm else None, compile_cold_s=None if warm else cost)

    # ---------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        tc, state, dist = self.tc, self.state, self.dist
        for cb in self.callbacks:
            cb.on_train_start(state)
        reason = self.stop_reason()
        self.model.train()
        bar = progress_bar(tc.max_steps, tc.progress and self.verbose and dist.is_main, state.step)
        t_last = self.clock()
        tok_window = 0
        with TerminateRequest() as term, _undo_on_exit(lambda: self.calls.undo()):
            while reason is None:
                t0 = self.clock()
                t_step = time.perf_counter()
                if not self.step():
                    continue
                step_s = time.perf_counter() - t_step
                if self.compiled and self.step_times.first_compiled is None:
                    self.phases["compile_s"] += max(0.0, step_s - (self.step_times.eager_median() or 0.0))
                self.phases["train_s"] += step_s
                self.step_times.add(step_s, self.compiled)
                self.maybe_compile()
                state.step += 1
                state.tokens += self.tokens_per_step
                tok_window += self.tokens_per_step
                state.elapsed_s += self.clock() - t0
                # the agreed answer, not term.requested: the signal handler may set that flag on one rank
                # between the agreement and the check, and the ranks would then part ways
                state.elapsed_s, terminate = dist.agree_on_stop(state.elapsed_s, term.requested)
                self.scheduler.set_elapsed(state.elapsed_s)
                reason = self.stop_reason()
                if reason is None and any([cb.on_step(state) for cb in self.callbacks]):
                    reason = "callback"
                if terminate:
                    reason = "sigterm"

                if state.step % tc.log_interval == 0 or reason:
                    now = self.clock()
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}", tok_s=f"{tok_window / max(1e-9, now - t_last):,.0f}",
                                    refresh=False)
                    t_last, tok_window = now, 0
                bar.update(1)

                is_eval = state.step % tc.eval_interval == 0 or reason is not None
                if is_eval:
                    reason = self.evaluate(reason, bar)
                if reason is not None or self.checkpoint_due():
                    self.checkpoint(self.last_val if is_eval else None)
        bar.close()
        self.flush_best()  # stopped without a checkpoint after the best evaluation (none is written then)
        self.phases["train_s"] -= self.phases["compile_s"]
        self.record_step_times()
        if self.compile_note != "eager":
            self.log(self.compile_note)

        result = TrainResult(
            out_dir=self.out, step=state.step, tokens=state.tokens, elapsed_s=state.elapsed_s,
            best_val_loss=state.best_val_loss, best_step=state.best_step, final_val_loss=self.last_val,
            stop_reason=reason or "max_steps", num_params=self.n_params, history=self.history,
            phases={k: round(v, 4) for k, v in self.phases.items()}, compiled=self.compiled,
        )
        for cb in self.callbacks:
            cb.on_train_end(state, result)
        self.log(
            f"done: {result.stop_reason} at step {result.step} ({result.tokens:,} tokens, {result.elapsed_s:.1f}s); "
            f"best val loss {result.best_val_loss:.4f} at step {result.best_step}; {self.n_params:,} parameters; "
            f"best checkpoint: {self.out / 'best'}"
        )
        return result
