"""Batch scoring: folders, globs or manifests of images to a predictions file.

    cnnserve score photos/ --model lenet5-digits:latest --out preds.csv
    cnnserve score 'imgs/**/*.png' --model runs/x/model.onnx --out preds.parquet --engine ray
    cnnserve score manifest.csv --engine http --url http://127.0.0.1:3000 --out preds.jsonl --resume

Every engine decodes with ``service.preprocess`` and runs the exported graph, like the
HTTP service, so all give the same answers. Output goes to disk batch by batch: a
killed run leaves a valid partial file and ``--resume`` completes it, scoring each
input exactly once. A file that cannot be read or decoded gets a row with its error.

Engines: ``local`` (threads decode while onnxruntime runs the previous batch), ``http``
(a running cnnserve service, bounded concurrency, priority=bulk, retries on 503 and 504), ``ray`` (Ray Data:
parallel decode and an actor pool holding onnxruntime sessions; local or a cluster).
No torch.
"""

from __future__ import annotations

import asyncio
import csv
import glob
import io
import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cnnserve.spec import DEFAULT_MODEL, ModelSpec

from .preprocess import DEFAULT_LIMITS, ImageError, preprocess, read_file
from .runtime import Model, load_model

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ENGINES = ("local", "http", "ray")


class ScoreError(ValueError):
    """A scoring run that cannot start (bad arguments, unreadable manifest, output exists...)."""


# --- inputs ---------------------------------------------------------------------------------

@dataclass
class Inputs:
    paths: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (manifest:line, problem)


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
        if suffix == ".csv":
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


def collect_inputs(specs: Iterable[str]) -> Inputs:
    """Folders (recursive, sorted), globs (sorted), manifests and single files, in the order given;
    a path seen twice is scored once."""
    seen, out = set(), Inputs([])

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.paths.append(p)

    for spec in specs:
        p = Path(spec)
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


# --- output ---------------------------------------------------------------------------------

def row(path: str, preds: list[dict] | None, error: str = "") -> dict:
    return {"path": path, "labels": [p["label"] for p in preds or []], "indices": [p["index"] for p in preds or []],
            "probabilities": [p["probability"] for p in preds or []], "error": error}


def printable(text: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate
    escapes) become ``\\xNN``. Used where the format must be UTF-8 (Parquet, the terminal)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
                header = ["path"] + [f"{c}_{i}" for i in range(1, top_k + 1) for c in ("label", "probability")]
                self._commit(lambda: self.csv.writerow(header + ["error"]))

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
            paths = [r[0] for r in rows[1:]]
        else:
            keep = data.rfind(b"\n") + 1
            paths = [json.loads(line)["path"] for line in data[:keep].splitlines() if line.strip()]
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
                    self.csv.writerow(cells + [r["error"]])
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
                    ("probabilities", pa.list_(pa.float64())), ("error", pa.string())])), tmp)
                tmp.replace(self.out)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise ScoreError(f"{self.out}: cannot write: {e.strerror or e}; every row is kept in "
                                 f"{self.journal}: make room and run again with --resume") from None
            self.journal.unlink()


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


def _read_parquet_paths(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["path"]).column("path").to_pylist()


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
                        "error": r["error"]})
        return out


# --- engines --------------------------------------------------------------------------------

@dataclass
class Stats:
    scored: int = 0
    failed: int = 0
    decode_s: float = 0.0  # summed over decoding workers
    infer_s: float = 0.0


def read_and_decode(path: str, spec: ModelSpec) -> tuple[np.ndarray | None, str, float]:
    """(pixels or None, error message, seconds) for one file, exactly as the service decodes it.
    Never raises: whatever goes wrong with one file becomes that file's error message."""
    t = time.perf_counter()
    try:
        return preprocess(read_file(path, DEFAULT_LIMITS.max_bytes), spec), "", time.perf_counter() - t
    except ImageError as e:
        message = str(e)
    except MemoryError:
        message = "not enough memory to decode it"
    except Exception as e:  # a failure nobody foresaw still belongs to this file alone
        message = f"{type(e).__name__}: {e}"
    return None, _without_path(message, path), time.perf_counter() - t


