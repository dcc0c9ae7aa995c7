"""A scikit-learn estimator around lmforge's training loop: :class:`LanguageModelEstimator`.

``fit(texts)`` trains a small causal language model on a list of strings, ``score(texts)`` is minus its mean
next-token loss on other strings (greater is better, as scikit-learn's model selection expects) and
``predict(texts)`` continues each string. So scikit-learn's tools work on language models as written::

    from sklearn.model_selection import GridSearchCV, cross_val_score
    grid = {"learning_rate": [1e-3, 1e-2, 1e-1], "batch_size": [32, 64, 128], "num_layers": [1, 2, 3]}
    search = GridSearchCV(LanguageModelEstimator(), grid, cv=5, n_jobs=-1).fit(texts)
    search.best_params_, search.best_estimator_.predict(["Once upon a"])

Data path of ``fit``: the texts are split (seeded) into training and a small held-out validation part (the
loop's evaluation and its best checkpoint use it), a tokenizer is built from the training texts (``char``:
characters never seen map to ``<unk>`` later), each text is encoded with ``<|endoftext|>`` after it (as
:func:`lmforge.data.prepare_data` does) and the streams go to :func:`lmforge.train.loop.train` in memory;
its run directory is a temporary one, removed after training. The fitted model is the best validation
checkpoint.

Cheap by default (2 layers of width 32, 50 steps) so that a grid search over many candidates and folds
stays quick; in a joblib worker process torch uses one thread (``n_threads`` overrides), so ``n_jobs=-1``
does not oversubscribe the cores. The estimator and the fitted model pickle.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.config import RunConfig, build_config
from lmforge.data import PreparedData, Tokenizer
from lmforge.data.tokenizer import build_tokenizer
from lmforge.models import build_model
from lmforge.predict import GenerationConfig, generate_text
from lmforge.runs import best_checkpoint
from lmforge.train.loop import train

try:
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
except ImportError as err:  # pragma: no cover - the optional dependency is missing
    raise ImportError(f"lmforge.sklearn needs scikit-learn: pip install 'lmforge[sklearn]' ({err})") from None

__all__ = ["LanguageModelEstimator"]


class LanguageModelEstimator(BaseEstimator):
    """A causal language model as a scikit-learn estimator (see the module docstring).

    Parameters map onto lmforge's config: ``family`` (transformer, lstm, gru, rcnn), ``num_layers``
    (model.n_layer), ``d_model``, ``n_head`` (transformer), ``block_size`` (data.block_size), ``tokenizer``
    (char, byte, bpe), ``vocab_size`` (bpe), ``optimizer`` (optim.name), ``learning_rate``, ``weight_decay``,
    ``batch_size``, ``max_steps``, ``warmup_steps``, ``eval_interval`` (default: once at the end),
    ``dropout``, ``val_fraction`` (held-out part of the fit texts), ``seed``, ``device``, ``n_threads``
    (torch threads while fitting/scoring; None: 1 in a worker process, else unchanged), ``max_new_tokens``
    and ``temperature`` (``predict``; 0 = greedy), ``model_options`` (extra model config fields, a dict).
    """

    def __init__(
        self,
        *,
        family: str = "transformer",
        num_layers: int = 2,
        d_model: int = 32,
        n_head: int = 2,
        block_size: int = 32,
        tokenizer: str = "char",
        vocab_size: int = 512,
        optimizer: str = "adamw",
        learning_rate: float = 1e-2,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        max_steps: int = 50,
        warmup_steps: int = 0,
        eval_interval: int | None = None,
        dropout: float = 0.0,
        val_fraction: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
        n_threads: int | None = None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        model_options: dict[str, Any] | None = None,
    ) -> None:
        self.family = family
        self.num_layers = num_layers
        self.d_model = d_model
        self.n_head = n_head
        self.block_size = block_size
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.eval_interval = eval_interval
        self.dropout = dropout
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.n_threads = n_threads
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.model_options = model_options

    # ------------------------------------------------------------------------------------- config
    def _config(self) -> RunConfig:
        """The validated :class:`lmforge.config.RunConfig` of the current parameters (ConfigError, a
        ValueError, names a bad one)."""
        model: dict[str, Any] = {
            "family": self.family,
            "n_layer": self.num_layers,
            "d_model": self.d_model,
            "dropout": self.dropout,
        }
        if self.family == "transformer":
            model["n_head"] = self.n_head
        model.update(self.model_options or {})
        steps = int(self.max_steps)
        return build_config(
            {
                "data": {"block_size": self.block_size},
                "tokenizer": {"kind": self.tokenizer, "vocab_size": self.vocab_size},
                "model": model,
                "optim": {"name": self.optimizer, "lr": self.learning_rate, "weight_decay": self.weight_decay},
                "schedule": {"name": "cosine" if steps > 1 else "constant", "warmup_steps": self.warmup_steps},
                "train": {
                    "batch_size": self.batch_size,
                    "max_steps": steps,
                    "eval_interval": self.eval_interval or steps,
                    "eval_batches": 8,
                    "keep_last": 1,
                    "seed": self.seed,
                    "device": self.device,
                    "progress": False,
                },
            }
        )

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, X: Sequence[str], y: Any = None) -> LanguageModelEstimator:
        """Train on the strings ``X`` (``y`` is ignored: language modelling needs no labels)."""
        texts = _texts(X, "fit")
        cfg = self._config()
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction = {self.val_fraction!r}: must be in (0, 1)")
        train_texts, val_texts = _split(texts, self.val_fraction, self.seed)
        tok = build_tokenizer(cfg.tokenizer, train_texts)
        block = cfg.data.block_size
        train_ids = _stream(tok, train_texts, block + 1)
        val_ids = _stream(tok, val_texts, block + 1)
        data = PreparedData(
            train=train_ids,
            val=val_ids,
            tokenizer=tok,
            stats={"n_docs_train": len(train_texts), "n_docs_val": len(val_texts)},
        )

        with self._threads(), _keep_global_rng(), tempfile.TemporaryDirectory(prefix="lmforge-sklearn-") as tmp:
            model = build_model(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len)
            result = train(cfg, tmp, data=data, model=model, tokenizer=tok, verbose=False)
            best = best_checkpoint(tmp)
            if best is not None:  # the loop evaluates at least at the end, so this is the rule
                model.load_state_dict(best.state_dict)
        model.to("cpu").eval()
        self.model_ = model
        self.tokenizer_ = tok
        self.config_ = cfg.model_copy(update={"model": model.config})
        self.history_ = result.history
        self.best_val_loss_ = result.best_val_loss
        self.n_train_tokens_ = int(len(train_ids))
        return self

    # ---------------------------------------------------------------------------------------- score
    def score(self, X: Sequence[str], y: Any = None) -> float:
        """Minus the mean next-token cross-entropy (nats per token) of the strings ``X``: each text is
        scored after an end-of-text token, its own end-of-text included, in windows of ``block_size``."""
        return -self.loss(X)

    def loss(self, X: Sequence[str]) -> float:
        """Mean next-token cross-entropy of ``X`` (what :meth:`score` negates)."""
        self._check_fitted()
        texts = _texts(X, "score")
        tok = self.tokenizer_
        ids = np.concatenate([np.array([tok.eot_id], dtype=np.int64), _stream(tok, texts, 0)])
        block = int(self.config_.data.block_size)
        total, count = 0.0, 0
        with self._threads(), torch.no_grad():
            # non-overlapping windows: every token but the first is predicted exactly once
            for x, y_ in _windows(ids, block):
                _, loss = self.model_(x, y_)
                total += float(loss) * y_.numel()
                count += y_.numel()
        return total / count

    # -------------------------------------------------------------------------------------- predict
    def predict(self, X: Sequence[str]) -> np.ndarray:
        """A continuation of ``max_new_tokens`` tokens for every string of ``X`` (an object array of str;
        greedy when ``temperature`` is 0, else sampled with ``seed``). A transformer sees at most
        ``block_size`` tokens: there the continuation takes at most half of them and the prompt keeps its
        last tokens in the rest."""
        self._check_fitted()
        texts = _texts(X, "predict")
        tok = self.tokenizer_
        sample = self.temperature > 0
        n = int(self.max_new_tokens)
        max_len = getattr(self.model_, "max_seq_len", None)
        if max_len:
            n = max(1, min(n, max_len // 2))
        gen = GenerationConfig(
            max_new_tokens=n,
            do_sample=sample,
            temperature=self.temperature if sample else 1.0,
            seed=self.seed if sample else None,
            truncate_prompt=True,
        )
        with self._threads(), torch.inference_mode():
            out = generate_text(self.model_, tok, [tok.eot_token + t for t in texts], gen)
        return np.array([o[0] for o in out], dtype=object)

    # -------------------------------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(texts) first")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch threads for this call: ``n_threads``, or 1 inside a worker process (joblib, multiprocessing)
        where the parent already runs one job per core; restored afterwards."""
        n = self.n_threads
        if n is None and multiprocessing.parent_process() is not None:
            n = 1
        if n is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(n)))
        try:
            yield
        finally:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ data
