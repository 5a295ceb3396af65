"""The model registry: the one owner of the served models. Each loaded version (``Served``) holds its model,
its batcher and its explanation jobs; the registry looks them up for requests, loads stored versions at
runtime, swaps them in, releases the old ones when their last request is done and keeps a memory budget;
``workers.converge`` brings it to the served set every worker shares (``modelstate.py``). The engine keeps no
models. docs/runtime.md tells the whole story; in short:

- **Try, load beside, then switch.** A trial in a process of its own (``cnnserve.core.servable.trial``: a
  deadline and a memory cap that a thread could not have), then the load in a thread while the served version
  keeps answering, then one step under the lock makes it the newest. A failed load changes nothing that serves.
- **Reference counted.** A request holds every version it looks up until it ends (``request_scope``): a
  replaced version finishes its queued requests, then its batcher and session close. One looked up outside
  any scope is kept ``LOOSE_GRACE_S`` more seconds.
- **Versions and memory.** The newest ``keep_versions`` stay reachable by version; past
  ``max_model_memory_mb`` the least recently used idle versions go, or the load is refused with the figures.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from cnnserve.core.runtime import Model, ModelLoadError, load_model
from cnnserve.core.servable import NotServable, trial

from .budget import MB, OverBudget, evictions, rss_bytes
from .errors import APIError, short
from .memory import trim_memory

log = logging.getLogger("cnnserve.registry")
#: How long a version looked up outside any request scope stays open after it is replaced (``_closable``).
LOOSE_GRACE_S = 60.0

#: The models the current request holds (``request_scope``).
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("cnnserve_held", default=None)


class LoadFailed(Exception):
    """A version that could not be loaded (or fit), with the reason in words; ``status`` for HTTP."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(eq=False)
class Served:
    """One loaded version: its model, its batcher, who holds it, and what it costs."""

    model: Model
    batcher: object
    size: int = 0
    #: the batcher jobs of its explanations, one per method (``explain.explanation_job``), closed with it
    jobs: dict = field(default_factory=dict)
    holders: int = 0
    last_used: float = field(default_factory=time.monotonic)
    born: float = field(default_factory=time.monotonic)
    retired: bool = False
    #: when a caller outside any ``request_scope`` last looked it up (it cannot be counted, so it is given time)
    loose_at: float = float("-inf")

    @property
    def key(self) -> str:
        return f"{self.model.name}:{self.model.version}"


@contextmanager
def request_scope():
    """The span of one request: every model it looks up (``ModelRegistry.lookup``) is held until it ends."""
    held: list = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)
        for registry, served in held:
            registry.release(served)


