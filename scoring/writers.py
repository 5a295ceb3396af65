"""Where the rows of a scoring run go: CSV, JSON Lines or Parquet, appended batch by batch and
made durable, read back exactly once on ``--resume``."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from . import ScoreError, printable

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def files_of(out: Path) -> list[Path]:
    """Every file a run writing ``out`` may write: the output, a Parquet run's journal and its
    temporary file. None of them is ever read as an input of that run."""
    return [out, out.with_name(out.name + ".partial.jsonl"), out.with_name(out.name + ".tmp")]


class Writer:
    """Appends rows batch by batch, flushed and fsynced; every batch leaves a valid file.

    CSV and JSON Lines are appended in place. Parquet cannot be appended to, so rows go to a
    JSON Lines journal beside it (OUT.parquet.partial.jsonl) that becomes the Parquet file when
    the run completes; a killed run leaves the journal, which --resume continues.

    File names of any bytes round-trip exactly: JSON escapes them (``\\udcNN``), CSV writes the
    original bytes (surrogateescape) and quotes names holding commas, quotes or newlines, and a
    resume reads each back as the same string, so every input is written exactly once.
    """

    def __init__(self, out: Path, top_k: int, resume: bool, overwrite: bool):
        self.out, self.top_k = out, top_k
        self.format = FORMATS.get(out.suffix.lower())
        if self.format is None:
            raise ScoreError(f"{out}: unknown output format; use one of {', '.join(FORMATS)}")
        self.journal = out.with_name(out.name + ".partial.jsonl") if self.format == "parquet" else out
        existing = self.journal if self.journal.exists() else (out if out.exists() else None)
        if existing is not None and not (resume or overwrite):
            raise ScoreError(f"{existing}: already exists; --resume to complete it or --overwrite to replace it")
        self.done: set[str] = set()
        if existing is not None and resume:
            if self.format == "parquet" and existing == out:
                self.done = set(_read_parquet_paths(out))  # a finished file: nothing left unless inputs grew
                self._restore_journal_from(out)
            else:
                self.done = self._read_existing(self.journal)
        elif existing is not None:
            existing.unlink()
            if self.format == "parquet" and out.exists():
                out.unlink()
        new = not self.journal.exists() or self.journal.stat().st_size == 0
        self.f = self.journal.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        self.csv = None
        if self.format == "csv":
            self.csv = csv.writer(self.f)
            if new:
                self._commit(lambda: self.csv.writerow(self.header))

    @property
    def header(self) -> list[str]:
        """A CSV output's first row."""
        return header_of(self.top_k)

    def has(self, path: str) -> bool:
        """Whether ``path`` already has its row (a finished Parquet file holds printable names)."""
        return path in self.done or printable(path) in self.done

    def _read_existing(self, path: Path) -> set[str]:
        """Paths already written. A torn last record (a kill or a full disk mid-write) is cut off
        first, so the file ends with whole records and those inputs are scored again."""
        data = path.read_bytes()
        if self.format == "csv":
            text = data.decode("utf-8", "surrogateescape")
            chars, rows = _whole_csv_records(text)
            keep = len(text[:chars].encode("utf-8", "surrogateescape"))
            if not rows and not (",".join(self.header) + "\r\n").startswith(text):  # more than a torn header
                rows = [next(csv.reader([text.splitlines()[0]]), [])]
            if rows and rows[0] != self.header:
                k = (len(rows[0]) - 4) // 2
                same_kind = rows[0] == header_of(k)
                if rows[0] == header_of((len(rows[0]) - 2) // 2, ood=False):
                    raise ScoreError(f"{path}: was written by an earlier cnnserve, without the ood_score and "
                                     "in_distribution columns, so it cannot be resumed; choose another --out")
                raise ScoreError(f"{path}: was written with top-k {k}; resume it with --top-k {k}" if same_kind else
                                 f"{path}: is not a predictions file of cnnserve score (its header is "
                                 f"{printable(','.join(rows[0]))[:120]!r}), so it cannot be resumed; "
                                 "choose another --out")
            paths = [r[0] for r in rows[1:]]
        else:
            keep = data.rfind(b"\n") + 1
            paths = [_prediction_row(path, i, line)["path"]
                     for i, line in enumerate(data[:keep].splitlines(), 1) if line.strip()]
            torn, start = data[keep:], b'{"path": '  # how json.dumps begins every row
            if torn and not (torn.startswith(start) or start.startswith(torn)):
                _prediction_row(path, len(paths) + 1, torn)  # refuses it: never cut what this run did not write
        if keep < len(data):
            with path.open("r+b") as f:
                f.truncate(keep)
        return set(paths)

    def _restore_journal_from(self, parquet: Path) -> None:
        import pyarrow.parquet as pq

        with self.journal.open("w", encoding="utf-8") as f:
            for r in pq.read_table(parquet).to_pylist():
                f.write(json.dumps(r) + "\n")

    def _commit(self, write) -> None:
        """Run ``write`` and make it durable; a failed write (a full disk) says so, naming the file."""
        try:
            write()
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise ScoreError(f"{self.journal}: cannot write: {e.strerror or e}; the rows written before are "
                             "kept: make room and run the same command with --resume") from None

    def write(self, rows: list[dict]) -> None:
        def write_rows():
            for r in rows:
                if self.csv is not None:
                    cells = [r["path"]]
                    for i in range(self.top_k):
                        has = i < len(r["labels"])
                        cells += [r["labels"][i] if has else "", f"{r['probabilities'][i]:.6g}" if has else ""]
                    ood, inside = r.get("ood_score"), r.get("in_distribution")
                    self.csv.writerow(cells + ["" if ood is None else f"{ood:.6g}",
                                               "" if inside is None else str(inside).lower(), r["error"]])
                else:
                    self.f.write(json.dumps(r) + "\n")

        self._commit(write_rows)
        self.done.update(r["path"] for r in rows)

    def close(self, complete: bool) -> None:
        """Close the file; with ``complete`` (every input has its row) a Parquet run is finalized:
        the journal becomes OUT.parquet and is removed. Otherwise the journal stays for --resume."""
        try:
            self.f.close()
        except OSError:
            complete = False
        if complete and self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [json.loads(line) for line in self.journal.read_text("utf-8", "surrogateescape").splitlines()
                    if line.strip()]
            for r in rows:  # Parquet strings must be UTF-8: undecodable name bytes are written as \xNN
                r["path"], r["error"] = printable(r["path"]), printable(r["error"])
            tmp = self.out.with_name(self.out.name + ".tmp")
            try:
                pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
                    ("path", pa.string()), ("labels", pa.list_(pa.string())), ("indices", pa.list_(pa.int64())),
                    ("probabilities", pa.list_(pa.float64())), ("ood_score", pa.float64()),
                    ("in_distribution", pa.bool_()), ("error", pa.string())])), tmp)
                tmp.replace(self.out)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise ScoreError(f"{self.out}: cannot write: {e.strerror or e}; every row is kept in "
                                 f"{self.journal}: make room and run again with --resume") from None
            self.journal.unlink()


