"""Rollout on live traffic, in the service: what each version answered (to join clients' labels on), a canary
share of the requests that name no version, a shadow candidate run beside the primary, and the figures that
promote decides on (docs/rollout.md).

**Answers and feedback.** A worker keeps what it answered (request id, image index, model, version, top-1 class)
in a bounded in-memory buffer (a deque append on the request path, nothing more) that its sync thread
(``workers.WorkerSync.step``) flushes into one SQLite file in the server's folder (``rollout.sqlite``, WAL mode, one
transaction per flush), the same file for every worker, so a label sent to any worker finds the answer another
gave. Each model keeps its newest ``feedback_ring`` answers; older ones are deleted (their ids answer 404). A
label is a class name or index of the model, never a string of the client's in a metric label.

**Routes.** The desired set the workers share (``models.json``) holds per model ``{"canary": {"version",
"percent"}, "shadow": {"version", "rate"}, "previous": version}``; a control request records them
(``rollout_api.py``), every worker applies them after loading the candidate beside the newest (by version only).

- **Canary** (``Rollout.canary``, called by ``Engine.call`` for a request that names no version): a request whose
  id hashes (blake2b, the same in every worker and every run, unlike ``hash()``) below the share goes to the
  candidate, so a retry with the same ``X-Request-ID`` sees the same version.
- **Shadow** (``Rollout.answered``, called by ``Engine.run`` once the primary has answered): a sample of the
  primary's requests is run again on the candidate at bulk priority in a task of its own, never awaited by the
  request; it is dropped (and counted) when the candidate already holds ``shadow_queue`` images, or when the
  primary is busy with other requests and the worker's shadow credit (``shadow_share`` of its time) is spent, so
  under load the shadow goes first. Top-1 agreement, |dp| (the candidate's probability of the primary's class
  against the primary's) and the candidate's milliseconds go to the same file.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

log = logging.getLogger("cnnserve.rollout")

DB = "rollout.sqlite"
#: The classes whose confusion /metrics carries per version (the most labelled ones): a bounded label set.
TOP_CLASSES = 5
#: a busy worker saves up to CREDIT_S of shadow work; a run costs at least RUN_COST_S (its submit and thread hop)
CREDIT_S, RUN_COST_S = 0.25, 0.0002

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (seq INTEGER PRIMARY KEY, model TEXT, id TEXT, idx INTEGER, version TEXT,
                                    top1 INTEGER, at REAL);
CREATE INDEX IF NOT EXISTS answers_by_id ON answers (model, id, idx);
CREATE TABLE IF NOT EXISTS labels (seq INTEGER PRIMARY KEY, model TEXT, id TEXT, idx INTEGER, version TEXT,
                                   top1 INTEGER, label INTEGER, at REAL, UNIQUE (model, id, idx));
CREATE TABLE IF NOT EXISTS shadows (seq INTEGER PRIMARY KEY, model TEXT, id TEXT, idx INTEGER, primary_version TEXT,
                                    candidate TEXT, primary_top1 INTEGER, top1 INTEGER, dp REAL, ms REAL, at REAL);
CREATE INDEX IF NOT EXISTS shadows_by_id ON shadows (model, id, idx);
CREATE TABLE IF NOT EXISTS dropped (model TEXT, candidate TEXT, n INTEGER, PRIMARY KEY (model, candidate));
CREATE INDEX IF NOT EXISTS answers_by_age ON answers (model, seq);
CREATE INDEX IF NOT EXISTS labels_by_age ON labels (model, seq);
CREATE INDEX IF NOT EXISTS shadows_by_age ON shadows (model, seq);
"""


#: A model's rows beyond its newest ``ring`` out, through the (model, seq) index: without, SQLite sorted all of them
#: at every flush (6 ms of CPU at a ring of 10,000, 60 at 100,000, holding the GIL for much of it).
TRIM = ("DELETE FROM {table} WHERE model = ? AND seq <= (SELECT seq FROM {table} WHERE model = ? ORDER BY seq DESC "
        "LIMIT 1 OFFSET ?)")


