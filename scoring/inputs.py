"""Where the images of a scoring run come from: folders (recursive), globs, manifests
(.txt/.lst, .csv or .parquet with a ``path`` column, .jsonl with a ``path`` key) and single files, in the
order given. A traffic capture (``service/capture.py``) is both: its folder holds the images (under
``images/``; its manifests and labels are not images, and a file being written has no image extension), and
each of its ``manifest-<n>.jsonl`` lists them in the order they were answered."""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from cnnserve.core.preprocess import IMAGE_EXTENSIONS
from . import ScoreError

MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet", ".jsonl")


@dataclass
class Inputs:
    paths: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (manifest:line, problem)
    outputs: list[str] = field(default_factory=list)  # files a folder or glob found that are this run's output


def identity(path: str | Path) -> tuple:
    """What makes two names one file: its device and inode (``sub/../a.png``, ``./a.png``, a symbolic or
    hard link all name the same file); a name that does not exist, its normalised absolute path."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return (os.path.normpath(os.path.abspath(path)),)


def _manifest_rows(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, path or None when the line is bad) of a manifest; relative paths from its folder."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ScoreError(f"{path}: reading Parquet manifests needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise ScoreError(f"{path}: no 'path' column (columns: {', '.join(table.column_names)})")
        for i, v in enumerate(table.column("path").to_pylist()):
            yield i + 1, (str(v) if v not in (None, "") else None)
        return
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:  # names of any bytes
        if suffix == ".jsonl":
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get("path")
                except (ValueError, AttributeError):  # not JSON, or not an object
                    value = None
                yield i, (value.strip() if isinstance(value, str) and value.strip() else None)
        elif suffix == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ScoreError(f"{path}: the CSV header has no 'path' column "
                                 f"(header: {', '.join(reader.fieldnames or []) or 'empty'})")
            for row in reader:
                value = row.get("path")
                yield reader.line_num, (value.strip() if value and value.strip() and None not in row else None)
        else:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield i, line


def collect_inputs(specs: Iterable[str], outputs: Iterable[str | Path] = ()) -> Inputs:
    """Folders (recursive, sorted), globs (sorted), manifests and single files, in the order given;
    a file named twice (``a.png`` and ``sub/../a.png``, or through a link) is scored once, under the
    name it had first. ``outputs`` (the run's output and its journal) are never inputs: a folder or
    glob that finds one skips it (``Inputs.outputs``), and naming one as an input is refused."""
    seen, out = set(), Inputs([])
    written = {identity(o) for o in outputs}

    def add(p: str) -> None:
        key = identity(p)
        if key in written:
            out.outputs.append(p)
        elif key not in seen:
            seen.add(key)
            out.paths.append(p)

    for spec in specs:
        p = Path(spec)
        if identity(p) in written:
            raise ScoreError(f"{spec}: is this run's output (--out) as well as an input; write the predictions "
                             "to another file")
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                    add(str(f))
        elif any(ch in spec for ch in "*?["):
            for f in sorted(glob.glob(spec, recursive=True)):
                if Path(f).is_file():
                    add(f)
        elif p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS:
            for line, value in _manifest_rows(p):
                if value is None:
                    out.bad.append((f"{p}:{line}", "bad manifest line: no path"))
                else:
                    add(str((p.parent / value) if not Path(value).is_absolute() else Path(value)))
        elif p.is_file():
            add(str(p))
        else:
            raise ScoreError(f"{spec}: no such file, folder or matching glob")
    return out
