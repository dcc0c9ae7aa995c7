"""``lmforge train``: a corpus -> a trained, checkpointed model."""

from __future__ import annotations

import argparse

from lmforge.cli import UserError, command, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a language model on a corpus",
                       description="Train a model. Any config field can be overridden as --section.field VALUE "
                                   "(e.g. --model.n_layer 4 --optim.lr 3e-3).")
    t.add_argument("--data", help="text file, folder, glob, .jsonl, hf:NAME[:CONFIG] or demo")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--config", help="YAML file with sections data/tokenizer/model/optim/schedule/train")
    t.add_argument("--sample", type=int, default=200, help="print a sample of N tokens from the best model (0: none)")
    t.add_argument("--prompt", default="\n", help="prompt of the sample")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; train.batch_size is per process)")


@command("train")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.cli.sample import print_sample
    from lmforge.runs import check_out_dir, claim_run_dir
    from lmforge.train.distributed import dist_env, is_main_process
    from lmforge.train.launch import launch
    from lmforge.train.loop import train

    cfg = config_from_args(args, overrides)
    if not cfg.data.path:
        raise UserError("no data: pass --data PATH|demo|hf:NAME")
    # data-parallel: --nproc N > 1 re-runs this command in N processes under torchrun's launcher
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and dist_env() is None:
        check_out_dir(args.out)  # refused here, not once per worker
        return launch(args.nproc, _worker_argv(args, overrides))
    # rank 0 writes the run directory, so it alone holds the lock
    with claim_run_dir(args.out, "train", writer=is_main_process()) as out:
        result = train(cfg, out)
        if args.sample > 0 and is_main_process() and (out / "best").exists():
            print_sample(out / "best", args.prompt, args.sample, cfg.train.seed)
    return 0 if result.step > 0 else 1


def _worker_argv(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """This command's arguments without ``--nproc`` (``--opt=value`` keeps values that start with ``-``)."""
    argv = ["train", f"--out={args.out}", f"--sample={args.sample}", f"--prompt={args.prompt}"]
    if args.data:
        argv.append(f"--data={args.data}")
    if args.config:
        argv.append(f"--config={args.config}")
    return argv + list(overrides)
