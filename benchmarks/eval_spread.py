"""How many fixed validation blocks a trial's evaluation needs: the spread of the estimate with n blocks.

Trains two small models on the demo corpus (2 layers, width 64, 150 steps, learning rates 3e-3 and 1e-3),
scores up to 1,024 evenly spread validation blocks of 64 tokens, and prints, for n = 16, 32, 64 evenly spread
blocks, the standard deviation over the grid's offsets of one model's mean loss and of the difference between
the two models on the same blocks (search trials are compared on the same blocks). The numbers behind
``lmforge.search.objective.MIN_EVAL_BLOCKS``; the corpus is not the one ``trial_overhead.py`` searches.

    python benchmarks/eval_spread.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.data import prepare_data
from lmforge.data.sampler import eval_batches
from lmforge.runs import load_model
from lmforge.train.loop import train


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lmforge-eval-spread-"))

    def cfg(seed: int, lr: float):
        return load_config(overrides=[
            "--data.path", "demo", "--data.cache_dir", str(work / "cache"), "--tokenizer.kind", "char",
            "--data.block_size", "64", "--model.n_layer", "2", "--model.d_model", "64", "--model.n_head", "2",
            "--train.batch_size", "12", "--train.max_steps", "150", "--train.eval_interval", "150",
            "--train.progress", "false", "--train.seed", str(seed), "--optim.lr", str(lr), "--train.compile", "false"])

    per_block = []
    blocks = eval_batches(prepare_data(cfg(0, 1e-3)).val, 64, 16, 64)
    for i, lr in enumerate((3e-3, 1e-3)):
        train(cfg(i, lr), work / f"model-{i}", verbose=False)
        model, _, _ = load_model(work / f"model-{i}" / "best")
        model.eval()
        with torch.inference_mode():
            losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
                      for x, y in blocks]
        per_block.append(torch.cat(losses).numpy())
    a, b = per_block
    n_all = len(a)
    print(f"{n_all} blocks; mean losses {a.mean():.4f} / {b.mean():.4f}; difference {a.mean() - b.mean():.4f}")
    for n in (16, 32, 64):
        grids = [((np.arange(n) * n_all) // n + o) % n_all for o in range(n_all // n)]
        one = np.std([a[g].mean() for g in grids])
        diff = np.std([(a[g] - b[g]).mean() for g in grids])
        print(f"n={n:>3}: sd of one model's estimate {one:.4f}; sd of the paired difference {diff:.4f}")


if __name__ == "__main__":
    main()
