"""One worker's part in the served set its server shares (``modelstate.py``): a thread that polls the
desired set every ``model_sync_s`` seconds, converges on it through the registry (loads run in this
thread, so the event loop keeps serving), and reports what it serves and what it refused; and the wait of a
control request for every worker's report.

Decisions about the set are made once, against the shared desired set, under its file lock
(``record_load``, ``record_unload``): which model is the last one served, which is the default. A worker
only applies them, and says per generation what it could not apply (``refused``: status and reason), so a
control request answers with a worker's refusal instead of counting it as applied; a refusal is tried again
every ``RETRY_S`` seconds while the desired set still names it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time

from .registry import LoadFailed
from .modelstate import ServedState, stored_file
from .rollout import Rollout

log = logging.getLogger("cnnserve.workers")
#: How often a worker tries again what it could not apply (a load refused for memory may fit later).
RETRY_S = 10.0
#: How often a worker sets the feedback and shadow gauges of /metrics from the server's rollout file.
FIGURES_S = 5.0


class WorkerSync:
    def __init__(self, engine, state: ServedState, settings) -> None:
        """``engine``: the worker's (its registry converges; its statistics are flushed for the others)."""
        self.registry, self.stats = engine.registry, engine.stats
        self.state, self.settings = state, settings
        # the answers to join labels on, the canary and the shadow (rollout.py), in the server's one file
        self.rollout = engine.rollout = Rollout(engine.registry, state.folder, settings, engine.metrics)
        self._figured_at = float("-inf")
        self.interval = settings.model_sync_s
        # follow the store: the models started as NAME:latest (or NAME), re-resolved every follow_s seconds
        self.follow = [t.split(":")[0] for t in settings.tags if t.endswith(":latest") or ":" not in t]
        self._followed_at = time.monotonic()
        self._leader = None  # the lock file this worker holds while it is the one that follows the store
        self.pid = os.getpid()
        self.generation = -1
        self.failures: dict[str, tuple[int, str]] = {}  # name:version -> (status, reason), of the last converge
        self._retry_at = float("inf")
        self._stamp = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Report what this worker serves, then follow the desired set."""
        # not yet converged (a restarted worker loaded the newest of each model; older versions kept by
        # keep_versions follow in the thread's first step), so no control request counts this one yet
        self.generation, self._stamp = -1, None
        self.report()
        self._thread = threading.Thread(target=self._run, name="cnnserve-model-sync", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def step(self) -> None:
        """Converge once if the desired set changed since the last look."""
        stamp = self.state.stamp()
        retry = time.monotonic() >= self._retry_at
        if stamp != self._stamp or retry:
            read_at = time.monotonic()
            desired = self.state.read()
            if desired is not None and (desired.get("generation", 0) != self.generation or retry):
                self.failures = converge(self.registry, desired, lambda n, v: stored_file(n, v)[1], read_at)
                self.rollout.apply(desired)  # once its candidates are loaded
                self.generation = desired.get("generation", 0)
                self._retry_at = time.monotonic() + RETRY_S if self.failures else float("inf")
                self.report()
            self._stamp = stamp  # only once applied: a converge that raised is tried again at the next step
        self.registry.sweep()
        self.stats.flush(self.state.folder)  # for the other workers' answers (triton.py)
        self.rollout.flush()
        if time.monotonic() - self._figured_at >= FIGURES_S:  # SQL over the file: not every step
            self._figured_at = time.monotonic()
            self.rollout.update_metrics(self.registry.loaded())
        if self.settings.follow_s and self.follow and time.monotonic() - self._followed_at >= self.settings.follow_s:
            self._followed_at = time.monotonic()
            if self._lead():
                self.follow_store()

    def _lead(self) -> bool:
        """Whether this worker follows the store: one worker of the server does (the one holding the lock;
        another takes over if it dies), and the others converge on what it records."""
        if self._leader is None:
            f = open(self.state.folder / "follow.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                return False
            self._leader = f
        return True

    def follow_store(self) -> None:
        """Load the newest stored version of each followed model that the served set still names, by the path
        of a load request; a version that failed once is not tried again (its reason is in the index)."""
        desired = self.state.read() or {}
        for name in self.follow:
            served = desired.get("models", {}).get(name)
            if not served:
                continue  # unloaded since: no longer followed
            try:
                version, path = stored_file(name)
                if version == served[-1] or f"{name}:{version}" in self.registry.failed:
                    continue
                log.info("following the store: %s:latest is now %s", name, version)
                _, evicted = self.registry.load(name, version, path)
                self.record_load(name, version, evicted, max(1, self.settings.keep_versions))
            except LoadFailed as e:
                log.warning("following the store: %s: %s", name, e)
                self.report()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the thread must live on; the next change is tried again
                log.exception("converging on the served set failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def report(self) -> None:
        m = self.registry
        with m.lock:
            report = {"generation": self.generation, "models": m.loaded(), "loading": sorted(m.loading),
                      "unloading": sorted(s.key for s in m.retiring), "default": self.registry.default,
                      "failed": {**m.failed, **{k: why for k, (_, why) in self.failures.items()}},
                      "refused": {k: status for k, (status, _) in self.failures.items()}}
        self.state.report(self.pid, report)

    def record_load(self, name: str, version: str, evicted=(), keep: int = 1,
                    default: bool = False) -> tuple[int, dict]:
        """Into the desired set: ``name:version`` as its newest (the newest ``keep`` versions kept), without
        the versions the load evicted; ``default``: and the model requests without a name go to. Returns the
        generation written and the set before it (for ``roll_back``)."""
        with self.state.editing() as d:
            before = json.loads(json.dumps(d))
            models = d.setdefault("models", {})
            models[name] = ([v for v in models.get(name, []) if v != version] + [version])[-keep:]
            for s in evicted:
                left = [v for v in models.get(s.model.name, []) if v != s.model.version]
                if left:
                    models[s.model.name] = left
                else:
                    models.pop(s.model.name, None)
            if default or not d.get("default"):  # else the operator's default stays, served or not
                d["default"] = name
            d.get("routes", {}).pop(name, None)  # a plain load ends a rollout of the model: its candidates go
        return d.get("generation", 0), before

    def roll_back(self, name: str, before: dict, generation: int) -> int:
        """Undo a ``record_load`` that a worker refused: the whole set as it was if nothing changed it since
        (``generation`` is still the one written), else only ``name``'s versions and the default."""
        with self.state.editing() as d:
            if d.get("generation") == generation:
                d["models"], d["default"] = before.get("models", {}), before.get("default")
                d["routes"] = before.get("routes", {})
            else:
                if before.get("routes", {}).get(name):
                    d.setdefault("routes", {})[name] = before["routes"][name]
                else:
                    d.get("routes", {}).pop(name, None)
                models = d.setdefault("models", {})
                if before.get("models", {}).get(name):
                    models[name] = before["models"][name]
                else:
                    models.pop(name, None)
                if d.get("default") == name and before.get("default") != name:
                    d["default"] = before.get("default")
        return d.get("generation", 0)

    def record_unload(self, name: str, version: str | None = None) -> int:
        """Out of the desired set: every version of ``name``, or ``version``; decided here, under the set's lock,
        for every worker at once: ``LoadFailed`` 404 for what the set does not name, 409 for the last model
        (two unloads at the same instant cannot both pass). The default stays what the operator set. Returns
        the generation written."""
        with self.state.editing() as d:
            models = d.setdefault("models", {})
            have = models.get(name, [])
            if not have or (version and version not in have):
                raise LoadFailed(f"{name}{':' + version if version else ''} is not loaded", 404)
            left = [v for v in have if version and v != version]
            _unroute(d, name, left)
            if left:
                models[name] = left
            elif len(models) == 1:
                raise LoadFailed(f"{name} is the only model served; load another before unloading it", 409)
            else:
                models.pop(name, None)
        return d.get("generation", 0)

    # -- rollout: routes to a candidate kept loaded beside the newest (rollout.py) ------------------------------

    def record_route(self, name: str, kind: str, version: str, value: float) -> tuple[int, dict]:
        """Into the desired set: ``kind`` (``canary``: ``percent``; ``shadow``: ``rate``) of ``name`` to
        ``version``, loaded beside the newest (reachable by version only); a value of 0 ends it, and the
        candidate goes once nothing routes to it. ``LoadFailed`` 409 for the served version itself or a model the
        set does not name. Returns the generation written and the set before it (for ``roll_back``)."""
        with self.state.editing() as d:
            before = json.loads(json.dumps(d))
            models = d.setdefault("models", {})
            have = models.get(name)
            if not have:
                raise LoadFailed(f"{name} is not served: load it first", 404)
            if value and version == have[-1]:
                raise LoadFailed(f"{name}:{version} is the version served: a {kind} needs another one", 409)
            route = d.setdefault("routes", {}).setdefault(name, {})
            if value:
                route[kind] = {"version": version, ("percent" if kind == "canary" else "rate"): value}
            else:
                route.pop(kind, None)
            models[name] = _kept(route, have[-1])
            _unroute(d, name, models[name])
        return d.get("generation", 0), before

    def record_promote(self, name: str, version: str) -> tuple[int, dict]:
        """``version`` (a candidate loaded beside the newest) becomes the newest; the one it replaces stays loaded
        as ``previous`` for a rollback; the canary and shadow end."""
        with self.state.editing() as d:
            before = json.loads(json.dumps(d))
            have = d.setdefault("models", {}).get(name)
            if not have or version not in have:
                raise LoadFailed(f"{name}:{version} is not loaded beside {name}: run a canary or shadow of it first",
                                 409)
            if version == have[-1]:
                raise LoadFailed(f"{name}:{version} is already the version served", 409)
            d.setdefault("routes", {})[name] = {"previous": have[-1]}
            d["models"][name] = [have[-1], version]
        return d.get("generation", 0), before

    def record_rollback(self, name: str) -> tuple[int, dict, str]:
        """Back to the version before the last promote (kept loaded), or, during a canary or shadow, end them and
        let their candidate go. Returns the generation, the set before, and the version served now."""
        with self.state.editing() as d:
            before = json.loads(json.dumps(d))
            have = d.setdefault("models", {}).get(name)
            route = d.setdefault("routes", {}).get(name) or {}
            if not have or not route:
                raise LoadFailed(f"{name} has no promote, canary or shadow to roll back", 409)
            served = route.get("previous") or have[-1]
            d["models"][name] = [served]
            d["routes"].pop(name, None)
        return d.get("generation", 0), before, served

    async def wait_for(self, generation: int, workers: int, timeout_s: float,
                       key: str | None = None) -> tuple[bool, tuple[int, str] | None]:
        """``(True, None)`` once ``workers`` live workers have applied ``generation``; ``(False, (status,
        reason))`` as soon as one of them refused ``key`` (``name:version``) at it or later; ``(False, None)`` at
        ``timeout_s``."""
        self.wake()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [r for r in self.state.reports() if r.get("generation", 0) >= generation]
            for r in done:
                if key and key in r.get("refused", {}):
                    return False, (int(r["refused"][key]), f"worker {r.get('pid')}: {r['failed'].get(key, '')}")
            if len(done) >= workers:
                return True, None
            await asyncio.sleep(0.1)
        return False, None


