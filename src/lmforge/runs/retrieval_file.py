"""``retrieval.json``: the retrieval index a task model's prompts were built with (its training records'
input and output, ``k``), beside its ``generation_config.json`` in the model directory. ``lmforge eval``
and ``lmforge tune --task`` read it to build the prompts the model was trained on
(:mod:`lmforge.data.retrieval`); a model without the file was trained without retrieved examples."""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_write_json, read_json_object
from lmforge.config import LmforgeError
from lmforge.data.retrieval import RetrievalIndex
from lmforge.data.tasks import TaskDataError
from lmforge.runs.checkpoint import BEST_DIR

RETRIEVAL_FILE = "retrieval.json"


class RetrievalFileError(LmforgeError, ValueError):
    """A ``retrieval.json`` that cannot be read (the message names the file)."""


def find_retrieval_file(model_dir: str | Path) -> Path | None:
    """The ``retrieval.json`` of a model: in ``model_dir``, else in its ``best/`` (a run directory)."""
    p = Path(model_dir).expanduser()
    for f in (p / RETRIEVAL_FILE, p / BEST_DIR / RETRIEVAL_FILE):
        if f.is_file():
            return f
    return None


def load_retrieval(model_dir: str | Path) -> RetrievalIndex | None:
    """The index of ``model_dir``'s model, or None when it has no ``retrieval.json``."""
    f = find_retrieval_file(model_dir)
    if f is None:
        return None
    d = read_json_object(f, RetrievalFileError)
    try:
        return RetrievalIndex.from_dict(d, str(f))
    except TaskDataError as err:
        raise RetrievalFileError(str(err)) from None


def save_retrieval(model_dir: str | Path, index: RetrievalIndex | None) -> Path | None:
    """Write ``MODEL_DIR/retrieval.json`` (``index`` None: remove it: the model uses no retrieval)."""
    f = Path(model_dir) / RETRIEVAL_FILE
    if index is None:
        f.unlink(missing_ok=True)
        return None
    atomic_write_json(f, index.to_dict())
    return f