def _texts(X: Any, where: str) -> list[str]:
    if isinstance(X, str):
        raise ValueError(f"{where}: expected a list of strings, got one string; wrap it in a list")
    try:
        texts = list(X)
    except TypeError:
        raise ValueError(f"{where}: expected a list of strings, got {type(X).__name__}") from None
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: item {bad} is a {type(texts[bad]).__name__}, not a string")
    if not texts or not any(texts):
        raise ValueError(f"{where}: no text (an empty list or only empty strings)")
    return texts


def _split(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded hold-out of ``val_fraction`` of the texts (at least one each side); one text is cut."""
    if len(texts) == 1:
        cut = int(len(texts[0]) * (1 - val_fraction))
        return [texts[0][:cut]], [texts[0][cut:]]
    n_val = max(1, min(len(texts) - 1, round(len(texts) * val_fraction)))
    order = np.random.default_rng(seed).permutation(len(texts))
    held = set(order[:n_val].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def _stream(tok: Tokenizer, texts: list[str], min_len: int) -> np.ndarray:
    """The texts' ids, each followed by end-of-text; repeated cyclically up to ``min_len`` ids when shorter
    (a handful of short texts still fills one training block)."""
    ids = np.concatenate([np.append(np.asarray(a, dtype=np.int64), tok.eot_id) for a in tok.encode_arrays(texts)])
    if len(ids) < min_len:
        ids = np.resize(ids, min_len)
    return ids


def _windows(ids: np.ndarray, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors of consecutive non-overlapping windows of at most ``block`` predictions; full windows
    are batched together, the remainder comes last."""
    n = len(ids) - 1  # predictions
    full = n // block
    if full:
        x = torch.from_numpy(ids[: full * block].reshape(full, block).copy())
        y = torch.from_numpy(ids[1 : full * block + 1].reshape(full, block).copy())
        for i in range(0, full, 64):
            yield x[i : i + 64], y[i : i + 64]
    rest = n - full * block
    if rest:
        start = full * block
        yield (
            torch.from_numpy(ids[start : start + rest].copy())[None],
            torch.from_numpy(ids[start + 1 : start + rest + 1].copy())[None],
        )


@contextlib.contextmanager
def _keep_global_rng() -> Iterator[None]:
    """The training loop seeds python, numpy and torch globally; give the caller's generators back."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
