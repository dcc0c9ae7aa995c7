"""Recipe check: nanoGPT's published CPU recipe on Tiny Shakespeare, trained by ``lmforge train``.

Character level, 90/10 split; 4 layers, 4 heads, width 128, block 64, batch 12, AdamW lr 1e-3, cosine to
1e-4 over 2000 iterations, warmup 100, beta2 0.99, dropout 0. nanoGPT's README reports val loss 1.88;
the goal is <= 1.90. The final validation loss is measured over the whole validation split.

    python benchmarks/recipe_nanogpt.py [--data ../shared/data/tinyshakespeare.txt] [--out runs/recipe]

Prints a table, then one machine-readable line starting with ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

RECIPE = [
    "--tokenizer.kind", "char", "--data.block_size", "64", "--data.val_fraction", "0.1",
    "--model.family", "transformer", "--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128",
    "--model.dropout", "0.0",
    "--optim.name", "adamw", "--optim.lr", "1e-3", "--optim.beta2", "0.99", "--optim.weight_decay", "0.1",
    "--optim.grad_clip", "1.0",
    "--schedule.name", "cosine", "--schedule.warmup_steps", "100", "--schedule.min_lr", "1e-4",
    "--train.batch_size", "12", "--train.max_steps", "2000", "--train.eval_interval", "250",
    "--train.eval_batches", "20", "--train.seed", "1337",
]


def default_data() -> str:
    here = Path(__file__).resolve().parent.parent
    return str(here.parent / "shared" / "data" / "tinyshakespeare.txt")


def run_recipe(data: str, out: str, extra: list[str] | None = None, verbose: bool = True) -> dict:
    """Train the recipe; return final full-validation loss and wall time."""
    import math

    from lmforge.config import load_config
    from lmforge.data import eval_batches, prepare_data
    from lmforge.runs import load_model
    from lmforge.train.loop import evaluate_loss, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(overrides=["--data.path", data, *RECIPE, *(extra or [])])
    t0 = time.perf_counter()
    result = train(cfg, out, verbose=verbose)
    wall = time.perf_counter() - t0
    model, tok, cfg2 = load_model(Path(out) / "best")
    data_ = prepare_data(cfg2, tok)
    n_blocks = max(1, (len(data_.val) - 1) // 64)
    full_val, _ = evaluate_loss(model, eval_batches(data_.val, 64, 64, math.ceil(n_blocks / 64)), __import__("torch").device("cpu"))
    return {"val_loss_full": full_val, "val_loss_eval": result.best_val_loss, "wall_s": wall,
            "steps": result.step, "tokens": result.tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--out", default="runs/bench-recipe")
    args = ap.parse_args()
    r = run_recipe(args.data, args.out)
    print(f"{'run':<22} {'val loss (full val)':>20} {'val loss (20 batches)':>22} {'wall s':>8}")
    print(f"{'lmforge nanoGPT recipe':<22} {r['val_loss_full']:>20.4f} {r['val_loss_eval']:>22.4f} {r['wall_s']:>8.1f}")
    print(f"nanoGPT README reports 1.88; goal <= 1.90: {'PASS' if r['val_loss_full'] <= 1.90 else 'FAIL'}")
    print("RESULT " + json.dumps({"bench": "recipe_nanogpt", **{k: round(v, 4) if isinstance(v, float) else v
                                                               for k, v in r.items()}}))


if __name__ == "__main__":
    main()
