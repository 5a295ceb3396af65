"""How ``cnnserve tune`` measures one setting: the real service started with it (``tests/support/server.py``), ``wrk``
POSTing the model's own images round-robin (req/s, p50/p95/p99, 503s and other failures, counted in wrk's
Lua), the server's whole process tree's CPU time (psutil) and the batches it formed (its ``/metrics``)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from cnnserve.core.config import cores

PINNED = ("--arg", "drain_s=0", "--arg", "grace_s=5")  # trial servers stop at once (not a serving setting)

# How wrk sends the images and counts the answers (one Lua state per wrk thread; done() runs in the main one).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  n503, nother, i, reqs = 0, 0, 0, {}
  for line in io.lines(os.getenv("TUNE_BODIES")) do
    local ctype, path = line:match("^(%S+) (.+)$")
    local f = assert(io.open(path, "rb"))
    reqs[#reqs + 1] = wrk.format("POST", nil, {["Content-Type"] = ctype}, f:read("*a"))
    f:close()
  end
end
function request() i = i % #reqs + 1; return reqs[i] end
function response(status, headers, body)
  if status == 503 then n503 = n503 + 1 elseif status ~= 200 then nother = nother + 1 end
end
function done(summary, latency, requests)
  local a, b = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("n503"); b = b + t:get("nother") end
  local e = summary.errors
  io.write(string.format("TUNE %d %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), a, b,
    e.connect + e.read + e.write + e.timeout))
end
"""


def start(tag: str, settings: dict):
    """The service serving ``tag`` with these arguments, ready."""
    from tests.support.server import Server

    args = [a for k, v in settings.items() for a in ("--arg", f"{k}={v}")]
    return Server("--arg", f"models={tag}", *args, *PINNED, ready_timeout=180)


def tree_cpu(pid: int) -> dict[int, float]:
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def settle(pid: int, idle_cores: float = 0.1, limit: float = 60.0) -> float:
    """Until the process tree of ``pid`` has worked off what the last run left in flight, which would take the cores
    from whatever is measured next (wrk stops with ``concurrency`` requests outstanding, which a server still runs:
    ResNet-18 at 256 connections leaves seconds of work; a traced server still exports its spans, and the harness's
    receiver parses them): its CPU under ``idle_cores`` + 0.1 of a core over 0.3 s, at most ``limit`` seconds.
    Returns the seconds waited."""
    import time

    t0 = time.time()
    while time.time() - t0 < limit:
        a = sum(tree_cpu(pid).values())
        time.sleep(0.3)
        if (sum(tree_cpu(pid).values()) - a) / 0.3 < idle_cores + 0.1:
            break
    return time.time() - t0


def wrk(url: str, bodies: Path, concurrency: int, duration: float) -> dict:
    import shutil

    exe = shutil.which("wrk")
    if not exe:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        threads = max(1, min(cores(), concurrency))
        proc = subprocess.run([exe, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                               "--timeout", "10s", "-s", f.name, url], capture_output=True, text=True,
                              timeout=duration + 60, env={**os.environ, "TUNE_BODIES": str(bodies)})
    finally:
        os.unlink(f.name)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TUNE ")), None)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"wrk failed: {proc.stderr[-500:]} {proc.stdout[-500:]}")
    n, us, p50, p95, p99, n503, other, sock = map(int, line.split()[1:])
    return {"concurrency": concurrency, "requests": n, "throughput_rps": n / (us / 1e6) if us else 0.0,
            "p50_ms": p50 / 1000, "p95_ms": p95 / 1000, "p99_ms": p99 / 1000, "n_503": n503,
            "failures": n503 + other + sock}


def batch_metrics(url: str, model: str) -> tuple[float, float]:
    """The sum and count of the service's ``cnnserve_batch_size`` histogram for ``model`` (its /metrics)."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("cnnserve_batch_size_sum") and f'model="{model}"' in line:
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("cnnserve_batch_size_count") and f'model="{model}"' in line:
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def measure(srv, name: str, bodies: Path, concurrency: int, duration: float, warmup: float) -> dict:
    """One wrk run against a started server, with its CPU time and the batches it formed."""
    if warmup:
        wrk(srv.url + "/classify", bodies, concurrency, warmup)
    cpu0, batches0 = tree_cpu(srv.proc.pid), batch_metrics(srv.url, name)
    r = wrk(srv.url + "/classify", bodies, concurrency, duration)
    cpu1, batches1 = tree_cpu(srv.proc.pid), batch_metrics(srv.url, name)
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
    runs = batches1[1] - batches0[1]
    r["cpu_ms"] = 1000 * cpu / r["requests"] if r["requests"] else float("nan")
    r["mean_batch"] = (batches1[0] - batches0[0]) / runs if runs else 0.0
    return r
