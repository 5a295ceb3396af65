"""One worker's part in the served set its server shares (``modelstate.py``): a thread that polls the
desired set every ``model_sync_s`` seconds, converges on it through the manager (loads run in this
thread, so the event loop keeps serving), and reports what it serves; and the wait of a control request
for every worker's report.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from .manager import ModelManager
from .modelstate import ServedState, stored_file

log = logging.getLogger("cnnserve.workers")


class WorkerSync:
    def __init__(self, manager: ModelManager, state: ServedState, interval_s: float = 0.5) -> None:
        self.manager, self.state, self.interval = manager, state, interval_s
        self.pid = os.getpid()
        self.generation = -1
        self.failures: dict[str, str] = {}
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
        if stamp != self._stamp:
            self._stamp = stamp
            desired = self.state.read()
            if desired is not None and desired.get("generation", 0) != self.generation:
                self.failures = self.manager.converge(desired, lambda n, v: stored_file(n, v)[1])
                self.generation = desired.get("generation", 0)
                self.report()
        self.manager.sweep()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the thread must live on; the next change is tried again
                log.exception("converging on the served set failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def report(self) -> None:
        m = self.manager
        with m.lock:
            report = {"generation": self.generation, "models": m.loaded(), "loading": sorted(m.loading),
                      "unloading": sorted(s.key for s in m.retiring), "failed": {**m.failed, **self.failures}}
        self.state.report(self.pid, report)

    async def wait_for(self, generation: int, workers: int, timeout_s: float) -> bool:
        """True once ``workers`` live workers have applied ``generation`` (False at ``timeout_s``)."""
        self.wake()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [r for r in self.state.reports() if r.get("generation", 0) >= generation]
            if len(done) >= workers:
                return True
            await asyncio.sleep(0.1)
        return False
