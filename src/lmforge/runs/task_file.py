"""``task.json``: what a fine-tuned run was trained for (task, fields, prompt format), read by eval/serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json, read_json_object
from lmforge.config import LmforgeError
from lmforge.data.chat_template import write_chat_template

TASK_FILE = "task.json"


class TaskFileError(LmforgeError, ValueError):
    """A ``task.json`` that cannot be read or is not a JSON object."""


def task_file_path(model_dir: str | Path) -> Path | None:
    """The ``task.json`` of a fine-tuned run: in ``model_dir`` or the run directory above a checkpoint."""
    p = Path(model_dir)
    for d in (p, p.parent, p.parent.parent):
        if (d / TASK_FILE).is_file():
            return d / TASK_FILE
    return None


def read_task_file(model_dir: str | Path) -> dict[str, Any]:
    """The task record of ``model_dir``'s run (``{}`` for a model that was not fine-tuned for a task)."""
    path = task_file_path(model_dir)
    if path is None:
        return {}
    return read_json_object(path, TaskFileError)


def write_task_file(out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``OUT/task.json``; a ``chat`` run also gets its chat template (``OUT/tokenizer_config.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / TASK_FILE, info)
    if info.get("task") == "chat":
        write_chat_template(out)
    return out / TASK_FILE