def converge(registry, desired: dict, locate, since: float | None = None) -> dict[str, tuple[int, str]]:
    """Make this worker's ``registry`` serve ``desired`` (``modelstate``): load what it lacks
    (``locate(name, version)`` gives the stored file), then release what it does not name. Returns the failures
    by name:version, each as its HTTP status and reason."""
    failures, since = {}, time.monotonic() if since is None else since
    wanted = desired.get("models", {})
    for name, versions in wanted.items():
        for version in versions:
            have = any(s.model.version == version for s in registry.served.get(name, ()))
            if have and (version != versions[-1] or registry.loaded()[name][-1] == version):
                continue
            try:
                registry.load(name, version, locate(name, version), newest=version == versions[-1])
            except LoadFailed as e:
                failures[f"{name}:{version}"] = (e.status, str(e))
    with registry.lock:
        for name in list(registry.served):
            keep = wanted.get(name, [])
            for s in list(registry.served[name]):
                # a version loaded after ``desired`` was read (by a control request) is not this set's to drop
                if (s.model.version not in keep and s.born < since
                        and (len(registry.served) > 1 or len(registry.served[name]) > 1)):
                    registry.retire(s, "unloads")
        if desired.get("default"):  # the operator's choice, served or not (``lookup`` says which)
            registry.default = desired["default"]
    return failures


def _kept(route: dict, newest: str) -> list[str]:
    """A routed model's versions, oldest to newest: its candidates and previous version, then the one served."""
    extra = [route["previous"]] if route.get("previous") else []
    extra += [r["version"] for r in (route.get("canary"), route.get("shadow")) if r and r["version"] not in extra]
    return [v for v in extra if v != newest] + [newest]


def _unroute(desired: dict, name: str, versions: list[str]) -> None:
    """Routes of ``name`` to versions no longer in ``versions`` go (an unload of a candidate ends its canary)."""
    routes = desired.get("routes", {})
    route = routes.get(name)
    if route is None:
        return
    for kind in ("canary", "shadow"):
        if route.get(kind) and route[kind]["version"] not in versions:
            route.pop(kind)
    if route.get("previous") not in (None, *versions):
        route.pop("previous")
    if not route:
        routes.pop(name)
