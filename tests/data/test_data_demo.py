"""The demo corpus: standard-library docstrings via ast, checked against the docstrings Python itself reports."""

from __future__ import annotations

import inspect
import json
import textwrap

from lmforge.data import demo_documents, read_documents
from lmforge.data.demo import docstrings, stdlib_dir, stdlib_sources


def test_docstrings_in_source_order():
    src = textwrap.dedent(
        '''
        """Module doc."""
        import os

        def f():
            """F doc.

                indented
            """
            def inner():
                "Inner doc."

        class C:
            """C doc."""
            async def m(self):
                """M doc."""
            x = "not a docstring"

        if os:
            def g():
                """G doc."""
        try:
            pass
        except Exception:
            def h():
                """H doc."""
        def nodoc():
            return "nope"
        '''
    )
    assert docstrings(src.encode()) == [
        "Module doc.",
        "F doc.\n\nindented",
        "Inner doc.",
        "C doc.",
        "M doc.",
        "G doc.",
        "H doc.",
    ]


def test_stdlib_sources_are_sorted_and_skip_tests():
    paths = stdlib_sources()
    rel = [p.relative_to(stdlib_dir()).as_posix() for p in paths]
    assert len(paths) > 200 and rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    assert "json/__init__.py" in rel


def test_demo_contains_real_docstrings_deterministically():
    docs = demo_documents()
    assert docs == demo_documents()
    assert len(docs) > 1000 and all(docs)
    total = sum(len(d.encode()) for d in docs)
    assert 500_000 < total <= 3_000_000 + max(len(d.encode()) for d in docs)
    # independent reference: the docstrings Python reports for imported modules
    for obj in (json, json.dumps, inspect.getmembers, textwrap.TextWrapper):
        assert inspect.cleandoc(obj.__doc__) in docs


def test_demo_cap_and_read_documents():
    small = demo_documents(max_bytes=20_000)
    full = demo_documents()
    assert small == full[: len(small)]
    assert sum(len(d.encode()) for d in small[:-1]) < 20_000 <= sum(len(d.encode()) for d in small)
    assert read_documents("demo").texts == full
    assert read_documents("demo", max_documents=3).texts == full[:3]