def _without_path(message: str, path: str) -> str:
    prefix = os.fsdecode(path) + ": "  # the row names the file already
    return message[len(prefix):] if message.startswith(prefix) else message


def score_local(paths: list[str], model: Model, top_k: int, batch_size: int, workers: int,
                stats: Stats) -> Iterator[list[dict]]:
    """Decode in ``workers`` threads, ``prefetch`` batches ahead, while the model runs the current one."""
    spec = model.spec
    prefetch = 2
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        pending: deque = deque()

        def submit(chunk):
            return chunk, [pool.submit(read_and_decode, p, spec) for p in chunk]

        for chunk in chunks[:prefetch]:
            pending.append(submit(chunk))
        nxt = prefetch
        while pending:
            chunk, futures = pending.popleft()
            if nxt < len(chunks):
                pending.append(submit(chunks[nxt]))
                nxt += 1
            decoded = [f.result() for f in futures]
            stats.decode_s += sum(d[2] for d in decoded)
            good = [i for i, d in enumerate(decoded) if d[0] is not None]
            preds = {}
            if good:
                t = time.perf_counter()
                probs = model.predict(np.stack([decoded[i][0] for i in good]))
                stats.infer_s += time.perf_counter() - t
                preds = dict(zip(good, model.top_k(probs, top_k)))
            yield [row(p, preds.get(i), "" if i in preds else decoded[i][1]) for i, p in enumerate(chunk)]


def score_http(paths: list[str], url: str, model_name: str | None, top_k: int, batch_size: int,
               concurrency: int, stats: Stats, max_retries: int = 8) -> Iterator[list[dict]]:
    """Send each image to a running service (raw body, priority=bulk), ``concurrency`` at a time,
    retrying 503, 504 and connection failures with backoff (honouring Retry-After); yields rows in
    input order."""
    import httpx

    # bulk: the service fills its batches with interactive requests first, so scoring never starves them
    params = {"top_k": top_k, "priority": "bulk", **({"model": model_name} if model_name else {})}

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore, path: str) -> dict:
        try:
            data = read_file(path, DEFAULT_LIMITS.max_bytes)
        except ImageError as e:
            return row(path, None, _without_path(str(e), path))
        delay = 0.2
        for attempt in range(max_retries + 1):
            async with sem:
                try:
                    r = await client.post("/classify", content=data, params=params,
                                          headers={"Content-Type": "application/octet-stream"})
                except httpx.TransportError as e:
                    r, err = None, f"{type(e).__name__}: {e}"
            if r is not None and r.status_code == 200:
                return row(path, r.json()["predictions"])
            if r is not None and r.status_code not in (503, 504):  # 504: a bulk request's deadline passed
                try:
                    return row(path, None, r.json().get("error", r.text))
                except ValueError:
                    return row(path, None, f"HTTP {r.status_code}: {r.text[:200]}")
            if attempt < max_retries:
                wait = float(r.headers.get("Retry-After", delay)) if r is not None else delay
                await asyncio.sleep(min(wait, 30.0))
                delay = min(delay * 2, 10.0)
        return row(path, None, f"gave up after {max_retries} retries: " +
                   (f"HTTP {r.status_code} (overloaded or past its deadline)" if r is not None else err))

    async def run_chunk(client, sem, chunk):
        return await asyncio.gather(*(one(client, sem, p) for p in chunk))

    loop = asyncio.new_event_loop()
    try:
        client = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency))
        sem = asyncio.Semaphore(concurrency)
        # chunks several times the concurrency keep every connection busy while rows stay in order
        step = max(batch_size, 4 * concurrency)
        for i in range(0, len(paths), step):
            t = time.perf_counter()
            rows = loop.run_until_complete(run_chunk(client, sem, paths[i:i + step]))
            stats.infer_s += time.perf_counter() - t
            for j in range(0, len(rows), batch_size):
                yield rows[j:j + batch_size]
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()