def share(request_id: str) -> float:
    """Where a request id falls in [0, 1): the same in every worker, replica and run."""
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Store:
    """The server's answers, labels and shadow comparisons: one SQLite file every worker writes."""

    def __init__(self, path: str | os.PathLike, ring: int) -> None:
        self.path, self.ring = Path(path), max(1, ring)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        # one worker at a time: two workers starting together made the file at once, and switching it to WAL
        # answered "database is locked" at once (SQLite does not wait for that lock) and stopped the server
        with self.lock, open(self.path.with_name(self.path.name + ".lock"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last flushes
            self.db.executescript(SCHEMA)

    def write(self, answers: list, shadows: list, dropped: dict) -> None:
        """One transaction: the buffered rows in, the rows beyond the ring of each model out."""
        if not (answers or shadows or dropped):
            return
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT INTO answers (model, id, idx, version, top1, at) VALUES (?,?,?,?,?,?)",
                                    answers)
                self.db.executemany("INSERT INTO shadows (model, id, idx, primary_version, candidate, primary_top1,"
                                    " top1, dp, ms, at) VALUES (?,?,?,?,?,?,?,?,?,?)", shadows)
                self.db.executemany("INSERT INTO dropped VALUES (?,?,?) ON CONFLICT (model, candidate) "
                                    "DO UPDATE SET n = n + excluded.n", [(m, c, n) for (m, c), n in dropped.items()])
                for table, rows in (("answers", answers), ("shadows", shadows)):
                    for model in {r[0] for r in rows}:
                        self._trim(table, model)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _trim(self, table: str, model: str) -> None:
        self.db.execute(TRIM.format(table=table), (model, model, self.ring))

    def answer(self, model: str, request_id: str, index: int) -> tuple[str, int] | None:
        """The version that answered image ``index`` of request ``request_id`` and its top-1 class (the newest such
        answer: an id a client reuses is the last request's), or None."""
        with self.lock:
            row = self.db.execute("SELECT version, top1 FROM answers WHERE model = ? AND id = ? AND idx = ? "
                                  "ORDER BY seq DESC LIMIT 1", (model, request_id, index)).fetchone()
        return (row[0], row[1]) if row else None

    def label(self, model: str, request_id: str, index: int, version: str, top1: int, label: int) -> None:
        """A client's label for an answer (a second label for the same answer replaces the first); the newest
        ``ring`` labels per model are kept."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO labels (model, id, idx, version, top1, label, at) "
                                "VALUES (?,?,?,?,?,?,?)", (model, request_id, index, version, top1, label, time.time()))
                self._trim("labels", model)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def figures(self, model: str) -> dict:
        """Per version: labelled, correct, accuracy and the confusion counts; per (primary, candidate) pair of a
        shadow: compared, agreement, mean |dp|, the candidate's ms (mean, p99) and its accuracy on the labels."""
        with self.lock:
            q = self.db.execute
            versions = {}
            for version, n, right in q("SELECT version, COUNT(*), SUM(top1 = label) FROM labels WHERE model = ? "
                                       "GROUP BY version", (model,)):
                versions[version] = {"labelled": n, "correct": right, "accuracy": right / n, "confusion": []}
            for version, label, top1, n in q("SELECT version, label, top1, COUNT(*) FROM labels WHERE model = ? "
                                             "GROUP BY version, label, top1 ORDER BY COUNT(*) DESC", (model,)):
                versions[version]["confusion"].append({"label": label, "predicted": top1, "count": n})
            shadows = []
            for primary, cand, n, agree, dp in q(
                    "SELECT primary_version, candidate, COUNT(*), AVG(primary_top1 = top1), AVG(dp) FROM shadows "
                    "WHERE model = ? GROUP BY primary_version, candidate", (model,)).fetchall():
                ms = [r[0] for r in q("SELECT ms FROM shadows WHERE model = ? AND primary_version = ? AND candidate "
                                      "= ? ORDER BY ms", (model, primary, cand))]
                labelled, right = q("SELECT COUNT(*), COALESCE(SUM(s.top1 = l.label), 0) FROM shadows s JOIN labels l "
                                    "ON s.model = l.model AND s.id = l.id AND s.idx = l.idx WHERE s.model = ? AND "
                                    "s.primary_version = ? AND s.candidate = ?", (model, primary, cand)).fetchone()
                shadows.append({"primary": primary, "candidate": cand, "compared": n, "agreement": agree,
                                "mean_abs_dp": dp, "candidate_ms_mean": sum(ms) / len(ms),
                                "candidate_ms_p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
                                "labelled": labelled, "accuracy": right / labelled if labelled else None})
            dropped = {c: n for c, n in q("SELECT candidate, n FROM dropped WHERE model = ?", (model,))}
        for s in shadows:
            s["dropped"] = dropped.get(s["candidate"], 0)
        return {"ring": self.ring, "versions": versions, "shadow": shadows, "shadow_dropped": dropped}

    def close(self) -> None:
        with self.lock:
            self.db.close()


def candidate_figures(figures: dict, primary: str, candidate: str) -> dict:
    """What promote decides on (``Store.figures``): the candidate's labelled answers (its canary answers and its
    shadow runs on labelled requests) and accuracy, the primary's, and the pair's shadow agreement."""
    mine = figures["versions"].get(candidate, {})
    pair = next((s for s in figures["shadow"] if s["primary"] == primary and s["candidate"] == candidate), {})
    labelled = mine.get("labelled", 0) + pair.get("labelled", 0)
    right = mine.get("correct", 0) + round((pair.get("accuracy") or 0) * pair.get("labelled", 0))
    theirs = figures["versions"].get(primary, {})
    return {"primary": primary, "candidate": candidate, "labelled": labelled,
            "accuracy": right / labelled if labelled else None, "primary_labelled": theirs.get("labelled", 0),
            "primary_accuracy": theirs.get("accuracy"), "compared": pair.get("compared", 0),
            "agreement": pair.get("agreement")}


def promotion_failures(f: dict, min_agreement: float, min_labelled: int, min_accuracy_gain: float) -> list[str]:
    """Which of promote's thresholds ``f`` (``candidate_figures``) fails, in words; empty: it passes."""
    failed = []
    if f["labelled"] < min_labelled:
        failed.append(f"labelled: the candidate has {f['labelled']} labelled answers, fewer than min_labelled "
                      f"{min_labelled} (send labels to POST /v2/models/NAME/feedback)")
    if min_agreement > 0:
        if not f["compared"]:
            failed.append(f"agreement: no shadow runs of the candidate beside {f['primary']} to measure it (run a "
                          "shadow, or min_agreement 0)")
        elif f["agreement"] < min_agreement:
            failed.append(f"agreement: the candidate agreed with {f['primary']} on {f['agreement']:.4f} of "
                          f"{f['compared']} shadowed requests, below min_agreement {min_agreement:g}")
    if min_labelled > 0:
        if f["accuracy"] is None or f["primary_accuracy"] is None:
            failed.append(f"accuracy: cannot compare (the candidate has {f['labelled']} labelled answers, "
                          f"{f['primary']} {f['primary_labelled']})")
        elif f["accuracy"] < f["primary_accuracy"] + min_accuracy_gain:
            failed.append(f"accuracy: the candidate's {f['accuracy']:.4f} on {f['labelled']} labels is below "
                          f"{f['primary']}'s {f['primary_accuracy']:.4f} on {f['primary_labelled']} plus "
                          f"min_accuracy_gain {min_accuracy_gain:g}")
    return failed


class Rollout:
    """One worker's part: its routes (applied from the desired set), its buffers, and the server's ``Store``."""

    def __init__(self, registry, folder: str | os.PathLike, settings, metrics=None) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.store = Store(Path(folder) / DB, settings.feedback_ring)
        self.routes: dict[str, dict] = {}
        # between two flushes (model_sync_s): bounded, so a stalled flush cannot grow a worker
        self.answers: deque = deque(maxlen=max(1, settings.feedback_ring))
        self.shadows: deque = deque(maxlen=max(1, settings.feedback_ring))
        self.dropped: Counter = Counter()  # (model, candidate): shadow runs dropped since the last flush
        self.tasks: set = set()  # the shadow runs under way (held, or the loop could collect them)
        self.credit, self.credit_at = 0.0, time.monotonic()  # seconds of shadow work a busy worker may still do

    # -- on the request path ----------------------------------------------------------------------------------

    def canary(self, name: str | None, request_id: str | None) -> str | None:
        """The version a request that names none goes to: the canary's for its share of request ids, else None
        (the newest). A candidate this worker has not loaded (yet) is not chosen."""
        route = self.routes.get(name or self.registry.default)
        canary = route.get("canary") if route else None
        if not canary:
            return None
        if (share(request_id) if request_id else random.random()) >= canary["percent"] / 100:
            return None
        versions = self.registry.served.get(name or self.registry.default, ())
        return canary["version"] if any(s.model.version == canary["version"] for s in versions) else None

    def answered(self, call, pixels: np.ndarray, out: list) -> None:
        """What ``call``'s version answered (``out``: logits, probabilities, OOD scores) into the buffer, and for
        a sampled request of the primary, its shadow run started."""
        model = call.model
        top1 = np.argmax(out[1], axis=1)
        rid = call.request_id
        if rid is not None:
            at = time.time()
            self.answers.extend((model.name, rid, i, model.version, c, at) for i, c in enumerate(top1.tolist()))
        route = self.routes.get(model.name)
        shadow = route.get("shadow") if route else None
        if not shadow or shadow["version"] == model.version or random.random() >= shadow["rate"]:
            return
        versions = self.registry.served.get(model.name, ())
        if not versions or versions[-1] is not call.served:
            return  # only the primary's answers are shadowed (not a pinned or canary version's)
        cand = next((s for s in versions if s.model.version == shadow["version"]), None)
        if cand is None:
            return
        if not self._room(call.served.batcher, cand.batcher, len(pixels)):
            self.dropped[model.name, cand.model.version] += 1
            return
        with self.registry.lock:  # held until its run ends, as a request holds its version
            cand.holders += 1
        task = asyncio.get_running_loop().create_task(self._shadow(cand, call.served, rid, pixels, top1, out[1]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _room(self, primary, cand, n: int) -> bool:
        """Whether a shadow run of ``n`` images may start: within ``shadow_queue``, and the primary idle, or the
        worker's credit (``shadow_share`` of its time) covering the run's measured cost. A busy compute-bound model
        shadowed beyond such a share (ResNet-18 at 64 clients) kept 0.3 of its throughput."""
        if cand._queued + cand._running + n > self.settings.shadow_queue:
            return False
        if not (primary._queued or primary._running):
            return True
        now = time.monotonic()
        saved = self.credit + (now - self.credit_at) * self.settings.shadow_share
        self.credit, self.credit_at = min(CREDIT_S, saved), now
        cost = max(cand._per_image * n, RUN_COST_S)
        if cost > self.credit:
            return False
        self.credit -= cost
        return True

    async def _shadow(self, cand, primary, rid, pixels, top1, probs) -> None:
        t = time.perf_counter()
        try:
            out = await cand.batcher.submit(pixels, None, priority="bulk")
        except Exception:  # noqa: BLE001 - overloaded, closed: a shadow is dropped, never an error of anyone's
            self.dropped[primary.model.name, cand.model.version] += 1
            return
        finally:
            self.registry.release(cand)
        ms = (time.perf_counter() - t) * 1000
        theirs = np.argmax(out[1], axis=1)
        rows = np.arange(len(top1))
        dp = np.abs(out[1][rows, top1] - probs[rows, top1])
        at = time.time()
        for i in range(len(top1)):
            self.shadows.append((primary.model.name, rid if rid is not None else "", i, primary.model.version,
                                 cand.model.version, int(top1[i]), int(theirs[i]), float(dp[i]), ms, at))

    # -- in the sync thread ---------------------------------------------------------------------------------

    def flush(self) -> None:
        answers, shadows = _take(self.answers), _take(self.shadows)
        dropped, self.dropped = self.dropped, Counter()
        try:
            self.store.write(answers, shadows, dropped)
        except sqlite3.Error as e:  # a full disk, say: the answers are lost, serving is not
            log.warning("rollout: %d answers and %d shadow runs not recorded: %s", len(answers), len(shadows), e)

    def apply(self, desired: dict) -> None:
        self.routes = desired.get("routes", {}) or {}

    def update_metrics(self, served: dict) -> None:
        """The figures of each served model into /metrics (labels: model, version, and class names of the model)."""
        if self.metrics is None:  # the service's metrics are off (or an engine in a test): no /metrics to set
            return
        m = self.metrics
        for name in served:
            versions = self.registry.served.get(name)
            if not versions:
                continue
            labels = versions[-1].model.spec.labels
            figures = self.store.figures(name)
            for version, f in figures["versions"].items():
                if version not in served[name]:
                    continue  # a version no longer served is not a label of /metrics any more
                m.feedback_labelled.labels(name, version).set(f["labelled"])
                m.feedback_accuracy.labels(name, version).set(f["accuracy"])
                for c in f["confusion"][:TOP_CLASSES * TOP_CLASSES]:
                    if c["label"] < len(labels) and c["predicted"] < len(labels):
                        m.feedback_confusion.labels(name, version, labels[c["label"]],
                                                   labels[c["predicted"]]).set(c["count"])
            for s in figures["shadow"]:
                if s["primary"] in served[name] and s["candidate"] in served[name]:
                    m.shadow_agreement.labels(name, s["primary"], s["candidate"]).set(s["agreement"])
                    m.shadow_dropped.labels(name, s["primary"], s["candidate"]).set(s["dropped"])

    def close(self) -> None:
        self.flush()
        self.store.close()


def _take(buffer: deque) -> list:
    """What a buffer holds now, taken out: the event loop appends meanwhile (to a full one, dropping its oldest, so
    it never holds fewer), and only the sync thread takes."""
    return [buffer.popleft() for _ in range(len(buffer))]
