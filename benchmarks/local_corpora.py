"""Real text corpora that ship with this machine's Debian system (no network), written as one text file each.

Each is the concatenation of its files in sorted path order, cut at ``max_bytes`` (UTF-8, whole files only
after the first), so a corpus is the same on every run on the same system.

| name | what | licence of the text |
|---|---|---|
| ``licenses`` | /usr/share/common-licenses/* (Apache, Artistic, BSD, CC0, GFDL, GPL, LGPL, MPL texts) | each licence's own terms: verbatim copying permitted |
| ``man`` | /usr/share/man/man1/*.gz, the roff sources of the section-1 manual pages | each package's licence (mostly GPL / BSD / MIT) |
| ``changelogs`` | /usr/share/doc/*/changelog.Debian.gz, Debian packaging changelogs | each package's licence (per /usr/share/doc/*/copyright) |
| ``perlpod`` | /usr/share/perl/5.36.0/**/*.pod, Perl's core documentation | Perl's: GPL-1+ or Artistic |
| ``info`` | /usr/share/info/*.info*.gz, GNU Texinfo manuals (coreutils, find, diffutils, ...) | GNU FDL |

``benchmarks/derive_priors.py`` derives the default space's start points from ``licenses``, ``man``,
``changelogs`` and ``perlpod``; ``benchmarks/search_vs_baselines.py`` uses ``info`` as its third corpus, so
no benchmark corpus chose a start point.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

DEFAULT_MAX_BYTES = 1_100_000
"""About Tiny Shakespeare's size."""


def _read(p: Path) -> str:
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _files(pattern_root: str, pattern: str) -> list[Path]:
    root = Path(pattern_root)
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


SOURCES: dict[str, Callable[[], list[Path]]] = {
    "licenses": lambda: _files("/usr/share/common-licenses", "*"),
    "man": lambda: _files("/usr/share/man/man1", "*.gz"),
    "changelogs": lambda: _files("/usr/share/doc", "*/changelog.Debian.gz"),
    "perlpod": lambda: _files("/usr/share/perl/5.36.0", "**/*.pod"),
    "info": lambda: [p for p in _files("/usr/share/info", "*.gz") if not p.name.startswith("dir")],
}


def build(name: str, out_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Write corpus ``name`` to ``out_dir/name.txt`` (once) and return the path."""
    if name not in SOURCES:
        raise SystemExit(f"unknown corpus {name!r}; known: {', '.join(SOURCES)}")
    out = out_dir / f"{name}.txt"
    if out.is_file() and out.stat().st_size > 0:
        return out
    files = SOURCES[name]()
    if not files:
        raise SystemExit(f"corpus {name!r}: no files found on this machine")
    parts: list[str] = []
    size = 0
    for p in files:
        text = _read(p).replace("\x00", "")
        n = len(text.encode("utf-8"))
        if parts and size + n > max_bytes:
            continue  # whole files only; a smaller later file may still fit
        if n > max_bytes:  # the first file alone is larger: its beginning
            text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            n = max_bytes
        parts.append(text)
        size += n
        if size >= max_bytes:
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out
