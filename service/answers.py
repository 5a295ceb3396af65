"""What the answers were, recorded off the request path: drift per served model (``Monitor``) and Triton's
statistics per model version (``Statistics``).

**Drift**: what the answers look like now against what the export saw on the test split. The request path only
appends each batch the model ran (logits and probabilities, whatever protocol asked) to a bounded queue (one
``deque.append`` per batch); a daemon thread drains it every ``interval`` seconds (and ``/models/NAME/monitor``
drains it first) into:

- ``cnnserve_top1_probability`` and ``cnnserve_ood_score`` histograms, per model;
- ``cnnserve_predicted_class`` counter per model and class (classes are the model's own labels: a closed
  set; a model with more than ``MAX_CLASS_LABELS`` classes is counted as one ``other`` series);
- ``cnnserve_out_of_distribution`` counter, per model;
- ``cnnserve_class_psi`` gauge: the population stability index of the predicted-class distribution over
  the last ``window`` answers against the test split's predicted classes (``KEY_OOD``'s
  ``test_class_mix``). Rule of thumb: under 0.1 stable, 0.1-0.25 moderate, over 0.25 a real shift.

A row that holds NaN or infinity (a broken model; its request was answered with an error) is counted apart,
``not_finite`` in ``/models/NAME/monitor``, and nowhere else, so every figure stays a number.

**Statistics**: one worker's counts of what each model version did, for Triton's statistics extension
(``triton.py``): requests by part (count and nanoseconds), images, batches, and per batch size; written to the
server's folder for the other workers' answers to sum (``Statistics.flush``, ``Statistics.merged``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque, namedtuple
from pathlib import Path

import numpy as np

from cnnserve.core.confidence import ood_scores, threshold
from cnnserve.core.runtime import Model

from .metrics import observe_many

log = logging.getLogger("cnnserve.drift")

MAX_CLASS_LABELS = 100
Answered = namedtuple("Answered", "name version spec info")  # the model version a batch came from
PENDING = 8192  # batches queued for the drain at most (past it the oldest go uncounted)
EPS = 1e-4


def psi(current: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two distributions over the same classes (each smoothed by EPS)."""
    p = np.asarray(current, np.float64) + EPS
    q = np.asarray(reference, np.float64) + EPS
    p, q = p / p.sum(), q / q.sum()
    return float(((p - q) * np.log(p / q)).sum())


