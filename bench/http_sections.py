"""The harness's HTTP sections (``service``, ``naive``, ``torchserve``): each server started on the
workload's model and driven by the load generator of ``bench/load.py`` from a process of its own, one-image
multipart uploads, repeated runs at each concurrency summarised by their median and spread."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from cnnserve.core.config import DEFAULTS

from .tune_measure import batch_metrics
from .workloads import ROOT, log


def load(url: str, files: str, concurrency: int, duration: float, warmup: float, field: str) -> dict:
    out = subprocess.run([sys.executable, "-m", f"{__package__}.load", url, "--files", files, "--concurrency",
                          str(concurrency), "--duration", str(duration), "--warmup", str(warmup), "--field", field],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=duration + warmup + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Repeated runs at one concurrency: the median run's figures, the spread, and the sums of failures."""
    rates = [r["throughput_rps"] for r in runs]
    out = {"concurrency": runs[0]["concurrency"], "repeats": len(runs), "duration_s": runs[0]["duration_s"],
           "throughput_rps": statistics.median(rates), "spread": [min(rates), max(rates)],
           "requests": sum(r["requests"] for r in runs), "n_503": sum(r["n_503"] for r in runs),
           "n_non_200": sum(r["n_non_200"] for r in runs),
           "connections_opened": sum(r.get("connections_opened", 0) for r in runs),
           "latency_ms": {q: statistics.median(r["latency_ms"].get(q, 0) for r in runs)
                          for q in ("p50", "p95", "p99", "mean", "max")}, "runs": runs}
    timed = [r["server_timing_ms"] for r in runs if r.get("server_timing_ms")]
    if timed:
        out["server_timing_ms"] = {k: statistics.mean(t[k] for t in timed) for k in timed[0]}
    return out


def start(w: dict, service: str):
    """The server under test, and the URL and multipart field its clients use."""
    from tests.support.server import Server

    if service == "naive":
        srv = Server("--arg", f"model={w['tag']}", service=f"{__package__}.naive_service:NaiveOnnx")
        return srv, srv.url + "/classify", "images"
    if service == "torchserve":
        from .torchserve.peer import TorchServe, archive, install

        install()
        srv = TorchServe(archive(Path(w["run"]), w["tag"].split(":")[0]),
                         workers=w["serve"].get("workers", DEFAULTS.workers),
                         batch_size=w["serve"].get("max_batch_size", DEFAULTS.max_batch_size), max_batch_delay_ms=5)
        return srv, f"{srv.url}/predictions/{srv.name}", "data"
    settings = [a for k, v in w["serve"].items() for a in ("--arg", f"{k}={v}")]
    srv = Server("--arg", f"models={w['tag']}", *settings)
    return srv, srv.url + "/classify", "image"


def bench_http(w: dict, service: str, concurrencies, duration: float, short: float, warmup: float,
               repeats: int) -> list[dict]:
    """One server (cnnserve with the workload's settings, the naive baseline, or TorchServe) under the
    load generator, ``repeats`` runs at each concurrency. Every request is a one-image multipart upload
    (what ``curl -F`` sends)."""
    ours = service == "service"
    srv, url, field = start(w, service)
    rows = []
    try:
        ext = "png" if w["format"] == "PNG" else "jpg"
        files = f"{w['images']}/*.{ext}"
        name = w["tag"].split(":")[0]
        for c in concurrencies:
            secs = duration if c == max(concurrencies) else short
            runs = []
            for _ in range(repeats):
                before = batch_metrics(srv.url, name) if ours else None
                r = load(url, files, c, secs, warmup, field)
                if before:
                    after = batch_metrics(srv.url, name)
                    n = after[1] - before[1]
                    r["mean_batch_size"] = (after[0] - before[0]) / n if n else 0.0
                runs.append(r)
            row = summarise(runs)
            if ours:
                row["mean_batch_size"] = statistics.mean(r["mean_batch_size"] for r in runs)
            rows.append(row)
            lat = row["latency_ms"]
            log(f"{w['name']}: {service} HTTP x{c}: {row['throughput_rps']:.0f} req/s (median of {repeats}, "
                f"{row['spread'][0]:.0f}-{row['spread'][1]:.0f}), p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                f"503s {row['n_503']}, other failures {row['n_non_200'] - row['n_503']}"
                + (f", mean batch {row['mean_batch_size']:.1f}" if ours else ""))
    finally:
        srv.stop()
    return rows