class _RayScorer:
    """A Ray actor holding one onnxruntime session (one GPU per actor when CUDA is present)."""

    def __init__(self, model_bytes, providers: str, top_k: int):
        import ray

        from cnnserve.onnxmeta import ModelInfo

        from .runtime import create_session

        if isinstance(model_bytes, ray.ObjectRef):  # the model travels through the object store
            model_bytes = ray.get(model_bytes)

        self.session = create_session(model_bytes, providers, source="ray actor")
        info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.model = Model(name=info.spec.arch, version="", info=info, session=self.session)
        self.top_k = top_k

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]])
        preds = ["[]"] * len(ok)
        if ok.any():
            for i, p in zip(np.flatnonzero(ok), self.model.top_k(self.model.predict(batch["pixels"][ok]), self.top_k)):
                preds[i] = json.dumps(p)
        return {"path": batch["path"], "preds": np.array(preds, dtype=object), "error": batch["error"]}


def score_ray(paths: list[str], model_path: str, top_k: int, batch_size: int, workers: int, providers: str,
              address: str | None, stats: Stats) -> Iterator[list[dict]]:
    """Ray Data: read and decode in parallel tasks, an actor pool of onnxruntime sessions, results in order.
    Without ``address`` a local Ray starts with ``workers`` CPUs; with it, the run joins that cluster."""
    try:
        import ray
    except ImportError:
        raise ScoreError("the ray engine needs Ray Data: pip install 'cnnserve[scale]' (ray[data])") from None
    from .runtime import CUDA, requested_providers

    model_bytes = Path(model_path).read_bytes()
    spec = load_model(model_path, providers="cpu", warm_up=False).spec
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        gpus = 1 if requested_providers(providers)[0][0] == CUDA and ray.cluster_resources().get("GPU") else 0

        def decode(batch: dict) -> dict:
            out = [read_and_decode(p, spec) for p in batch["path"]]
            zeros = np.zeros(spec.input_shape, np.uint8)
            return {"path": batch["path"], "pixels": np.stack([o[0] if o[0] is not None else zeros for o in out]),
                    "error": np.array([o[1] for o in out], dtype=object)}

        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(decode, batch_size=batch_size, batch_format="numpy")
        ds = ds.map_batches(_RayScorer, fn_constructor_args=(ray.put(model_bytes), providers, top_k),
                            batch_size=batch_size, batch_format="numpy", num_gpus=gpus,
                            concurrency=max(1, workers // 2) if not gpus else max(1, int(ray.cluster_resources()["GPU"])))
        for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield [row(str(p), json.loads(pr) if not e else None, str(e))
                   for p, pr, e in zip(b["path"], b["preds"], b["error"])]
    finally:
        if started_here:
            ray.shutdown()


# --- the command ----------------------------------------------------------------------------

def resolve_model(model: str) -> tuple[str, str]:
    """An ONNX file, or a model store tag: (path of the ONNX file, display name)."""
    p = Path(model)
    if p.suffix == ".onnx" or p.exists():
        if not p.is_file():
            raise ScoreError(f"{model}: no such ONNX file")
        return str(p), p.name
    import bentoml

    try:
        stored = bentoml.models.get(model)
    except (bentoml.exceptions.NotFound, ValueError) as e:
        raise ScoreError(f"{model}: neither an ONNX file nor a model in the store ({e})") from None
    return stored.path_of("model.onnx"), str(stored.tag)


def _served_classes(url: str, model: str | None) -> int:
    """How many classes the service's model has (to clamp top-k before the first request)."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/models", timeout=30)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise ScoreError(f"{url}: no cnnserve service answers there ({e})") from None
    info = r.json()
    name = model or info["default"]
    for m in info["models"]:
        if m["name"] == name:
            return len(m["labels"])
    raise ScoreError(f"{url}: serves no model {name!r} (it serves {', '.join(m['name'] for m in info['models'])})")


def score(inputs: list[str], out: str, *, model: str | None = None, engine: str = "local", top_k: int = 5,
          batch_size: int = 64, workers: int | None = None, url: str | None = None, concurrency: int = 16,
          ray_address: str | None = None, providers: str = "auto", resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict:
    """Score ``inputs`` into ``out``; returns the summary. Ctrl+C stops after the current batch."""
    if engine not in ENGINES:
        raise ScoreError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "http" and not url:
        raise ScoreError("--engine http needs --url of a running cnnserve service")
    if engine != "http" and not model:
        model = DEFAULT_MODEL  # the service's default
    workers = workers or os.cpu_count() or 2
    found = collect_inputs(inputs)
    local_model = None
    if engine == "http":
        top_k = min(top_k, _served_classes(url, model))
    else:
        model_path = resolve_model(model)[0]
        local_model = load_model(model_path, providers=providers, warm_up=False)
        if engine == "local":  # the first run at a new batch size allocates: do it before the clock starts
            local_model.warm_up((batch_size,))
        top_k = min(top_k, local_model.spec.num_classes)
    writer = Writer(Path(out), top_k, resume, overwrite)
    todo = [p for p in found.paths if not writer.has(p)]
    bad = [b for b in found.bad if not writer.has(b[0])]
    stats, t0 = Stats(), time.perf_counter()
    total = len(todo) + len(bad)
    skipped = len(found.paths) + len(found.bad) - total
    print(f"scoring {total} inputs ({skipped} already in {out}) with the {engine} engine", file=sys.stderr)
    if bad:
        for where, problem in bad:
            print(f"{where}: {problem}", file=sys.stderr)
        writer.write([row(where, None, problem) for where, problem in bad])
        stats.failed += len(bad)

    if engine == "local":
        batches = score_local(todo, local_model, top_k, batch_size, workers, stats)
    elif engine == "http":
        batches = score_http(todo, url.rstrip("/"), model, top_k, batch_size, concurrency, stats)
    else:
        batches = score_ray(todo, model_path, top_k, batch_size, workers, providers, ray_address, stats)

    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def stop(*_):
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, stop)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.0f} img/s"), TextColumn("{task.fields[failed]} failed"),
               TextColumn("ETA"), TimeRemainingColumn()]
    wanted = set(todo) | {where for where, _ in bad}
    finished = False
    try:
        with Progress(*columns, disable=progress is False, transient=False,
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("score", total=total, completed=len(bad), rate=0.0, failed=stats.failed)
            for rows in batches:
                writer.write(rows)
                failed = sum(1 for r in rows if r["error"])
                stats.failed += failed
                stats.scored += len(rows) - failed
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=len(rows), rate=(stats.scored + stats.failed) / max(elapsed, 1e-9),
                           failed=stats.failed)
                if interrupted:
                    break
        finished = not interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        missing = {p for p in wanted if not writer.has(p)}
        # Finalized only when every input has its row: an error that stopped the run, or an engine
        # that came back short, leaves the partial file (or Parquet journal) for --resume.
        writer.close(complete=finished and not missing)
    if missing and not interrupted:
        raise ScoreError(f"{len(missing)} inputs got no row (first: {printable(min(missing))}); "
                         f"{writer.journal} is kept: run the same command with --resume")
    elapsed = time.perf_counter() - t0
    summary = {"inputs": len(found.paths) + len(found.bad), "already_done": skipped, "scored": stats.scored,
               "failed": stats.failed, "seconds": round(elapsed, 2),
               "images_per_s": round((stats.scored + stats.failed) / max(elapsed, 1e-9), 1),
               "decode_s": round(stats.decode_s, 2), "inference_s": round(stats.infer_s, 2),
               "engine": engine, "out": str(out), "interrupted": interrupted}
    split = (f"; decode {stats.decode_s:.1f}s (summed over {workers} threads), inference {stats.infer_s:.1f}s"
             if engine == "local" else "")
    print(f"{'interrupted: ' if interrupted else ''}{summary['scored']} scored, {summary['failed']} failed, "
          f"{summary['already_done']} already done, in {elapsed:.1f}s ({summary['images_per_s']} img/s){split}; "
          f"predictions in {printable(str(writer.journal if interrupted else out))}", file=sys.stderr)
    if interrupted:
        print("resume with the same command and --resume", file=sys.stderr)
    return summary