class Monitor:
    def __init__(self, newest, names, metrics=None, window: int = 1000, interval: float = 1.0):
        """``newest(name)``: the version of a model new requests get, or None once it is unloaded (the
        registry's); ``names``: the models served at start (one loaded at runtime gets its state on first use)."""
        self.newest, self.metrics, self.window = newest, metrics, window
        self.pending: deque = deque(maxlen=PENDING)
        self.lock = threading.Lock()
        self.state: dict = {}
        for name in names:
            self._state(name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="cnnserve-drift", daemon=True)
        self._thread.start()

    def _state(self, model: str) -> dict:
        return self.state.setdefault(model, self._state_fresh())

    def _state_fresh(self) -> dict:
        return {"recent": deque(maxlen=self.window), "answers": 0, "out_of_distribution": 0, "top1_sum": 0.0,
                "ood_sum": 0.0, "not_finite": 0}

    def record(self, model, logits: np.ndarray, probs: np.ndarray, scores: np.ndarray | None = None) -> None:
        """The request path's part, once per batch the model ran (every protocol's answers: /classify,
        /v2 infer, gRPC): one append of the batch's logits and probabilities (N x K each), their OOD scores where
        the batch has them (else the drain computes them), and what the drain needs of the version that made
        them (not the model itself: a replaced version is closed and freed when its last request ends, not a
        drain later)."""
        self.pending.append((Answered(model.name, model.version, model.spec, model.info), logits, probs, scores))

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the thread must live on (a model unloaded mid-drain, ...)
                log.exception("drift: a drain failed; the next one runs as usual")

    def drain(self) -> None:
        """What is queued, a model version at a time, in a few numpy calls and one metric update per series
        (``metrics.observe_many``): per answer, this thread held the GIL long enough to cost the requests.
        The class PSI of a model is against the reference of the version that answered last: the served set may
        change meanwhile (another thread loads and unloads), so nothing here looks the model up again."""
        with self.lock:
            batches: dict = {}
            while self.pending:
                try:
                    model, logits, probs, scores = self.pending.popleft()
                except IndexError:
                    break
                if scores is None:
                    scores = ood_scores(model.info.ood, logits, model.info.temperature)
                entry = batches.setdefault((model.name, model.version), (model, [], [], []))
                for parts, part in zip(entry[1:], (logits, probs, scores)):
                    parts.append(part)
            touched: dict = {}
            for model, *parts in batches.values():
                if self.newest(model.name) is None:  # unloaded since it answered
                    continue
                touched[model.name] = model
                self._add(model, *map(np.concatenate, parts))
            if self.metrics:
                for name, model in touched.items():
                    value = self.psi(name, model)
                    if value is not None:
                        self.metrics.class_psi.labels(name).set(value)

    def _add(self, model, logits: np.ndarray, probs: np.ndarray, scores: np.ndarray) -> None:
        k = model.spec.num_classes
        finite = np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1) & np.isfinite(scores)
        dropped = len(finite) - int(finite.sum())
        if dropped:  # answered as an error (a model's NaN): counted apart, so the means and /monitor stay numbers
            self._state(model.name)["not_finite"] += dropped
            probs, scores = probs[finite], scores[finite]
            if not len(probs):
                return
        classes, top1 = probs.argmax(axis=1), probs.max(axis=1)
        limit = threshold(model.info)
        outside = 0 if limit is None else int((~(scores <= limit)).sum())  # NaN: outside, as assess says
        s = self._state(model.name)
        if s.setdefault("classes", k) != k:  # a new version with other classes: its window starts afresh
            s = self.state[model.name] = {**self._state_fresh(), "classes": k, "not_finite": s["not_finite"]}
        s["recent"].extend(classes.tolist())
        s["answers"] += len(classes)
        s["out_of_distribution"] += outside
        s["top1_sum"] += float(top1.sum())
        s["ood_sum"] += float(scores.sum())
        if self.metrics:
            self._observe(model, classes, top1, scores, outside)

    def _observe(self, model, classes, top1, scores, outside: int) -> None:
        """Into /metrics, under the labels of the version that answered."""
        m, name, labels = self.metrics, model.name, model.spec.labels
        observe_many(m.top1_probability.labels(name), top1)
        observe_many(m.ood_score.labels(name), scores)
        few = len(labels) <= MAX_CLASS_LABELS
        for c, n in zip(*np.unique(classes, return_counts=True)):
            m.predicted_class.labels(name, labels[int(c)] if few else "other").inc(int(n))
        if outside:
            m.out_of_distribution.labels(name).inc(outside)

    @staticmethod
    def reference(model) -> np.ndarray | None:
        """The test split's class mix of ``model`` (a served version, or what a batch recorded of one)."""
        mix = model.info.ood.get("test_class_mix")
        k = model.spec.num_classes
        return np.asarray(mix, np.float64) if isinstance(mix, list) and len(mix) == k else None

    def mix(self, name: str, k: int) -> np.ndarray:
        recent = self._state(name)["recent"]
        counts = np.bincount(np.fromiter(recent, int, len(recent)), minlength=k)
        return counts if len(counts) == k else np.zeros(k, np.int64)  # a window of another version's classes

    def psi(self, name: str, model) -> float | None:
        ref = self.reference(model)
        counts = self.mix(name, model.spec.num_classes)
        return None if ref is None or not counts.sum() else psi(counts / counts.sum(), ref)

    def snapshot(self, model) -> dict:
        """``/models/NAME/monitor``: the window's class mix against the reference, its PSI, running means, for
        ``model`` (the version the request holds; a name: the version served now). One view: the model is
        looked up once, whatever other models are loaded and unloaded meanwhile (a lookup per step once answered
        500 when another model's unload fell between two of them)."""
        if isinstance(model, str):
            found = self.newest(model)
            if found is None:
                raise KeyError(f"no model named {model!r} is served")
            model = found
        self.drain()
        with self.lock:
            name, labels = model.name, model.spec.labels
            s = self._state(name)
            counts, ref = self.mix(name, model.spec.num_classes), self.reference(model)
            n = s["answers"]
            return {"model": name, "worker": os.getpid(), "answers": n,
                    "window": {"size": self.window, "answers": int(counts.sum()),
                               "classes": dict(zip(labels, counts.tolist()))},
                    "reference_classes": None if ref is None else dict(zip(labels, np.round(ref, 6).tolist())),
                    "class_psi": self.psi(name, model), "out_of_distribution": s["out_of_distribution"],
                    "out_of_distribution_rate": s["out_of_distribution"] / n if n else None,
                    "mean_top1_probability": s["top1_sum"] / n if n else None,
                    "mean_ood_score": s["ood_sum"] / n if n else None,
                    "not_finite": s["not_finite"]}

    def close(self) -> None:
        self._stop.set()


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
