"""Data-parallel training (layer 3): the process group, rank-sliced batches and the few collectives the
loop needs to keep every rank's decisions identical.

``torchrun --nproc-per-node N -m lmforge train ...`` (or ``lmforge train --nproc N ...``, which calls
torchrun's launcher: :mod:`lmforge.train.launch`) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :meth:`Distributed.from_env`
reads them, joins the group (gloo on CPU, NCCL on CUDA with rank ``r`` on ``cuda:LOCAL_RANK``) and
:meth:`Distributed.close` leaves it. Without those variables (or with ``WORLD_SIZE=1``) every method is a
cheap no-op, so the loop has one code path.

How the work is split (``B = train.batch_size`` per process, ``N`` processes):

- training: one sampler per rank draws the same *global* batch of ``B * N`` blocks, exactly the batch a
  single process with ``train.batch_size = B * N`` would draw; rank ``r`` keeps rows ``[r*B, (r+1)*B)``
  (:class:`RankSlice`). The checkpoint stores the global sampler's state, so a run can resume with another
  ``N`` (exactly when ``B * N`` is unchanged).
- gradients: DistributedDataParallel averages them, so a step equals the single-process step on ``B * N``
  rows (the loss is a mean over rows of equal length).
- evaluation: every rank scores its share of the rows of the same validation batches; the token-weighted
  sums are all-reduced, so every rank gets the same loss.
- decisions: whatever ends or skips a step (a non-finite loss, SIGTERM, the time limit, a callback) is
  agreed over ranks, so their collectives never go out of step.

The training loop calls the methods below at those points and has one code path for one or N processes.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import LmforgeError
from lmforge.data.sampler import Batch, BlockSampler, gather_blocks
from lmforge.runs import capture_rng_state, restore_rng_state
from lmforge.train.compile import CompileHow, compile_for_training
from lmforge.train.errors import TrainingError


class DistributedError(LmforgeError):
    """The distributed environment is unusable (bad variables, no such GPU, cannot join the group)."""


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells each process."""

    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` of a torchrun worker, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, {os.environ.get('LOCAL_RANK')!r}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """True outside torchrun and on global rank 0 (the process that writes files and prints)."""
    env = dist_env()
    return env is None or env.rank == 0


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class ModelCalls:
    """The model as the loop calls it: ``wrapped`` is the DistributedDataParallel wrapper (the model itself
    in one process); ``train`` is what a training forward calls (compiled when asked), ``eval`` the bare
    model (evaluation runs eagerly: see :func:`~lmforge.train.compile.eager_calls`). ``how`` says how it was
    compiled (None: eager); ``undo`` restores a regionally compiled model's eager blocks."""

    wrapped: nn.Module
    train: nn.Module
    eval: nn.Module
    how: CompileHow | None = None
    undo: Callable[[], None] = _nothing


class Distributed:
    """This process's place in a data-parallel run; a no-op stand-in when ``world_size`` is 1."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: torch.device | None = None,
        owns_group: bool = False,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device or torch.device("cpu")
        self._owns_group = owns_group

    # --------------------------------------------------------------------------------- set up
    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = 1800.0) -> Distributed:
        """Join the process group torchrun describes (once per process), or a single-process stand-in.

        ``device`` is the resolved ``train.device``: a CUDA device becomes ``cuda:LOCAL_RANK`` and NCCL
        is used; anything else uses gloo.
        """
        env = dist_env()
        if env is None or env.world_size == 1:
            return cls(device=device)
        if device.type == "cuda":
            if env.local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK {env.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                    "start at most that many processes per node (--nproc-per-node)"
                )
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        owns = not tdist.is_initialized()
        if owns:
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise DistributedError(
                        f"WORLD_SIZE={env.world_size} but {var} is not set: start the run with torchrun"
                    )
            try:
                tdist.init_process_group(
                    backend=backend,
                    rank=env.rank,
                    world_size=env.world_size,
                    timeout=datetime.timedelta(seconds=timeout_s),
                    device_id=device if device.type == "cuda" else None,
                )
            except (RuntimeError, ValueError) as err:
                raise DistributedError(f"cannot join the {backend} process group as rank {env.rank}: {err}") from None
        elif tdist.get_world_size() != env.world_size or tdist.get_rank() != env.rank:
            raise DistributedError(
                f"the initialised process group (rank {tdist.get_rank()} of {tdist.get_world_size()}) does not match "
                f"RANK={env.rank}, WORLD_SIZE={env.world_size}"
            )
        return cls(env.rank, env.world_size, env.local_rank, device, owns_group=owns)

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self._owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------- queries
    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_same_start(self, step: int, out: Path) -> None:
        """Every rank must resume from the same checkpoint, or their collectives go out of step."""
        if not self.enabled:
            return
        starts = self.gather_object(step)
        if len(set(starts)) > 1:
            raise TrainingError(
                f"the processes start from different steps {starts} (by rank): every node must see the same "
                f"run directory {out} (put --out on a shared filesystem)"
            )

    # ---------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (writes caches, repairs the run directory); the others wait at a
        barrier and run it afterwards, reading what rank 0 left instead of racing it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        if not self.enabled:
            return values
        # float64 on the collective's device: gloo works on CPU tensors, NCCL on CUDA ones
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        tdist.all_reduce(t, op=op)
        return [float(v) for v in t.tolist()]

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, tdist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, tdist.ReduceOp.MAX)

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world_size

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (e.g. "my loss is finite")."""
        return not self.any_true(not flag)

    def any_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on some rank (e.g. "stop": SIGTERM, a callback)."""
        return self.max([1.0 if flag else 0.0])[0] > 0.5

    def gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def agree_on_stop(self, elapsed_s: float, terminate: bool) -> tuple[float, bool]:
        """The slowest rank's clock and "some rank got SIGTERM": the same stop decision on every rank
        (their clocks and signals differ)."""
        if not self.enabled:
            return elapsed_s, terminate
        elapsed, any_term = self.max([elapsed_s, float(terminate)])
        return elapsed, any_term > 0

    def reduce_step(self, model: nn.Module, full_batch: bool, loss_sum: float, rows: int,
                    finite: bool) -> tuple[float, int, bool]:
        """After a step's backward passes: full-batch GD sums each rank's share of the gradient and of the
        pass's loss (its chunks bypass the DDP reducer); every rank skips the step if any saw NaN/inf."""
        if not self.enabled:
            return loss_sum, rows, finite
        if full_batch:
            self.all_reduce_grads(model)
            loss_sum, n_rows = self.sum([loss_sum, float(rows)])
            rows = int(n_rows)
        return loss_sum, rows, self.all_true(finite)

    def all_reduce_grads(self, model: nn.Module) -> None:
        """Sum the gradients of ``model`` over ranks (for full-batch GD, which bypasses the DDP reducer)."""
        if not self.enabled:
            return
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)

    # ---------------------------------------------------------------------------- RNG states
    def rank_rng_states(self) -> list[dict[str, Any]] | None:
        """Every rank's RNG state, for rank 0's checkpoint (None in one process: its ``rng`` is enough)."""
        return self.gather_object(capture_rng_state()) if self.enabled else None

    def restore_rank_rng(self, trainer_state: dict[str, Any]) -> None:
        """This rank's RNG state from a checkpoint: data-parallel checkpoints hold every rank's; a rank
        without one (the run now has more processes) keeps its fresh seed."""
        rank_rngs = trainer_state.get("rng_ranks") or [trainer_state["rng"]]
        if self.rank < len(rank_rngs):
            restore_rng_state(rank_rngs[self.rank])

    # ------------------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (which also copies rank 0's weights to every rank)."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers of our models are constants (rope tables, masks): no need to broadcast them every forward
        # (newer torch renames the option and deprecates the old name)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync: dict[str, Any] = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **no_sync)

    def model_calls(self, model: nn.Module, compile: bool, full_batch: bool,
                    wrapped: nn.Module | None = None, how: CompileHow = "whole") -> ModelCalls:
        """The callables the loop trains and evaluates with. Evaluation calls the bare model, and so does
        full-batch GD under data-parallel (no collectives inside; GD all-reduces its gradients itself).
        ``compile`` compiles ``how`` (:mod:`lmforge.train.compile`): the wrapped model whole, or regionally
        (the blocks, in place, inside the DistributedDataParallel wrapper).
        ``wrapped``: the wrapper made earlier (switching an eager run to compiled keeps it)."""
        undo = _nothing
        if compile and how == "regional":
            _, undo = compile_for_training(model, "regional")
        wrapped = wrapped if wrapped is not None else self.wrap(model)
        fwd = compile_for_training(wrapped, "whole")[0] if compile and how == "whole" else wrapped
        return ModelCalls(
            wrapped=wrapped,
            train=model if self.enabled and full_batch else fwd,
            eval=model,
            how=how if compile else None,
            undo=undo,
        )

    def no_sync(self, wrapped: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient accumulation: only the last micro-batch's backward all-reduces the gradients."""
        if self.enabled and not last:
            return cast(DistributedDataParallel, wrapped).no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------ the data
    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of ``batch``: ``tensor_split`` into ``world_size`` near-equal parts (exactly
        ``[r*B, (r+1)*B)`` for a batch of ``B * world_size`` rows); may be empty for a short last batch."""
        if not self.enabled:
            return batch
        x, y = batch
        return x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]

    def shard_sampler(self, sampler: BlockSampler) -> BlockSampler | RankSlice:
        """``sampler`` draws the global batch; this rank keeps its rows (the sampler itself in one process)."""
        return RankSlice(sampler, self.rank, self.world_size) if self.enabled else sampler

    def shard_chunks(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Every ``world_size``-th batch, starting at this rank's (full-batch GD: ranks share the pass)."""
        for i, b in enumerate(batches):
            if i % self.world_size == self.rank:
                yield b


class RankSlice:
    """Rank ``r``'s part of a global :class:`~lmforge.data.BlockSampler`: the global sampler draws the
    batch of ``B * world_size`` blocks a single process with that batch size would; this rank gathers
    only blocks ``[r*B, (r+1)*B)``. ``state_dict``/``epoch`` are the global sampler's."""

    def __init__(self, sampler: BlockSampler, rank: int, world_size: int) -> None:
        if sampler.batch_size % world_size:
            raise ValueError(f"global batch {sampler.batch_size} is not divisible by {world_size} ranks")
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size
        self.batch_size = sampler.batch_size // world_size

    @property
    def epoch(self) -> float:
        return self.sampler.epoch

    def next_batch(self) -> Batch:
        """x, y: (B, block_size) int64 tensors, this rank's rows of the next global batch."""
        blocks: np.ndarray = self.sampler.next_blocks()
        mine = blocks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return gather_blocks(self.sampler.tokens, mine, self.sampler.block_size)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
