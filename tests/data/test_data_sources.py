"""read_documents: every input kind, deterministic order, and every user error as a one-line DataError."""

from __future__ import annotations

import json

import pytest

from lmforge.data import DataError, read_documents


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_text_file_is_one_document_exactly(tmp_path):
    text = "line one\r\nline two\n\n  indented\ttab é 😀\n"
    f = write(tmp_path / "a.txt", text)
    docs = read_documents(str(f))
    assert docs.texts == [text]
    assert docs.files == 1 and docs.replaced_chars == 0


def test_bom_is_dropped(tmp_path):
    f = write(tmp_path / "a.txt", b"\xef\xbb\xbfhello")
    assert read_documents(str(f)).texts == ["hello"]


def test_folder_recursive_sorted_skips_hidden_and_binary(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a.md", "A")
    write(tmp_path / "sub" / "c" / "z.txt", "Z")
    write(tmp_path / "sub" / "notes", "N")  # no extension: still a text file
    write(tmp_path / "a0.rst", "A0")
    write(tmp_path / ".hidden.txt", "H")
    write(tmp_path / ".git" / "config", "G")
    write(tmp_path / "img.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path / "empty.txt", "")
    docs = read_documents(str(tmp_path))
    # relative posix paths sorted: a.md, a0.rst, b.txt, empty.txt (dropped), sub/c/z.txt, sub/notes
    assert docs.texts == ["A", "A0", "B", "Z", "N"]
    assert docs.skipped_files == [str(tmp_path / "img.png")]
    assert docs.empty_documents == 1


def test_glob_sorted_and_recursive(tmp_path):
    write(tmp_path / "x" / "2.txt", "two")
    write(tmp_path / "x" / "1.txt", "one")
    write(tmp_path / "x" / "deep" / "3.txt", "three")
    write(tmp_path / "x" / "skip.md", "md")
    assert read_documents(str(tmp_path / "x" / "*.txt")).texts == ["one", "two"]
    assert read_documents(str(tmp_path / "x" / "**" / "*.txt")).texts == ["one", "two", "three"]


def test_glob_without_match(tmp_path):
    with pytest.raises(DataError, match=r"no files match the pattern .*\*\.txt"):
        read_documents(str(tmp_path / "*.txt"))


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="no such file or directory") as e:
        read_documents(str(missing))
    assert str(missing) in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no text files found"):
        read_documents(str(tmp_path / "d"))


def test_jsonl_one_document_per_line(tmp_path):
    rows = [{"text": "first\nwith newline", "id": 1}, {"text": "second \u2028 sep"}, {"body": "x", "text": "third"}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert read_documents(str(f)).texts == [r["text"] for r in rows]


def test_jsonl_custom_field(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"content": "a"}\n{"content": "b"}\n')
    assert read_documents(str(f), text_field="content").texts == ["a", "b"]


def test_jsonl_in_folder_is_parsed(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "j1"}\n{"text": "j2"}\n')
    write(tmp_path / "b.txt", "plain")
    assert read_documents(str(tmp_path)).texts == ["j1", "j2", "plain"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"d\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n{"other": "x"}\n', r"d\.jsonl:3: no field 'text' \(data\.text_field\)"),
        ('{"text": 5}\n', r"d\.jsonl:1: field 'text' must be a string"),
        ('["text"]\n', r"d\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern):
    f = write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError, match=pattern):
        read_documents(str(f))


def test_invalid_utf8_strict_reports_byte_offset_and_line(tmp_path):
    raw = "héllo\nwörld\n".encode() + b"ab\xffcd\n"
    offset = raw.index(b"\xff")
    f = write(tmp_path / "bad.txt", raw)
    with pytest.raises(DataError) as e:
        read_documents(str(f))
    msg = str(e.value)
    assert str(f) in msg and f"byte offset {offset} " in msg and "(line 3)" in msg
    assert "encoding_errors" in msg and "\n" not in msg


def test_invalid_utf8_offset_counts_the_bom(tmp_path):
    raw = b"\xef\xbb\xbfab\xc3"
    f = write(tmp_path / "bad.txt", raw)
    with pytest.raises(DataError, match="byte offset 5 "):
        read_documents(str(f))


def test_invalid_utf8_replace_counts(tmp_path):
    # three invalid sequences (a lone continuation byte, a truncated 2-byte sequence, a bad start byte),
    # plus a genuine U+FFFD that must not be counted
    raw = b"a\x80b" + b"\xc3" + b"c\xffd" + "\ufffd ok".encode()
    f = write(tmp_path / "bad.txt", raw)
    docs = read_documents(str(f), encoding_errors="replace")
    assert docs.texts == ["a\ufffdb\ufffdc\ufffdd\ufffd ok"]
    assert docs.replaced_chars == 3


def test_max_documents(tmp_path):
    for i in range(5):
        write(tmp_path / f"{i}.txt", f"doc {i}")
    assert read_documents(str(tmp_path), max_documents=2).texts == ["doc 0", "doc 1"]
    f = write(tmp_path / "x" / "d.jsonl", "".join(json.dumps({"text": str(i)}) + "\n" for i in range(9)))
    assert read_documents(str(f), max_documents=3).texts == ["0", "1", "2"]


# ----------------------------------------------------------------------------- Hugging Face datasets
@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    datasets.disable_progress_bars()
    return datasets


def test_hf_saved_dataset(tmp_path, hf_datasets):
    ds = hf_datasets.Dataset.from_dict({"text": ["row one", "", "row three", None], "n": [1, 2, 3, 4]})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs = read_documents(f"hf:{tmp_path / 'saved'}")
    assert docs.texts == ["row one", "row three"]
    assert docs.empty_documents == 2


def test_hf_saved_dataset_dict_split_and_field(tmp_path, hf_datasets):
    dd = hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_dict({"body": ["t1", "t2"]}),
            "validation": hf_datasets.Dataset.from_dict({"body": ["v1"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_documents(f"hf:{tmp_path / 'dd'}", text_field="body").texts == ["t1", "t2"]
    assert read_documents(f"hf:{tmp_path / 'dd'}", text_field="body", hf_split="validation").texts == ["v1"]
    with pytest.raises(DataError, match=r"no split 'test' \(data\.hf_split\)"):
        read_documents(f"hf:{tmp_path / 'dd'}", text_field="body", hf_split="test")
    with pytest.raises(DataError, match=r"no column 'text' \(data\.text_field\); columns are \['body'\]"):
        read_documents(f"hf:{tmp_path / 'dd'}")


def test_hf_load_dataset_local_folder(tmp_path, hf_datasets):
    write(tmp_path / "raw" / "data.jsonl", '{"text": "a b"}\n{"text": "c d"}\n')
    assert read_documents(f"hf:{tmp_path / 'raw'}").texts == ["a b", "c d"]


def test_hf_unreachable_dataset_is_a_data_error(hf_datasets):
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'hf:no_such_dataset_lmforge'"):
        read_documents("hf:no_such_dataset_lmforge")


def test_hf_spec_parsing():
    from lmforge.data.sources import parse_hf_spec

    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    assert parse_hf_spec("hf:user/name") == ("user/name", None)
    with pytest.raises(DataError):
        parse_hf_spec("hf:")
