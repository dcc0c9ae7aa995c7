"""``lmforge train --nproc N``: start N local data-parallel workers with torchrun's launcher.

Apart from :mod:`lmforge.train.distributed` (what each worker does) because only the CLI launches, and
torchrun's launcher modules take a noticeable moment to import.
"""

from __future__ import annotations

import signal

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from lmforge.train.distributed import DistributedError


def launch(nproc: int, module_args: list[str]) -> int:
    """Run ``python -m lmforge MODULE_ARGS`` in ``nproc`` local processes with torchrun's launcher
    (a standalone rendezvous on a free port) and return the exit status: 0, or the first failed
    worker's (its error is already printed on stderr).

    SIGTERM/SIGINT reach the launcher, which passes SIGTERM on to the workers (they finish the step,
    save a checkpoint and exit) and kills them after 30 s; SIGTERM then exits 0, as a single process does.
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    args = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "lmforge", *module_args])
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:
        return 0 if err.sigval == signal.SIGTERM else 128 + int(err.sigval)
    return 0
