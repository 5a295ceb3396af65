"""A sample of the traffic written to disk off the request path, for replaying a candidate model against what
the served one answered (``cnnserve replay``) and for evaluating it once labels come back (``cnnserve evaluate``).

The request path calls ``Capture.offer`` after its answer is made: a coin toss at ``rate`` first, then one
append to a bounded queue under a lock the writer holds only to pop. A full queue (``queue`` samples, or
``queue_mb`` of image bytes, whichever comes first) drops the sample and counts it; ``offer`` never waits on
the disk. One writer thread per process empties the queue into the folder:

    FOLDER/images/<id>.<ext>     the image bytes as received, one file each (ext from the bytes' signature)
    FOLDER/manifest-<n>.jsonl    one JSON object a line per sample (``ROW_FIELDS``), rotated by rows and bytes
    FOLDER/labels.jsonl          written by others (the feedback feature): {"id": ..., "label": ...} a line

An image is written under a temporary name and linked into place before its row is written, so a reader
(``cnnserve score FOLDER`` while the service runs) never sees half an image, and a row's image existed when the
row was written. Each worker of a server runs its own writer into the same folder: manifests and images are
claimed with exclusive creation, so no two writers share a name.

**The byte budget** (``max_mb``) holds over the whole folder, every writer's files together: when a writer's
estimate (its last listing of the folder plus what it wrote since) passes the budget, it lists the folder again
and removes the oldest files (by modification time: images, and manifests no writer appended to since) until
the folder is back under 15/16 of it. A writer lists the folder again after writing 1/16 of the budget, so
with W workers the folder can pass the budget by at most about W/16 of it between listings. A manifest's rows
whose image the budget removed stay in it (the manifest goes once it is itself the oldest); readers skip such
rows and count them.

No torch, scipy or sklearn: this module runs in the serving worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger("cnnserve.capture")

IMAGES = "images"
MANIFEST = re.compile(r"^manifest-(\d+)\.jsonl$")
LABELS_FILE = "labels.jsonl"  # id -> label, one JSON object a line; a later line for an id wins
#: A manifest row's keys. ``labels``, ``indices`` and ``probabilities`` are the answer's top-k, as the answer
#: gave them (``calibrated`` says which probabilities); ``path`` is the image, relative to the folder (so a
#: manifest reads as a ``cnnserve score`` manifest); ``label``, where present, is the true class (feedback).
ROW_FIELDS = ("id", "time", "model", "version", "path", "content_type", "bytes", "labels", "indices",
              "probabilities", "ood_score", "in_distribution", "calibrated", "latency_ms")

DEFAULTS = SimpleNamespace(rate=0.01, max_mb=1024.0, queue=256, queue_mb=64.0, manifest_rows=10_000,
                           manifest_mb=16.0)
TMP_PREFIX = ".tmp-"  # a file being written (no image extension: a folder walk never takes it for an image)

#: File signatures of the formats the service decodes, checked before the client's Content-Type (which may be
#: application/octet-stream or wrong).
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
              (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
CONTENT_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/jpg": "jpg", "image/gif": "gif",
                 "image/bmp": "bmp", "image/webp": "webp", "image/tiff": "tif"}


def image_extension(data: bytes, content_type: str | None = "") -> str:
    """The file extension for an image's bytes: its signature's, else its Content-Type's, else ``bin``."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, ext in SIGNATURES:
        if head.startswith(magic):
            return ext
    return CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower(), "bin")


