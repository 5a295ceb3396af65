"""A load generator: closed-loop HTTP clients against a cnnserve endpoint, bounded in time.

Run as its own process (so its CPU use is not the server's), loopback only::

    python -m bench.load http://127.0.0.1:3000/classify --files imgs/*.png --concurrency 64 --duration 60

Each of ``concurrency`` clients sends one image (cycling through ``--files``), waits for
the answer, and sends the next, for ``--warmup`` seconds unrecorded and ``--duration``
recorded. With ``--field NAME`` each image goes as multipart form data in that field
(what ``curl -F`` sends), otherwise as the raw body. Prints one JSON object: requests,
throughput, latency percentiles, status counts, errors (connection failures, time-outs),
connections opened, and the mean of each stage the server reports in a Server-Timing
header. It stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    a = np.asarray(latencies) * 1000
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)} | {"mean": float(a.mean()),
                                                                             "max": float(a.max())}


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A one-file multipart/form-data body, built once so that the client's cost per request is small."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def parse_server_timing(value: str) -> dict[str, float]:
    """``decode;dur=0.4, total;dur=2.1`` to {stage: milliseconds}."""
    out = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for p in params.split(";"):
            key, _, dur = p.strip().partition("=")
            if key == "dur":
                try:
                    out[name] = float(dur)
                except ValueError:
                    pass
    return out


async def run(url: str, payloads: list[tuple[bytes, str]], concurrency: int, duration: float,
              warmup: float, timeout: float) -> dict:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load {host}: this generator targets loopback only")
    statuses, errors, latencies = Counter(), Counter(), []
    stage_ms, timed_client_ms, timed = Counter(), 0.0, 0  # Server-Timing sums over recorded 200s
    server_totals = []  # seconds in the handler, per request: is a slow answer slow inside the server?
    connections = Counter()

    async def opened(*_):
        connections["opened"] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(opened)
    start = time.perf_counter()
    record_from, stop_at = start + warmup, start + warmup + duration
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout),
                                     trace_configs=[trace]) as session:
        async def client(i: int) -> None:
            nonlocal timed_client_ms, timed
            n = i
            while True:
                t = time.perf_counter()
                if t >= stop_at:
                    return
                body, content_type = payloads[n % len(payloads)]
                n += concurrency
                server_timing = None
                try:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
                        await r.read()
                        status = r.status
                        server_timing = r.headers.get("Server-Timing")
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status = None
                    if t >= record_from:
                        errors[type(e).__name__] += 1
                done = time.perf_counter()
                if t >= record_from and done <= stop_at + timeout:
                    if status is not None:
                        statuses[status] += 1
                        if status == 200:
                            latencies.append(done - t)
                            if server_timing:
                                stages = parse_server_timing(server_timing)
                                stage_ms.update(stages)
                                server_totals.append(stages.get("total", 0.0) / 1000)
                                timed_client_ms += (done - t) * 1000
                                timed += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    measured = time.perf_counter() - record_from
    ok = statuses.get(200, 0)
    return {"url": url, "concurrency": concurrency, "duration_s": round(measured, 2), "warmup_s": warmup,
            "requests": sum(statuses.values()) + sum(errors.values()), "ok": ok,
            "throughput_rps": ok / measured if measured > 0 else 0.0,
            "status": {str(k): v for k, v in sorted(statuses.items())}, "errors": dict(errors),
            "n_503": statuses.get(503, 0), "n_non_200": sum(v for k, v in statuses.items() if k != 200)
            + sum(errors.values()), "latency_ms": percentiles(latencies),
            "connections_opened": connections["opened"], "server_total_ms": percentiles(server_totals),
            "server_timing_ms": {k: v / timed for k, v in stage_ms.items()} | {"client": timed_client_ms / timed}
            if timed else {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--files", nargs="+", required=True, help="image files to send (globs allowed)")
    ap.add_argument("--content-type", default=None, help="default: from the first file's extension")
    ap.add_argument("--field", default=None, help="send multipart/form-data with the image in this field")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    paths = sorted({p for pattern in args.files for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit(f"no files match {args.files}")
    ctype = args.content_type or ("image/jpeg" if paths[0].lower().endswith((".jpg", ".jpeg")) else "image/png")
    payloads = [(Path(p).read_bytes(), ctype) for p in paths]
    if args.field:
        payloads = [multipart(args.field, Path(p).name, data, ctype) for p, (data, _) in zip(paths, payloads)]
    result = asyncio.run(run(args.url, payloads, args.concurrency, args.duration, args.warmup, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
