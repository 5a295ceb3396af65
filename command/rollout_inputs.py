"""What ``cnnserve evaluate`` and ``cnnserve replay`` read and run (``rollout.py`` holds the commands): a traffic
capture's rows and its feedback labels, and a model run over image files as ``cnnserve score``'s local engine
runs it (the service's decoding under its image limits, onnxruntime, no torch), keeping every probability.

A capture (``service/capture.py``) is a folder of ``images/`` and ``manifest-<n>.jsonl`` rows. Labels that come
back for it (the feedback feature) are a row's ``label`` or a line ``{"id": ID, "label": LABEL}`` of the folder's
``labels.jsonl`` (a later line for an id wins; a row's own ``label`` wins over the file).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cnnserve.core.config import Settings, cores
from cnnserve.service.capture import LABELS_FILE


# --- captures -------------------------------------------------------------------------------------------------

def manifests(folder: Path) -> list[Path]:
    """A capture's manifests in the order they were written (by their number)."""
    found = [(p.stem.split("-", 1)[1], p) for p in folder.glob("manifest-*.jsonl")]
    return [p for n, p in sorted(found, key=lambda t: (int(t[0]) if t[0].isdigit() else 1 << 62, t[0]))]


def read_capture(folder: Path) -> tuple[list[dict], Counter]:
    """A capture's rows whose image is still there (each with ``file``: its absolute path, and ``label``
    where feedback gave one), and the counts of what was skipped: ``bad_line`` (not a row: a line cut short by
    a stop, or foreign text) and ``image_gone`` (its image removed for the byte budget)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = manifests(folder)
    if not files:
        raise ValueError(f"{folder}: not a capture (no manifest-<n>.jsonl in it; a service with capture_dir "
                         "set writes them)")
    rows, skipped = [], Counter()
    for manifest in files:
        with manifest.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    path = row["path"]
                    if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
                        raise ValueError(path)  # a capture names its own images only
                except (ValueError, KeyError, TypeError):
                    skipped["bad_line"] += line.strip() != ""
                    continue
                file = folder / path
                if not file.is_file():
                    skipped["image_gone"] += 1
                    continue
                rows.append({**row, "file": str(file)})
    feedback = read_labels_jsonl(folder / LABELS_FILE)
    for row in rows:
        if row.get("label") is None and str(row.get("id")) in feedback:
            row["label"] = feedback[str(row.get("id"))]
    return rows, skipped


def read_labels_jsonl(path: Path) -> dict[str, str]:
    """``{"id": ..., "label": ...}`` lines: id -> label (a later line wins); none where there is no file."""
    found = {}
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    found[str(entry["id"])] = str(entry["label"])
                except (ValueError, KeyError, TypeError):
                    continue
    return found


# --- running a model ------------------------------------------------------------------------------------------

def load(model: str, precision: str, providers: str, batch_size: int):
    """(``runtime.Model``, its name as shown, its stored name or None for a file)."""
    from cnnserve.core.runtime import ModelLoadError, load_model
    from cnnserve.scoring.run import resolve_model

    path, shown = resolve_model(model)
    stored = shown != Path(path).name
    try:
        loaded = load_model(path, providers=providers, warm_up=False, precision=precision, batch_sizes=(batch_size,))
    except ModelLoadError as e:
        raise ValueError(str(e)) from None
    return loaded, (shown if stored else model), (shown.split(":")[0] if stored else None)


def run_model(model, paths: list[str], shown: str, batch_size: int, settings: Settings) -> tuple:
    """(logits, probabilities, errors) of ``model`` over ``paths``: N x classes arrays (NaN rows where the image
    failed) and per image its error ("" where it ran). Decoded in threads a few batches ahead, as
    ``cnnserve score --decoders threads`` does; progress on stderr."""
    from cnnserve.core.onnxmeta import OUTPUTS
    from cnnserve.scoring.engines import decode_chunk

    n, classes = len(paths), model.spec.num_classes
    logits = np.full((n, classes), np.nan, np.float32)
    probs = np.full((n, classes), np.nan, np.float32)
    errors = [""] * n
    starts = list(range(0, n, batch_size))
    workers = cores()
    report = Progress(f"{shown}", n)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque()
        for s in starts[:workers + 1]:
            pending.append((s, pool.submit(decode_chunk, paths[s:s + batch_size], model.spec, settings.limits)))
        nxt = len(pending)
        while pending:
            start, future = pending.popleft()
            if nxt < len(starts):
                s = starts[nxt]
                pending.append((s, pool.submit(decode_chunk, paths[s:s + batch_size], model.spec, settings.limits)))
                nxt += 1
            decoded = future.result()
            good = [i for i, d in enumerate(decoded) if d[0] is not None]
            for i, d in enumerate(decoded):
                errors[start + i] = d[1]
            if good:
                out = dict(zip(OUTPUTS, model.run(np.stack([decoded[i][0] for i in good]), list(OUTPUTS))))
                rows = [start + i for i in good]
                logits[rows], probs[rows] = out["logits"], out["probabilities"]
            report.advance(len(decoded), sum(1 for d in decoded if d[0] is None))
    report.done()
    return logits, probs, errors


class Progress:
    """A bar on a terminal, else a line every few seconds (as ``cnnserve score`` shows its progress)."""

    EVERY_S = 5.0

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.count, self.failed = what, total, 0, 0
        self.t0 = self.shown = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, n: int, failed: int) -> None:
        self.count += n
        self.failed += failed
        now = time.perf_counter()
        if self.tty or now - self.shown >= self.EVERY_S:
            self.shown = now
            self._line("\r" if self.tty else "")

    def _line(self, start: str, end: str = "") -> None:
        rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
        text = (f"{start}{self.what}: {self.count:,}/{self.total:,} images ({self.count / max(self.total, 1):.0%}), "
                f"{rate:.0f} img/s, {self.failed} failed")
        print(text, end=end if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        self._line("\r" if self.tty else "", "\n")


def calibrated_as(model, logits: np.ndarray, probs: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """The probabilities each answer gave: the graph's (temperature-scaled) where ``calibrated`` is true or
    unknown, the raw softmax where the recorded answer had ``calibrated=false``."""
    from cnnserve.core.confidence import raw_softmax

    raw = ~calibrated
    if raw.any() and model.info.temperature != 1.0:
        probs = probs.copy()
        probs[raw] = raw_softmax(np.nan_to_num(logits[raw]))
    return probs