def file_stem(request_id: str | None) -> str:
    """A file name from a request id: what a client sent may hold anything, so only letters, digits, ``_``,
    ``-`` and ``.`` stay (the rest become ``_``), at most 80 characters, never hidden; no id, a random one."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(request_id or ""))[:80].lstrip(".")
    return stem or uuid.uuid4().hex


@lru_cache(maxsize=1)
def capture_metrics() -> SimpleNamespace:
    """The capture's counters on /metrics, created on first use inside the worker as ``metrics.metrics()``'s
    (prometheus_client's multiprocess mode reads them from the server's folder)."""
    from prometheus_client import Counter, Gauge

    return SimpleNamespace(
        samples=Counter("cnnserve_capture_samples", "Sampled answers offered to the traffic capture, by result: "
                        "written, dropped (its queue was full) or failed (the disk refused it)", ["result"]),
        evicted=Counter("cnnserve_capture_evicted_files", "Files the capture removed to keep its folder within "
                        "capture_max_mb (oldest first)"),
        folder_bytes=Gauge("cnnserve_capture_bytes", "Bytes in the capture folder at its last listing",
                           multiprocess_mode="livemax"),
    )


@dataclass
class Sample:
    request_id: str
    model: str
    version: str
    data: bytes
    content_type: str
    answer: dict
    latency_ms: float
    time: float


class Capture:
    """Samples of the answered traffic into ``folder``; see the module's docstring. ``close()`` writes what is
    queued and stops the writer."""

    def __init__(self, folder: str | os.PathLike, rate: float = DEFAULTS.rate, max_mb: float = DEFAULTS.max_mb,
                 queue: int = DEFAULTS.queue, *, queue_mb: float = DEFAULTS.queue_mb,
                 manifest_rows: int = DEFAULTS.manifest_rows, manifest_mb: float = DEFAULTS.manifest_mb,
                 metrics: bool = True) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"capture_rate {rate}: a fraction of the requests, between 0 and 1")
        if not max_mb > 0 or not queue >= 1 or not queue_mb > 0 or not manifest_rows >= 1 or not manifest_mb > 0:
            raise ValueError(f"capture_max_mb {max_mb}, capture_queue {queue}: both must be positive")
        self.folder = Path(folder)
        self.images = self.folder / IMAGES
        self.images.mkdir(parents=True, exist_ok=True)  # an unwritable folder fails here, at start, not per sample
        self.rate, self.budget = rate, int(max_mb * 2**20)
        self.queue_size, self.queue_bytes = queue, int(queue_mb * 2**20)
        self.manifest_rows, self.manifest_bytes = manifest_rows, int(manifest_mb * 2**20)
        self.metrics = capture_metrics() if metrics else None
        self.counts = {"written": 0, "dropped": 0, "failed": 0, "evicted": 0}
        self._items: deque[Sample] = deque()
        self._pending = self._pending_bytes = 0  # queued or being written: what the bounds hold
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._manifest = None  # (path, file, rows, bytes) of this writer's open manifest
        self._usage = 0  # bytes in the folder as last listed, plus what this writer wrote since
        self._since_listing = 0
        self._list_folder()
        self._thread = threading.Thread(target=self._run, name="cnnserve-capture", daemon=True)
        self._thread.start()

    # --- the request path ----------------------------------------------------------------------------------

    def offer(self, request_id: str | None, model: str, version: str, image_bytes: bytes, content_type: str,
              answer_fields: dict, latency_ms: float) -> bool:
        """Queue one answered request for writing, if the coin toss picks it and the queue has room; whether
        it was queued. Never blocks on the disk; a full queue drops the sample and counts it."""
        if self.rate < 1.0 and (self.rate <= 0.0 or random.random() >= self.rate):
            return False
        size = len(image_bytes)
        with self._lock:
            full = self._closing or self._pending >= self.queue_size or self._pending_bytes + size > self.queue_bytes
            if not full:
                self._items.append(Sample(str(request_id or ""), model, version, image_bytes, content_type,
                                          answer_fields, float(latency_ms), time.time()))
                self._pending += 1
                self._pending_bytes += size
                self._wake.notify()
            else:
                self.counts["dropped"] += 1
        if full and self.metrics:
            self.metrics.samples.labels("dropped").inc()
        return not full

    # --- the writer thread ---------------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> dict:
        """Write what is queued, close the manifest, stop the writer; the counts (written, dropped, ...)."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        return dict(self.counts)

    def _run(self) -> None:
        while True:
            with self._lock:
                sample = self._items.popleft() if self._items else None
                if sample is None and self._closing:  # everything queued is written
                    break
            if sample is None:  # idle: the rows on disk for readers (outside the lock: offer never waits on it)
                self._flush()
                with self._lock:
                    while not self._items and not self._closing:
                        self._wake.wait()
                continue
            try:
                self._write(sample)
                result = "written"
            except OSError as e:  # a full or read-only disk: this sample is lost, the service goes on
                result = "failed"
                if self.counts["failed"] % 1000 == 0:
                    log.warning("capture into %s failed (%d so far): %s", self.folder, self.counts["failed"] + 1, e)
            except Exception:  # never let one sample end the writer
                result = "failed"
                log.exception("capture of a sample failed")
            with self._lock:
                self._pending -= 1
                self._pending_bytes -= len(sample.data)
                self.counts[result] += 1
            if self.metrics:
                self.metrics.samples.labels(result).inc()
        self._close_manifest()

    def _flush(self) -> None:
        """This writer's rows on disk, for readers of the folder."""
        if self._manifest is not None:
            try:
                self._manifest[1].flush()
            except OSError:
                pass

    def _write(self, s: Sample) -> None:
        """One sample: its image into place, then its row."""
        name = self._write_image(s.data, file_stem(s.request_id), image_extension(s.data, s.content_type))
        answer = s.answer or {}
        preds = answer.get("predictions") or []
        row = {"id": s.request_id or Path(name).stem, "model": s.model, "version": s.version,
               "time": datetime.fromtimestamp(s.time, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
               "path": f"{IMAGES}/{name}", "content_type": s.content_type, "bytes": len(s.data),
               "labels": [p.get("label") for p in preds], "indices": [p.get("index") for p in preds],
               "probabilities": [p.get("probability") for p in preds], "ood_score": answer.get("ood_score"),
               "in_distribution": answer.get("in_distribution"), "calibrated": answer.get("calibrated"),
               "latency_ms": round(s.latency_ms, 3)}
        self._append_row((json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n").encode())
        self._grew(len(s.data))

    def _write_image(self, data: bytes, stem: str, ext: str) -> str:
        """``data`` as ``images/STEM.EXT`` (``STEM-1.EXT``, ... where that is taken: request ids repeat),
        written aside and linked into place whole; its file name."""
        tmp = self.images / f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}"
        tmp.write_bytes(data)
        try:
            for n in range(1000):
                name = f"{stem}.{ext}" if n == 0 else f"{stem}-{n}.{ext}"
                try:
                    os.link(tmp, self.images / name)
                    return name
                except FileExistsError:
                    continue
            raise FileExistsError(f"{self.images}: 1000 images named {stem}-*.{ext}")
        finally:
            tmp.unlink(missing_ok=True)

    def _append_row(self, line: bytes) -> None:
        m = self._manifest
        if m is not None and (m[2] >= self.manifest_rows or m[3] + len(line) > self.manifest_bytes
                              or not m[0].exists()):  # full, or the budget of another writer removed it
            self._close_manifest()
            m = None
        if m is None:
            m = self._manifest = self._open_manifest()
        m[1].write(line)
        self._manifest = (m[0], m[1], m[2] + 1, m[3] + len(line))
        self._grew(len(line))

    def _open_manifest(self) -> tuple:
        """The next ``manifest-<n>.jsonl``, claimed by exclusive creation (another worker may take a number
        at the same time: this one then tries the next)."""
        numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := MANIFEST.match(p.name))]
        n = max(numbers, default=-1) + 1
        while True:
            path = self.folder / f"manifest-{n}.jsonl"
            try:
                return path, open(path, "xb"), 0, 0
            except FileExistsError:
                n += 1

    def _close_manifest(self) -> None:
        if self._manifest is not None:
            try:
                self._manifest[1].close()
            except OSError:
                pass
            self._manifest = None

    # --- the byte budget -----------------------------------------------------------------------------------

    def _grew(self, size: int) -> None:
        self._usage += size
        self._since_listing += size
        if self._usage > self.budget or self._since_listing > self.budget // 16:
            self._flush()
            files = self._list_folder()
            if self._usage > self.budget:
                self._evict(files, self.budget - self.budget // 16)

    def _list_folder(self) -> list[tuple[int, str, int]]:
        """(modification time, path, size) of every file of the folder; sets the usage to their sum."""
        files = []
        for folder in (self.folder, self.images):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        files.append((st.st_mtime_ns, e.path, st.st_size))
                except OSError:  # removed meanwhile by another writer
                    continue
        self._usage = sum(f[2] for f in files)
        self._since_listing = 0
        if self.metrics:
            self.metrics.folder_bytes.set(self._usage)
        return files

    def _evict(self, files: list[tuple[int, str, int]], target: int) -> None:
        """Remove the oldest files until the folder holds at most ``target`` bytes; never this writer's open
        manifest, nor the feedback labels (small, and not this writer's to lose)."""
        keep = {str(self._manifest[0]) if self._manifest else None, str(self.folder / LABELS_FILE)}
        removed = 0
        for _, path, size in sorted(files):
            if self._usage <= target:
                break
            if path in keep:
                continue
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:  # another writer removed it first
                pass
            except OSError:
                continue
            self._usage -= size
        self.counts["evicted"] += removed
        if removed and self.metrics:
            self.metrics.evicted.inc(removed)
