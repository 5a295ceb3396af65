"""Fault trials against a real `bentoml serve` on loopback: drain on SIGTERM, a worker killed,
a soak with hostile images mixed in, a flood beside one interactive client; and the server's process
tree (its workers, its memory). Each trial returns counts and times; the tests assert on the counts,
the benchmark harness (bench/faults.py) runs them on fresh servers and writes the times into its report.

Clients are threads with ``http.client`` (kept-alive connections, or a new one per request),
loopback only, bounded in time. A client reconnects when an answer says ``Connection:
close`` as any HTTP client does; a "load balancer" thread polls ``/readyz`` and, once it
answers anything but 200, stops clients from sending new requests, as a balancer stops
routing to a replica that is not ready.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

from .server import Server


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def worker_pids(server: Server) -> list[int]:
    """The server's HTTP worker processes (BentoML starts them under its arbiter)."""
    out = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if any("worker" in part for part in p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def ready(port: int, timeout: float = 2.0) -> int | str:
    """``/readyz``'s status, or the connection error's name."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", "/readyz")
        status = c.getresponse().status
        c.close()
        return status
    except OSError as e:
        return type(e).__name__


@dataclass
class Load:
    """Closed-loop clients posting ``bodies`` (round robin; each a (bytes, content type)) to ``path``."""

    port: int
    bodies: list[tuple[bytes, str]]
    clients: int = 16
    keep_alive: bool = True
    path: str = "/classify"
    stop: threading.Event = field(default_factory=threading.Event)
    routing: threading.Event = field(default_factory=threading.Event)  # cleared: send nothing new
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    latencies: list[float] = field(default_factory=list)  # seconds of each answered request
    timings: list[str] = field(default_factory=list)  # each answer's Server-Timing header, where it has one
    backoff: bool = False  # after a 503, wait its Retry-After (at most 1 s) as a well-behaved client does
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time, error): sent, no answer
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Load":
        self.routing.set()
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def _client(self, i: int) -> None:
        conn, n = self._connect(), i
        while not self.stop.is_set():
            if not self.routing.is_set():
                time.sleep(0.01)
                continue
            body, ctype = self.bodies[n % len(self.bodies)]
            n += 1
            try:
                sent = time.monotonic()
                conn.request("POST", self.path, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                self.answers.append((time.monotonic(), r.status))
                self.latencies.append(time.monotonic() - sent)
                if r.getheader("server-timing"):
                    self.timings.append(r.getheader("server-timing"))
                if self.backoff and r.status == 503:
                    time.sleep(min(1.0, float(r.getheader("retry-after") or 1)))
                close = r.getheader("connection", "").lower() == "close" or not self.keep_alive
            except (OSError, http.client.HTTPException) as e:
                self.failures.append((time.monotonic(), type(e).__name__))
                close = True
                time.sleep(0.02)
            if close:
                conn.close()
                conn = self._connect()
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(35)

    def count(self, since: float = 0.0, until: float = float("inf")) -> dict:
        statuses: dict[int, int] = {}
        for t, s in self.answers:
            if since <= t < until:
                statuses[s] = statuses.get(s, 0) + 1
        return {"answered": sum(statuses.values()), "statuses": statuses,
                "5xx": sum(n for s, n in statuses.items() if s >= 500),
                "failed": sum(1 for t, _ in self.failures if since <= t < until),
                "failure_kinds": dict(Counter(e for t, e in self.failures if since <= t < until))}


def balancer(port: int, load: Load, stop: threading.Event, period: float = 0.1) -> threading.Thread:
    """Polls /readyz; the first answer that is not 200 stops new requests (routing cleared)."""
    seen: dict = {}

    def run() -> None:
        while not stop.is_set():
            status = ready(port)
            if status != 200:
                seen.setdefault("not_ready_at", time.monotonic())
                load.routing.clear()
                return
            time.sleep(period)

    t = threading.Thread(target=run, daemon=True)
    t.seen = seen
    t.start()
    return t


def drain_trial(server: Server, bodies, clients: int = 16, warm_s: float = 2.0) -> dict:
    """SIGTERM to `bentoml serve` under load from kept-alive and new-connection clients."""
    loads = [Load(server.port, bodies, clients // 2, keep_alive=True).start(),
             Load(server.port, bodies, clients - clients // 2, keep_alive=False).start()]
    stop = threading.Event()
    time.sleep(warm_s)
    lbs = [balancer(server.port, load, stop, 0.05) for load in loads]
    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    try:
        code = server.proc.wait(120)
    except Exception:
        code = None
    exit_s = time.monotonic() - t0
    stop.set()
    for load in loads:
        load.finish()
    after = [load.count(since=t0) for load in loads]
    not_ready = [lb.seen.get("not_ready_at") for lb in lbs]
    return {"exit_code": code, "exit_s": round(exit_s, 2),
            "readyz_503_after_s": round(min(t for t in not_ready if t) - t0, 3) if any(not_ready) else None,
            "answered_after_sigterm": sum(a["answered"] for a in after),
            "5xx_after_sigterm": sum(a["5xx"] for a in after),
            "dropped_after_sigterm": sum(a["failed"] for a in after),
            "answered_total": sum(load.count()["answered"] for load in loads)}


def kill_worker_trial(server: Server, bodies, clients: int = 16, warm_s: float = 2.0,
                      watch_s: float = 60.0) -> dict:
    """kill -9 of one worker under load: what failed, how long answers stopped, when it came back."""
    workers = worker_pids(server)
    load = Load(server.port, bodies, clients, keep_alive=True).start()
    time.sleep(warm_s)
    t0 = time.monotonic()
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    respawned = None
    while time.monotonic() - t0 < watch_s:
        now = [p for p in worker_pids(server) if p != victim]
        if len(now) >= len(workers) and ready(server.port) == 200:
            respawned = time.monotonic() - t0
            break
        time.sleep(0.1)
    time.sleep(1.0)
    load.finish()
    times = sorted(t for t, s in load.answers if s == 200 and t >= t0 - 0.5)
    gaps = [b - a for a, b in zip(times, times[1:])]
    first_after = next((t - t0 for t in times if t >= t0), None)
    after = load.count(since=t0)
    return {"workers": len(workers), "failed": after["failed"], "5xx": after["5xx"],
            "answered_after_kill": after["answered"],
            "longest_gap_s": round(max(gaps), 3) if gaps else None,
            "first_answer_after_s": round(first_after, 3) if first_after is not None else None,
            "worker_back_after_s": round(respawned, 2) if respawned is not None else None,
            "clients": clients}


def soak_trial(server: Server, good, hostile, seconds: float = 10.0, clients: int = 8) -> dict:
    """Good and hostile images mixed (one hostile in ``len(good)+len(hostile)``) for ``seconds``:
    statuses and the server's memory before, at the peak and after."""
    before = tree_rss_mb(server.proc.pid)
    load = Load(server.port, [*good, *hostile], clients, keep_alive=True).start()
    peak, t0 = before, time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(0.25)
        peak = max(peak, tree_rss_mb(server.proc.pid))
    load.finish()
    time.sleep(1.0)
    counts = load.count()
    return {"seconds": seconds, **counts, "rss_before_mb": round(before), "rss_peak_mb": round(peak),
            "rss_after_mb": round(tree_rss_mb(server.proc.pid)), "ready_after": ready(server.port) == 200}


def flood_trial(server: Server, victim, flood, flood_path: str, clients: int = 4, seconds: float = 10.0,
                victim_path: str = "/classify") -> dict:
    """One interactive client sending ``victim`` bodies one after another while ``clients`` clients flood
    ``flood_path`` with ``flood`` bodies (explanations, large batches): what each got, and the victim's
    latency percentiles: interactive requests must keep being answered beside bulk work run a slice at a
    time (docs/reliability.md; before the slices, under 4 clients looping occlusion maps, a victim's p50
    went from 14 ms to 2.9 s, 5 answers in 15 s)."""
    flooding = Load(server.port, flood, clients, path=flood_path, backoff=True).start()
    time.sleep(0.5)  # the flood is under way
    victim_load = Load(server.port, victim, 1, path=victim_path).start()
    time.sleep(seconds)
    victim_load.finish()
    flooding.finish()
    lat = sorted(victim_load.latencies)

    def q(p: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    stages: dict = {}
    for header in victim_load.timings:
        for part in header.split(","):
            name, _, ms = part.strip().partition(";dur=")
            stages.setdefault(name, []).append(float(ms))
    return {"seconds": seconds, "clients": clients, "victim": victim_load.count(), "flood": flooding.count(),
            "victim_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)},
            "victim_stages_ms_p50": {k: round(sorted(v)[len(v) // 2], 2) for k, v in stages.items()}}