class ModelRegistry:
    """The served versions by name, oldest to newest; ``make_batcher(model)`` gives a new version its batcher and
    ``grow(values)`` makes room for a larger input in the decoding buffers."""

    def __init__(self, models: list[Model], settings, make_batcher, grow=lambda values: None, metrics=None) -> None:
        if not models:
            raise ValueError("no models to serve")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {names}")
        self.settings, self.metrics = settings, metrics
        self.make_batcher, self.grow = make_batcher, grow
        #: the operator's default: what a request without a model gets, served or not (``lookup`` refuses then)
        self.default = models[0].name
        self.lock = threading.RLock()
        self.load_lock = threading.Lock()  # one load at a time: each is measured alone, and CPU is scarce
        self.served: dict[str, list[Served]] = {}  # by name, oldest to newest
        self.retiring: list[Served] = []
        self.failed: dict[str, str] = {}  # name:version -> why its last load failed
        self.loading: set[str] = set()
        self.loop = None
        self._freed = False  # a version was closed since the last sweep: its memory goes back to the system
        for m in models:
            self._add(Served(m, make_batcher(m), self._file_size(m)))

    # -- requests -------------------------------------------------------------------------------------

    def lookup(self, name: str | None, version: str | None = None) -> Served:
        """The served version (the newest, or ``version``) of ``name``, or of the default without a name, held by
        the current request. Without a name while the default is not served: 409, never another model."""
        with self.lock:
            if not name:
                if self.default not in self.served:
                    raise APIError(409, "default_unavailable", f"this request names no model and the default "
                                   f"model, {self.default!r}, is not loaded: name one of {', '.join(self.served)} "
                                   "(the model parameter), or load the default again or set another (a load with "
                                   "{\"parameters\": {\"default\": true}})")
                name = self.default
            versions = self.served.get(name)
            if not versions:
                raise APIError(404, "unknown_model", f"no model named {short(name)}; serving: "
                               f"{', '.join(self.served)}")
            if version in (None, ""):
                s = versions[-1]
            else:
                s = next((v for v in versions if v.model.version == version), None)
                if s is None:
                    raise APIError(404, "unknown_version", f"model {name!r} has version "
                                   f"{' and '.join(repr(v.model.version) for v in versions)}, not {short(version)}")
            held = _HELD.get()
            s.last_used = time.monotonic()
            if held is not None:
                s.holders += 1
                held.append((self, s))
            else:
                s.loose_at = s.last_used
        if self.loop is None:
            self.loop = _running_loop()
        return s

    def newest(self, name: str) -> Model | None:
        """The version of ``name`` new requests get, without holding it (the drift monitor's view), or None."""
        versions = self.served.get(name)
        return versions[-1].model if versions else None

    def current(self) -> list[Served]:
        """The newest version of each served model, the default first."""
        with self.lock:
            return sorted((v[-1] for v in self.served.values() if v), key=lambda s: s.model.name != self.default)

    def release(self, served: Served) -> None:
        with self.lock:
            served.holders -= 1
            done = served.retired and self._closable(served)
        if done:
            self._close(served)

    # -- changes --------------------------------------------------------------------------------------

    def load(self, name: str, version: str, path: str, newest: bool = True) -> tuple[Served, list[Served]]:
        """Load, warm and switch to ``name:version`` from ``path`` (blocking: call it in a thread). Returns
        the new version and the versions evicted for the memory budget; ``LoadFailed`` leaves all as it was.
        ``newest=False``: load it as the oldest version of ``name``, reachable by version only."""
        key = f"{name}:{version}"
        with self.load_lock:
            with self.lock:
                existing = next((s for s in self.served.get(name, ()) if s.model.version == version), None)
                if existing is not None:  # loaded already: make it the newest
                    if newest:
                        self.served[name].remove(existing)
                        self.served[name].append(existing)
                    return existing, []
                self.loading.add(key)
                self.failed.pop(key, None)
            t = time.perf_counter()
            before = rss_bytes()
            try:
                s = self._load(name, version, path)
                s.size = max(rss_bytes() - before, self._file_size(s.model))
                evicted = self._fit(s)
            except LoadFailed as e:
                with self.lock:
                    self.failed[key] = str(e)
                self._count("loads", name, "failed")
                log.warning("load of %s failed: %s", key, e)
                raise
            finally:
                with self.lock:
                    self.loading.discard(key)
            seconds = time.perf_counter() - t
            with self.lock:
                self._add(s, newest)
                for old in evicted:
                    self.retire(old, "evictions")
                if newest:  # an older version is loaded only to converge on a set, which retires what it lacks:
                    self._trim(name)  # trimmed here it would be the oldest, so the very version just loaded
            if self.metrics:
                self.metrics.model_load_seconds.labels(name).observe(seconds)
            self._count("loads", name, "ok")
            log.info("loaded %s in %.2f s (%.1f MB); serving it for new requests", key, seconds, s.size / MB)
            return s, evicted

    def unload(self, name: str, version: str | None = None) -> list[Served]:
        """Stop serving ``name`` (every version, or one); requests that hold it finish first."""
        with self.lock:
            versions = [s for s in self.served.get(name, ()) if version in (None, "", s.model.version)]
            if not versions:
                raise LoadFailed(f"{name}{':' + version if version else ''} is not loaded", 404)
            if len(versions) == len(self.served[name]) and len(self.served) == 1:
                raise LoadFailed(f"{name} is the only model served; load another before unloading it", 409)
            for s in versions:
                self.retire(s, "unloads")
        return versions

    def loaded(self) -> dict[str, list[str]]:
        with self.lock:
            return {name: [s.model.version for s in v] for name, v in self.served.items()}

    def sweep(self) -> None:
        """Close retired versions whose holders are gone (those held by nothing at all but queued work)."""
        with self.lock:
            done = [s for s in self.retiring if self._closable(s)]
        for s in done:
            self._close(s)
        if self._freed:  # a closed version's session sits in cycles (its batcher's task), then in glibc's heap
            self._freed = False
            gc.collect()
            trim_memory()

    def close(self) -> None:
        with self.lock:
            everything = [s for v in self.served.values() for s in v] + self.retiring
        for s in everything:
            s.batcher.close()

    # -- inside ---------------------------------------------------------------------------------------

    def _load(self, name: str, version: str, path: str) -> Served:
        a = self.settings
        try:  # before this process allocates anything for it: a deadline and a memory cap hold only there
            trial(path, a.limits, a.max_batch_size, a.precision, a.load_timeout_s, a.load_memory_mb)
        except NotServable as e:  # named by its tag: a client has no business with the server's paths
            why = str(e).replace(path, "").replace(os.path.dirname(path) + os.sep, "").lstrip(": ")
            raise LoadFailed(f"{name}:{version}: {why}") from None
        try:
            model = load_model(path, name=name, version=version, providers=a.providers, threads=a.intra_op_threads,
                               spin=a.spin, precision=a.precision, batch_sizes=(1, a.max_batch_size), device=a.device)
        except ModelLoadError as e:
            raise LoadFailed(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a file onnxruntime or the metadata parser refuses, in words
            raise LoadFailed(f"{path}: {type(e).__name__}: {e}") from None
        c, h, w = model.spec.input_shape
        self.grow(c * h * w)  # within the image limits: the trial checked the spec against them
        return Served(model, self.make_batcher(model))

    def _fit(self, new: Served) -> list[Served]:
        """The idle versions to evict so that ``new`` fits the budget (``budget.py``), or ``LoadFailed``."""
        with self.lock:
            resident = [s for v in self.served.values() for s in v]
            try:
                return evictions(resident, new, self.settings.max_model_memory_mb * MB)
            except OverBudget as e:
                new.batcher.close()
                raise LoadFailed(str(e), 507) from None

    def _add(self, s: Served, newest: bool = True) -> None:
        versions = self.served.setdefault(s.model.name, [])
        if newest or not versions:
            versions.append(s)
        else:
            versions.insert(0, s)
        if self.metrics:
            self.metrics.model_resident_bytes.labels(s.model.name).set(self._resident(s.model.name))

    def _trim(self, name: str) -> None:
        keep = max(1, self.settings.keep_versions)
        while len(self.served.get(name, ())) > keep:
            self.retire(self.served[name][0], "unloads")

    def retire(self, s: Served, why: str) -> None:
        """Take ``s`` out of service (under the lock); closed now if nothing holds it, else by its last holder."""
        name = s.model.name
        versions = self.served.get(name, [])
        if s in versions:
            versions.remove(s)
        if not versions:
            # the default stays the operator's choice: requests without a model are refused, not rerouted
            self.served.pop(name, None)
        s.retired = True
        self.retiring.append(s)
        self._count(why, name)
        if self.metrics:
            self.metrics.model_resident_bytes.labels(name).set(self._resident(name))
        log.info("%s: %s; closed once its last request is done", s.key, why.rstrip("s"))
        if self._closable(s):
            self._close(s)

    @staticmethod
    def _closable(s: Served) -> bool:
        """Nothing holds it, nothing waits in its batcher, and no caller outside a request scope (a front end
        that does not count its requests) looked it up in the last ``LOOSE_GRACE_S`` seconds."""
        return (s.holders <= 0 and not getattr(s.batcher, "_queued", 0)
                and time.monotonic() - s.loose_at > LOOSE_GRACE_S)

    def _close(self, s: Served) -> None:
        with self.lock:
            if s not in self.retiring:
                return
            self.retiring.remove(s)
            self._freed = True
            s.jobs.clear()
        loop = self.loop
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            loop.call_soon_threadsafe(s.batcher.close)  # the batcher's task lives on the event loop
        else:
            s.batcher.close()

    def _resident(self, name: str) -> int:
        return sum(s.size for s in self.served.get(name, ()))

    def _count(self, what: str, name: str, result: str | None = None) -> None:
        if self.metrics:
            counter = getattr(self.metrics, f"model_{what}")
            (counter.labels(name, result) if result else counter.labels(name)).inc()

    @staticmethod
    def _file_size(model: Model) -> int:
        path = model.choice.get("file", "")
        return os.path.getsize(path) if os.path.isfile(path) else 0


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
