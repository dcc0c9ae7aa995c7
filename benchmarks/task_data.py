"""Real-text records for ``benchmarks/task_pipeline.py``, built from data that ships with this machine.

- translation (en -> de): the German gettext catalogues ``/usr/share/locale/de/LC_MESSAGES/*.mo`` of the
  installed software (the ``iso_*`` catalogues of country/language names are left out). Kept: one-line
  messages of 2-12 words with letters, no format directives (``%s``, ``{0}``, ``$VAR``), no tabs and no
  command-line option help (``--flag  text``); deduplicated by source text (first catalogue wins, in
  sorted order).
- summarization: the installed manual pages ``/usr/share/man/man[1-8]`` (English). Document: the first
  paragraph(s) of the DESCRIPTION section (at least 25 words, at most 120), read from the roff source
  with a small macro/escape stripper (``man`` and ``mdoc`` pages); summary: the NAME line's one-line
  description (``ls \\- list directory contents`` -> ``list directory contents``). At most
  ``MAX_PER_PACKAGE`` pages per package (google-cloud-cli alone ships 16,000 generated pages).
- classification: Debian bookworm's package index (``/var/lib/apt/lists/*_Packages.lz4``, read with
  ``apt-helper cat-file``): the one-line ``Description`` -> the package's ``Section`` (the component
  prefix ``contrib/``/``non-free/`` dropped), for the 12 most frequent sections; deduplicated by package
  name and by description text.

Records are sorted, then split with ``numpy.random.default_rng(seed)`` into ``n_test`` test records and
at most ``n_train`` training records, and cached as ``benchmarks/.data/TASK-sSEED-NTRAIN-NTEST/
{train,test}.jsonl`` with ``info.json`` (sizes, where the text came from: packages and their licences as
their ``/usr/share/doc/PKG/copyright`` states them).

    python benchmarks/task_data.py [--task translation] [--n-train 6000] [--n-test 300]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import struct
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / ".data"
TASKS = ("summarization", "translation", "classification")
DEFAULT_SIZES = {"summarization": (4000, 300), "translation": (6000, 300), "classification": (8000, 500)}
MAX_PER_PACKAGE = 300
N_SECTIONS = 12

Record = dict[str, str]


# ------------------------------------------------------------------------------------ provenance
def _package_index(prefixes: tuple[str, ...]) -> dict[str, str]:
    """Installed file path -> its Debian package (from ``/var/lib/dpkg/info/*.list``)."""
    owner: dict[str, str] = {}
    for lst in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
        pkg = Path(lst).stem.split(":")[0]
        for line in Path(lst).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(prefixes):
                owner.setdefault(line, pkg)
    return owner


def licence_of(package: str) -> str:
    """The licences a package's ``copyright`` file names (most frequent first), e.g. ``GPL-3+, ISC``."""
    path = Path("/usr/share/doc") / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    names = Counter(m.group(1).strip() for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)$", text, re.M))
    names.pop("other", None)
    if names:
        return ", ".join(n for n, _ in names.most_common(3))
    prose = [
        ("Lesser General Public License", "LGPL"),
        ("GNU General Public License", "GPL"),
        ("Apache License", "Apache-2.0"),
        ("Permission is hereby granted, free of charge", "MIT/X11"),
        ("BSD", "BSD"),
    ]
    flat = " ".join(text.split())
    found = [name for pat, name in prose if pat in flat]
    return ", ".join(found) + " (named in prose)" if found else "unknown"


def _sources(counts: Counter[str]) -> list[dict[str, Any]]:
    return [{"package": p, "records": n, "licence": licence_of(p)} for p, n in counts.most_common()]


# ----------------------------------------------------------------------------------- translation
def read_mo(path: str | Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a gettext ``.mo`` file, decoded with the charset its header names;
    plural and context entries come back as they are stored (with NUL / EOT separators)."""
    data = Path(path).read_bytes()
    order = "<" if struct.unpack("<I", data[:4])[0] == 0x950412DE else ">"
    _, n, orig, trans = struct.unpack(order + "4I", data[4:20])
    raw = []
    for i in range(n):
        ol, oo = struct.unpack(order + "2I", data[orig + 8 * i : orig + 8 * i + 8])
        tl, to = struct.unpack(order + "2I", data[trans + 8 * i : trans + 8 * i + 8])
        raw.append((data[oo : oo + ol], data[to : to + tl]))
    header = dict(raw).get(b"", b"")
    m = re.search(rb"charset=([-\w]+)", header)
    charset = m.group(1).decode("ascii") if m else "utf-8"
    out = []
    for k, v in raw:
        if not k:
            continue
        try:
            out.append((k.decode(charset), v.decode(charset)))
        except (UnicodeDecodeError, LookupError):
            continue
    return out


_FORMAT = re.compile(r"%[-+ #0-9.*$'lhqjztL]*[a-zA-Z%]|\{[^}]*\}|\$\{?[A-Za-z_]|<[a-z/][^>]*>|&[a-z]+;|\\")


def _good_message(text: str) -> bool:
    words = text.split()
    return (
        "\n" not in text.strip()
        and "\t" not in text
        and 2 <= len(words) <= 12
        and len(text) <= 80
        and not _FORMAT.search(text)
        and not text.lstrip().startswith("-")
        and sum(c.isalpha() for c in text) >= 0.6 * len(text.replace(" ", ""))
        and "_" not in text
    )


def translation_records() -> tuple[list[Record], dict[str, Any]]:
    files = sorted(f for f in glob.glob("/usr/share/locale/de/LC_MESSAGES/*.mo") if not Path(f).name.startswith("iso_"))
    owner = _package_index(("/usr/share/locale/de/LC_MESSAGES/",))
    seen: dict[str, Record] = {}
    counts: Counter[str] = Counter()
    for f in files:
        pkg = owner.get(f, Path(f).stem)
        for src, tgt in read_mo(f):
            if "\x00" in src or "\x04" in src or "\x00" in tgt:
                continue
            src, tgt = src.strip(), tgt.strip()
            if not tgt or src in seen or not _good_message(src) or not _good_message(tgt):
                continue
            seen[src] = {"source": src, "target": tgt}
            counts[pkg] += 1
    info = {
        "name": "German gettext catalogues of the installed packages (/usr/share/locale/de/LC_MESSAGES/*.mo)",
        "catalogues": len(files),
        "sources": _sources(counts),
    }
    return sorted(seen.values(), key=lambda r: r["source"]), info


# --------------------------------------------------------------------------------- summarization
_ESCAPES = [
    (re.compile(r'\\".*'), ""),  # comment to end of line
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[-+]?\d+"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\[kznwhvlLbo]'[^']*'"), ""),  # motions and friends with an argument
    (re.compile(r"\\\((aq|cq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((em|en|hy|mi)"), "-"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(co"), "(c)"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&|^c%:)/,!{}]"), ""),
    (re.compile(r"\\(.)"), r"\1"),
]
_TEXT_MACROS = {"B", "I", "SM", "SB", "Nm", "Ar", "Pa", "Em", "Sy", "Li", "Cm", "Ev", "Va", "Dv", "Fn", "Ql"}
_ALT_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}
_BREAK_MACROS = {"PP", "P", "LP", "TP", "IP", "HP", "Pp", "Bl", "It", "sp", "RS", "nf", "Bd", "SS", "Ss", "TQ"}
_LIST_MACROS = {"TP", "IP", "HP", "Bl", "It", "nf", "Bd", "SS", "Ss", "TQ"}
_MDOC_QUOTES = {"Dq": '"', "Do": '"', "Qq": '"', "Sq": "'", "Pq": "("}


def _unescape(text: str) -> str:
    for pat, rep in _ESCAPES:
        text = pat.sub(rep, text)
    return text


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) >= 2 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def _roff_lines(source: str) -> Iterable[tuple[str | None, str]]:
    """(macro or None, text) per input line: text of a text line or of a font/mdoc macro's arguments."""
    for line in source.splitlines():
        if line.startswith((".", "'")):
            m = re.match(r"[.'][ \t]*(\S+)[ \t]*(.*)", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in _ALT_MACROS:
                yield name, "".join(_unescape(a) for a in _macro_args(rest))
            elif name in _TEXT_MACROS or name in _MDOC_QUOTES or name in ("Nd", "SH", "Sh", "Xr", "Fl"):
                args = [_unescape(a) for a in _macro_args(rest)]
                if name == "Xr" and len(args) >= 2:
                    args = [f"{args[0]}({args[1]})", *args[2:]]
                elif name == "Fl":
                    args = ["-" + args[0], *args[1:]] if args else ["-"]
                elif name in _MDOC_QUOTES:
                    q = _MDOC_QUOTES[name]
                    args = [q + " ".join(args) + (")" if q == "(" else q)]
                yield name, " ".join(args)
            else:
                yield name, ""
        else:
            yield None, _unescape(line)


def _read_man(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_man(source: str) -> tuple[str, str] | None:
    """(description text, NAME summary) of a manual page's roff source, or None when it has neither."""
    if re.match(r"\s*\.so\s", source):
        return None
    section = ""
    name_text: list[str] = []
    nd: str | None = None
    paragraphs: list[list[str]] = [[]]
    done = False
    page_name = ""
    for macro, text in _roff_lines(source):
        if macro == "Nm":  # mdoc: the page's name, given once in NAME
            page_name = page_name or text.split(" ")[0]
            text = text or page_name
        if macro in ("SH", "Sh"):
            section = text.strip().strip('"').upper()
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        if section == "NAME":
            if macro == "Nd":
                nd = text
            elif text:
                name_text.append(text)
        elif section == "DESCRIPTION" and not done:
            if macro in _BREAK_MACROS:
                if paragraphs[-1]:
                    paragraphs.append([])
                if macro in _LIST_MACROS and sum(len(" ".join(p).split()) for p in paragraphs) >= 25:
                    done = True
            elif text.strip():
                paragraphs[-1].append(text.strip())
            elif paragraphs[-1]:
                paragraphs.append([])
    if nd is not None:
        summary = nd
    else:
        line = " ".join(name_text)
        m = re.search(r"\s+-+\s+", line)
        if not m:
            return None
        summary = line[m.end() :]
    summary = " ".join(summary.split()).strip()
    words: list[str] = []
    for p in paragraphs:
        if len(words) >= 25:
            break
        words += " ".join(p).split()
    if not (2 <= len(summary.split()) <= 20) or len(words) < 25:
        return None
    document = " ".join(words[:120])
    if len(words) > 120:  # end at the last full sentence when there is one
        end = max(document.rfind(". "), document.rfind(".) "))
        document = document[: end + 1] if end > len(document) // 2 else document
    return document, summary


def summarization_records(seed: int = 0) -> tuple[list[Record], dict[str, Any]]:
    pages = sorted(p for s in range(1, 9) for p in Path(f"/usr/share/man/man{s}").glob("*") if p.is_file())
    pages = [p for p in pages if not p.is_symlink()]
    owner = _package_index(("/usr/share/man/man",))
    by_pkg: dict[str, list[Record]] = {}
    seen_docs: set[str] = set()
    for p in pages:
        source = _read_man(p)
        parsed = parse_man(source) if source else None
        if parsed is None or parsed[0] in seen_docs:
            continue
        seen_docs.add(parsed[0])
        by_pkg.setdefault(owner.get(str(p), "unknown"), []).append({"document": parsed[0], "summary": parsed[1]})
    records: list[Record] = []
    counts: Counter[str] = Counter()
    rng = np.random.default_rng(seed)
    for pkg in sorted(by_pkg):
        recs = by_pkg[pkg]
        if len(recs) > MAX_PER_PACKAGE:
            recs = [recs[i] for i in sorted(rng.permutation(len(recs))[:MAX_PER_PACKAGE].tolist())]
        records += recs
        counts[pkg] += len(recs)
    info = {
        "name": "manual pages of the installed packages (/usr/share/man/man1-8): DESCRIPTION -> NAME line",
        "pages": len(pages),
        "sources": _sources(counts),
    }
    return sorted(records, key=lambda r: (r["document"], r["summary"])), info


# -------------------------------------------------------------------------------- classification
def _package_stanzas() -> Iterable[dict[str, str]]:
    for lz4 in sorted(glob.glob("/var/lib/apt/lists/*_Packages.lz4")):
        text = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", lz4], check=True, capture_output=True, text=True
        ).stdout
        for block in text.split("\n\n"):
            fields = {}
            for line in block.splitlines():
                if line and not line[0].isspace() and ":" in line:
                    k, v = line.split(":", 1)
                    fields[k] = v.strip()
            if "Package" in fields:
                yield fields


def classification_records() -> tuple[list[Record], dict[str, Any]]:
    by_name: dict[str, Record] = {}
    for f in _package_stanzas():
        desc, section = f.get("Description", ""), f.get("Section", "").split("/")[-1]
        if f["Package"] in by_name or not desc or not section:
            continue
        by_name[f["Package"]] = {"text": desc, "label": section}
    by_text: dict[str, Record] = {}
    for name in sorted(by_name):
        by_text.setdefault(by_name[name]["text"], by_name[name])
    counts = Counter(r["label"] for r in by_text.values())
    keep = {s for s, _ in counts.most_common(N_SECTIONS)}
    records = [r for r in by_text.values() if r["label"] in keep]
    info = {
        "name": "Debian bookworm package index (apt lists *_Packages.lz4): Description -> Section",
        "packages": len(by_name),
        "sections": {s: counts[s] for s, _ in counts.most_common(N_SECTIONS)},
        "sources": [
            {
                "package": "(Debian archive metadata; each description belongs to its package)",
                "records": len(records),
                "licence": "the package's own licence (Debian main: DFSG-free)",
            }
        ],
    }
    return sorted(records, key=lambda r: (r["text"], r["label"])), info


# ------------------------------------------------------------------------------------- splitting
BUILDERS: dict[str, Callable[[], tuple[list[Record], dict[str, Any]]]] = {
    "summarization": summarization_records,
    "translation": translation_records,
    "classification": classification_records,
}


def split(records: list[Record], n_train: int, n_test: int, seed: int) -> tuple[list[Record], list[Record]]:
    if len(records) < n_test + 10:
        raise SystemExit(f"only {len(records)} records, fewer than n_test {n_test} + 10")
    perm = np.random.default_rng(seed).permutation(len(records))
    test = [records[i] for i in perm[:n_test]]
    train = [records[i] for i in perm[n_test : n_test + n_train]]
    return train, test


def build(
    task: str,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    data_dir: Path = DATA_DIR,
    rebuild: bool = False,
) -> tuple[Path, Path, dict[str, Any]]:
    """``(train.jsonl, test.jsonl, info)`` of ``task``, built once and cached under ``data_dir``
    (``rebuild``: build again; the same sources and seed give the same records)."""
    d_train, d_test = DEFAULT_SIZES[task]
    n_train, n_test = n_train or d_train, n_test or d_test
    out = data_dir / f"{task}-s{seed}-{n_train}-{n_test}"
    train_p, test_p, info_p = out / "train.jsonl", out / "test.jsonl", out / "info.json"
    if info_p.is_file() and not rebuild:
        return train_p, test_p, json.loads(info_p.read_text(encoding="utf-8"))
    records, info = BUILDERS[task]()
    train, test = split(records, n_train, n_test, seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, recs in ((train_p, train), (test_p, test)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    info = {**info, "task": task, "seed": seed, "records": len(records), "train": len(train), "test": len(test)}
    info_p.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return train_p, test_p, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, action="append")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="build again even when cached")
    args = ap.parse_args()
    for task in args.task or TASKS:
        train_p, test_p, info = build(task, args.n_train, args.n_test, args.seed, rebuild=args.rebuild)
        top = ", ".join(f"{s['package']} {s['records']} ({s['licence']})" for s in info["sources"][:5])
        print(f"{task}: {info['records']} records -> {info['train']} train / {info['test']} test in {train_p.parent}")
        print(f"  from {info['name']}; top sources: {top}")


if __name__ == "__main__":
    main()
