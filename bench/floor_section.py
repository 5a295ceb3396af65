"""The harness's ``floor`` section: ``wrk`` (a C load generator, so the client costs the cores little) POSTing
one of the workload's images to cnnserve and to the bare-ASGI floor of ``bench/floor.py``, interleaved, with the
CPU time each request costs. ``wrk`` here is also what ``bench/lb.py`` drives its balancer with."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cnnserve.core.config import DEFAULTS

from .http_sections import start
from .workloads import ROOT, log

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_TYPE")
"""


def wrk(url: str, body: Path, content_type: str, concurrency: int, duration: float) -> dict:
    """``wrk`` (a C load generator: the client costs the cores little) POSTing ``body`` as a raw
    request body: req/s, latency percentiles and the count of non-2xx answers."""
    import re
    import shutil
    import tempfile

    exe = shutil.which("wrk")
    if not exe:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    threads = max(1, min(os.cpu_count() or 1, concurrency))
    proc = subprocess.run([exe, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
                           "-s", f.name, url], capture_output=True, text=True, timeout=duration + 60,
                          env={**os.environ, "WRK_BODY": str(body), "WRK_TYPE": content_type})
    os.unlink(f.name)
    out = proc.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or not rate:
        raise RuntimeError(f"wrk failed: {proc.stderr[-500:]} {out[-500:]}")
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    lat = {f"p{q}": float(v) * unit[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"concurrency": concurrency, "throughput_rps": float(rate.group(1)), "latency_ms": lat,
            "n_non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def floor_server(workers: int):
    """The bare ASGI app of ``bench/floor.py`` under uvicorn, as many workers as cnnserve has."""
    from tests.support.server import free_port, stop_group

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", f"{__package__}.floor:app", "--port", str(port),
                             "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                             "--no-access-log", "--log-level", "warning"], cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x"), timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    stop_group(proc, 10)
    raise RuntimeError("the floor server did not start")


def cpu_ms(rps: float) -> float:
    """CPU time a request costs when the server keeps every core busy: cores x 1000 / req/s."""
    return (os.cpu_count() or 1) * 1000 / rps if rps else float("nan")


def bench_floor(w: dict, concurrency: int, duration: float, repeats: int) -> dict:
    """The bare-ASGI floor and cnnserve under the same ``wrk`` load (one of the workload's images as a
    raw body), ``repeats`` runs each, interleaved so drift hits both alike."""
    from tests.support.server import stop_group

    body = sorted(Path(w["images"]).iterdir())[0]
    ctype = "image/png" if w["format"] == "PNG" else "image/jpeg"
    runs = {"floor": [], "cnnserve": []}
    floor, floor_url = floor_server(w["serve"].get("workers", DEFAULTS.workers))
    try:
        srv, url, _ = start(w, "service")
        try:
            wrk(url, body, ctype, concurrency, 2)  # warm both
            wrk(floor_url, body, ctype, concurrency, 2)
            for _ in range(repeats):
                runs["floor"].append(wrk(floor_url, body, ctype, concurrency, duration))
                runs["cnnserve"].append(wrk(url, body, ctype, concurrency, duration))
        finally:
            srv.stop()
    finally:
        stop_group(floor, 10)
    out = {"concurrency": concurrency, "body_bytes": body.stat().st_size, "tool": "wrk"}
    for k, rs in runs.items():
        rates = [r["throughput_rps"] for r in rs]
        med = statistics.median(rates)
        out[k] = {"throughput_rps": med, "spread": [min(rates), max(rates)], "cpu_ms": cpu_ms(med),
                  "failures": sum(r["n_non_2xx"] + r["socket_errors"] for r in rs), "runs": rs}
    out["ratio_to_floor"] = out["cnnserve"]["throughput_rps"] / out["floor"]["throughput_rps"]
    log(f"{w['name']}: wrk at {concurrency} connections: floor {out['floor']['throughput_rps']:.0f} req/s, "
        f"cnnserve {out['cnnserve']['throughput_rps']:.0f} req/s ({out['ratio_to_floor']:.3f} of the floor; "
        f"{out['cnnserve']['cpu_ms']:.2f} CPU-ms per request against {out['floor']['cpu_ms']:.3f})")
    return out
