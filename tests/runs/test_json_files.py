"""The model directory's JSON files (generation_config.json, task.json, retrieval.json, tokenizer_config.json)
are read with one rule: a missing object, bad JSON or undecodable bytes raise the file's own error class with a
one-line message naming the file."""

from __future__ import annotations

import pytest

from lmforge.atomic import read_json_object
from lmforge.predict.generation_config import GENERATION_CONFIG_FILE, GenerationDefaultsError, load_generation_defaults
from lmforge.runs.retrieval_file import RETRIEVAL_FILE, RetrievalFileError, load_retrieval
from lmforge.runs.task_file import TASK_FILE, TaskFileError, read_task_file


class Bad(ValueError):
    pass


@pytest.mark.parametrize(
    ("content", "says"),
    [(b'{"a": 1}', None), (b"[1, 2]", "expected a JSON object, got list"), (b"{oops", "cannot read"),
     (b"\xff\xfe\x00", "cannot read")],
)  # fmt: skip
def test_read_json_object(tmp_path, content, says):
    f = tmp_path / "x.json"
    f.write_bytes(content)
    if says is None:
        assert read_json_object(f, Bad) == {"a": 1}
        return
    with pytest.raises(Bad, match=says) as err:
        read_json_object(f, Bad)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_each_model_file_names_itself_when_corrupt(tmp_path):
    (tmp_path / GENERATION_CONFIG_FILE).write_text("[]", encoding="utf-8")
    with pytest.raises(GenerationDefaultsError, match=GENERATION_CONFIG_FILE):
        load_generation_defaults(tmp_path)
    (tmp_path / RETRIEVAL_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(RetrievalFileError, match=RETRIEVAL_FILE):
        load_retrieval(tmp_path)
    (tmp_path / TASK_FILE).write_text("3", encoding="utf-8")
    with pytest.raises(TaskFileError, match=TASK_FILE):
        read_task_file(tmp_path)