def header_of(top_k: int, ood: bool = True) -> list[str]:
    """A CSV output's first row for ``top_k`` (``ood=False``: as written before the out-of-distribution
    columns, so that ``--resume`` recognises such a file and refuses it by name)."""
    return (["path"] + [f"{c}_{i}" for i in range(1, top_k + 1) for c in ("label", "probability")]
            + ["ood_score", "in_distribution"] * ood + ["error"])


def _whole_csv_records(text: str) -> tuple[int, list[list[str]]]:
    """The records of a CSV text that are whole, and how many characters they take. A record torn
    by a kill (no line end, an open quote, or fewer fields than the header) is left out."""
    lines = list(io.StringIO(text, newline=""))  # split at \n and \r only, as csv expects
    reader = csv.reader(lines)
    rows, ends, consumed = [], [], 0
    try:
        for r in reader:
            rows.append(r)
            ends.append(reader.line_num)
    except csv.Error:  # an unterminated quote at the end: a torn record
        pass
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    width = len(rows[0]) if rows else 0
    while rows:
        end = offsets[ends[-1]]
        last_line = lines[ends[-1] - 1]
        if len(rows[-1]) == width and last_line.endswith(("\n", "\r")):
            consumed = end
            break
        rows.pop()
        ends.pop()
    return consumed, rows


ROW_KEYS = ("path", "labels", "indices", "probabilities", "error")


def _prediction_row(path: Path, line_number: int, line: bytes) -> dict:
    """One JSON Lines record of a predictions file; anything else means the file is not one."""
    try:
        r = json.loads(line)
    except ValueError:
        r = None
    if not isinstance(r, dict) or not all(k in r for k in ROW_KEYS) or not isinstance(r["path"], str):
        raise ScoreError(f"{path}: line {line_number} is not a row of cnnserve score's predictions, so the file "
                         "cannot be resumed; choose another --out")
    return r


def _read_parquet_paths(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors for a file that is not Parquet have no common base
        raise ScoreError(f"{path}: is not a Parquet file ({e}), so it cannot be resumed; choose another --out") from None
    if not all(k in table.column_names for k in ROW_KEYS):
        raise ScoreError(f"{path}: is not a predictions file of cnnserve score (columns: "
                         f"{', '.join(table.column_names)}), so it cannot be resumed; choose another --out")
    return table.column("path").to_pylist()


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Rows of a predictions file in any of the formats (for tests and downstream code)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        out = []
        for r in csv.DictReader(f):
            k = sum(1 for key in r if key.startswith("label_"))
            labels = [r[f"label_{i}"] for i in range(1, k + 1) if r[f"label_{i}"]]
            out.append({"path": r["path"], "labels": labels,
                        "probabilities": [float(r[f"probability_{i}"]) for i in range(1, len(labels) + 1)],
                        "ood_score": float(r["ood_score"]) if r.get("ood_score") else None,
                        "in_distribution": {"true": True, "false": False}.get(r.get("in_distribution") or ""),
                        "error": r["error"]})
        return out
