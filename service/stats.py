"""One worker's counts of what each model version did, for Triton's statistics extension (``triton.py``): requests
by part (count and nanoseconds), images, batches, and per batch size; written to the server's folder for the
other workers' answers to sum (``Statistics.flush``, ``Statistics.merged``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from cnnserve.core.runtime import Model

STATS = "stats"
#: What a request's time splits into, as Triton names the parts (``inference_stats``).
REQUEST_PARTS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
#: What a batch's time splits into (``batch_stats``).
BATCH_PARTS = ("compute_input", "compute_infer", "compute_output")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class Statistics:
    """One worker's counts, per model version: requests by part (count, ns), images, batches, and per batch size."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, dict] = {}  # "name:version" -> figures (``_fresh``)
        self.changed = False

    @staticmethod
    def _fresh(name: str, version: str) -> dict:
        return {"name": name, "version": version, "last_inference": 0, "inference_count": 0, "execution_count": 0,
                "inference_stats": {p: [0, 0] for p in REQUEST_PARTS}, "batch_stats": {}}

    def _of(self, model: Model) -> dict:
        key = f"{model.name}:{model.version}"
        entry = self.models.get(key)
        if entry is None:
            entry = self.models[key] = self._fresh(model.name, model.version)
        return entry

    def request(self, model: Model, images: int, ok: bool, total: float, compute_input: float = 0.0,
                queue: float = 0.0, infer: float = 0.0, output: float = 0.0) -> None:
        """One request that reached ``model``: ``images`` of them, answered (``ok``) or failed, its seconds."""
        with self.lock:
            s = self._of(model)
            stats = s["inference_stats"]
            part = stats["success" if ok else "fail"]
            part[0] += 1
            part[1] += _ns(total)
            if ok:
                for name, seconds in (("compute_input", compute_input), ("queue", queue), ("compute_infer", infer),
                                      ("compute_output", output)):
                    stats[name][0] += 1
                    stats[name][1] += _ns(seconds)
                s["inference_count"] += images
                s["last_inference"] = int(time.time() * 1000)
            self.changed = True

    def execution(self, model: Model, size: int, compute_input: float, infer: float, output: float) -> None:
        """One batch of ``size`` images run by ``model``."""
        with self.lock:
            s = self._of(model)
            s["execution_count"] += 1
            batch = s["batch_stats"].setdefault(str(size), {p: [0, 0] for p in BATCH_PARTS})
            for name, seconds in (("compute_input", compute_input), ("compute_infer", infer),
                                  ("compute_output", output)):
                batch[name][0] += 1
                batch[name][1] += _ns(seconds)
            self.changed = True

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.models))

    def flush(self, folder: str | os.PathLike) -> None:
        """This worker's figures into the server's folder, if they changed since the last flush."""
        if not self.changed:
            return
        self.changed = False
        path = Path(folder) / STATS / f"{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)

    def merged(self, folder: str | os.PathLike | None) -> dict:
        """Every worker's figures summed: this worker's as they are now, the others' as last written."""
        total = self.snapshot()
        if folder is None:
            return total
        for path in (Path(folder) / STATS).glob("*.json"):
            if path.stem == str(os.getpid()):
                continue
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for key, s in other.items():
                _add(total.setdefault(key, self._fresh(s["name"], s["version"])), s)
        return total


def _add(into: dict, s: dict) -> None:
    into["last_inference"] = max(into["last_inference"], s["last_inference"])
    into["inference_count"] += s["inference_count"]
    into["execution_count"] += s["execution_count"]
    for part, (count, ns) in s["inference_stats"].items():
        into["inference_stats"][part][0] += count
        into["inference_stats"][part][1] += ns
    for size, parts in s["batch_stats"].items():
        batch = into["batch_stats"].setdefault(size, {p: [0, 0] for p in BATCH_PARTS})
        for part, (count, ns) in parts.items():
            batch[part][0] += count
            batch[part][1] += ns
