"""The harness's cost sections: what a feature costs the service's throughput, the service with the workload's
settings serving once per side, all side by side; ``wrk`` (the C load generator) POSTs the workload's images to
each in turn, ``repeats`` rounds, interleaved, so that the machine's drift over the run falls on every side alike.

- ``drift``: the drift monitor (it runs off the request path, so it should cost nothing measurable at 64
  clients): as it ships, and with ``drift_monitor=false``. Reported: each side's median req/s and p99, their
  spreads, and the ratio.
- ``telemetry`` (``telemetry_section``): request lines and traces (service/telemetry.py) against the service as it
  ships (text logs, no line per request, no tracer): text access lines, JSON logs (a JSON line per request),
  and tracing at ``tracing_sample`` 0, 0.01 and 1 sending to a local OTLP receiver (tests/support/otlp.py).
  Reported: each side's median req/s, and its ratio to the baseline with the spread of the rounds' ratios (each
  round's side over the same round's baseline); the targets (JSON logs and 1% tracing within 3%) met or missed.
"""

from __future__ import annotations

import statistics
from pathlib import Path

SIDES = {"monitor on": {}, "monitor off": {"drift_monitor": "false"}}


def bodies_file(w: dict, folder: Path, limit: int = 64) -> Path:
    """wrk's request bodies (``tune_measure.WRK_SCRIPT``'s list: content type and path per line)."""
    ext, ctype = ("png", "image/png") if w["format"] == "PNG" else ("jpg", "image/jpeg")
    paths = sorted(Path(w["images"]).glob(f"*.{ext}"))[:limit]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{w['name']}-bodies.txt"
    out.write_text("".join(f"{ctype} {p}\n" for p in paths))
    return out


def interleaved(w: dict, sides: dict, what: str, concurrency: int, duration: float, warmup: float, repeats: int,
                log=print) -> dict[str, list[dict]]:
    """Every side's server started, then ``repeats`` rounds of one wrk run each, in the orders of a Williams
    square (``balanced_orders``: each side first in one round of every ``len(sides)``, and after each other side
    as often), each run once every server is idle again: each side's runs. In a plain rotation each side always
    followed the same one, so whatever one side leaves behind fell on one other side only."""
    import os
    import shutil

    from .tune_measure import measure, settle, start

    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    name = w["tag"].split(":")[0]
    bodies = bodies_file(w, Path(w["work"]) / what)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    servers = {}
    try:
        for side, extra in sides.items():
            servers[side] = start(w["tag"], {**w["serve"], **extra})
        order = list(servers.items())
        rounds = balanced_orders(len(order))
        for i in range(repeats):
            for side, srv in (order[k] for k in rounds[i % len(rounds)]):
                r = measure(srv, name, bodies, concurrency, duration, warmup if i == 0 else 0)
                # this process's tree: every server, and the receiver's thread here
                r["settle_s"] = round(settle(os.getpid(), 0.05 * len(servers), limit=30), 2)
                runs[side].append(r)
                log(f"{w['name']}: {what} {side} x{concurrency}, run {i + 1}: {r['throughput_rps']:.0f} req/s, "
                    f"p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.3f} CPU-ms/request, failures {r['failures']}")
    finally:
        for srv in servers.values():
            srv.stop()
    return runs


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams square of ``n`` sides: ``n`` orders (``2n`` for an odd ``n``) in which each side comes first
    equally often and directly after each other side equally often, so that what a run leaves behind (a
    server's late work, a warm cache) falls on every side alike."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def section(w: dict, concurrency: int, duration: float, warmup: float, repeats: int, log=print) -> dict:
    runs = interleaved(w, SIDES, "drift", concurrency, duration, warmup, repeats, log)
    out = {"concurrency": concurrency, "duration_s": duration, "repeats": repeats, "sides": {}}
    for side, rs in runs.items():
        rates = [r["throughput_rps"] for r in rs]
        out["sides"][side] = {"throughput_rps": statistics.median(rates), "spread": [min(rates), max(rates)],
                              "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                              "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                              "failures": sum(r["failures"] for r in rs), "runs": rs}
    on, off = out["sides"]["monitor on"], out["sides"]["monitor off"]
    out["ratio"] = on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else None
    # within the noise: one side's median inside the other's spread
    out["within_spread"] = (off["spread"][0] <= on["throughput_rps"] <= off["spread"][1]
                            or on["spread"][0] <= off["throughput_rps"] <= on["spread"][1])
    return out


def report_lines(name: str, d: dict) -> list[str]:
    lines = [f"{name}, {d['concurrency']} connections, {d['repeats']} interleaved runs x {d['duration_s']:.0f} s each:",
             "", "| drift monitor | req/s (median) | spread | p99 ms | CPU-ms per request | failures |",
             "|---|---|---|---|---|---|"]
    for side, x in d["sides"].items():
        lines.append(f"| {side} | {x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                     f"{x['p99_ms']:.1f} | {x['cpu_ms']:.3f} | {x['failures']} |")
    if d.get("ratio"):
        lines += ["", f"On / off: {d['ratio']:.3f} ("
                      + ("a median inside the other side's spread: no cost this run could tell from noise)"
                         if d["within_spread"] else "outside the spreads: a measurable difference)")]
    return lines + [""]


#: The telemetry section's sides: the baseline first (the service as it ships), then each feature alone.
#: ``{endpoint}``: the local OTLP receiver's traces URL.
TELEMETRY_SIDES = {
    "as shipped": {},
    "text access lines": {"access_log": "true"},
    "JSON logs": {"log_format": "json"},
    "tracing 0": {"tracing_sample": "0", "tracing_endpoint": "{endpoint}"},
    "tracing 0.01": {"tracing_sample": "0.01", "tracing_endpoint": "{endpoint}"},
    "tracing 1": {"tracing_sample": "1", "tracing_endpoint": "{endpoint}"},
}
#: The targets: each of these within 3% of the baseline's throughput.
TELEMETRY_TARGETS = {"JSON logs": 0.97, "tracing 0.01": 0.97}


def request_cpu(endpoint: str, n: int = 300, rounds: int = 5) -> dict[str, float]:
    """The CPU microseconds each telemetry path adds to one request, in this process (``time.process_time``,
    every thread counted: the span processor's and exporter's too): the record and its id alone, a text access
    line as a server writes it (BentoML's handler: its filter and format, a write and flush per line, here to
    ``os.devnull``), a JSON line as a server writes it (in batches of ``Lines.MAX_LINES``, as under load, to
    ``os.devnull``), and a traced request's five spans made, batched, encoded and sent to ``endpoint``. On a
    machine shared with other work these are steadier than req/s: the throughput cost of a path is about its
    figure over the service's CPU per request."""
    import asyncio
    import logging
    import os
    import time

    from bentoml._internal.log import SERVER_LOGGING_CONFIG, TraceRecordFilter

    from cnnserve.service.metrics import RouteLabels
    from cnnserve.service.telemetry import Telemetry

    def record(t: Telemetry):
        r = t.begin(None, None, "http", "POST", "/classify", "127.0.0.1", time.perf_counter())
        r.status = 200
        now = time.perf_counter()
        if r.marks is not None:
            r.marks.update(read=now, queued=now, started=now, run=now, ran=now, batch=8)
        return r

    devnull = open(os.devnull, "w")
    access = logging.getLogger("cnnserve.access")
    handler = logging.StreamHandler(devnull)  # what BentoML's server configuration gives the root logger
    traced = SERVER_LOGGING_CONFIG["formatters"]["traced"]
    handler.setFormatter(logging.Formatter(traced["format"], traced["datefmt"]))
    handler.addFilter(TraceRecordFilter())
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    paths = {"record and id": Telemetry(), "text line": Telemetry(access_log=True),
             "JSON line": Telemetry(access_log=True, log_format="json"),
             "traced request": Telemetry(sample=1.0, endpoint=endpoint)}
    out = {}

    async def measure() -> None:  # on an event loop: JSON lines are written in batches, as in a server
        for name, t in paths.items():
            t.lines.stream = devnull
            samples = []
            for _ in range(rounds):
                c = time.process_time()
                for _ in range(n):
                    t.end(record(t)) if (t.access_log or t.sample) else record(t)
                t.lines.flush()
                if t.sample:
                    t.tracer().provider.force_flush()
                samples.append((time.process_time() - c) / n * 1e6)
            out[name] = statistics.median(samples)
            t.shutdown()

    try:
        asyncio.run(measure())
    finally:
        access.removeHandler(handler)
        access.propagate = True
        devnull.close()
    return out


def telemetry_section(w: dict, concurrency: int, duration: float, warmup: float, repeats: int, log=print) -> dict:
    from tests.support.otlp import Receiver

    receiver = Receiver(keep=False)  # counts the spans: a collector that answers at once
    try:
        sides = {side: {k: v.replace("{endpoint}", receiver.endpoint) for k, v in extra.items()}
                 for side, extra in TELEMETRY_SIDES.items()}
        runs = interleaved(w, sides, "telemetry", concurrency, duration, warmup, repeats, log)
        cpu_us = request_cpu(receiver.endpoint)
        log(f"{w['name']}: telemetry CPU per request: " + ", ".join(f"{k} {v:.1f} us" for k, v in cpu_us.items()))
    finally:
        receiver.close()
    base = [r["throughput_rps"] for r in runs["as shipped"]]
    base_cpu = [r["cpu_ms"] for r in runs["as shipped"]]
    out = {"concurrency": concurrency, "duration_s": duration, "repeats": repeats, "spans_received": receiver.count,
           "request_cpu_us": cpu_us, "sides": {}}
    for side, rs in runs.items():
        rates = [r["throughput_rps"] for r in rs]
        ratios = [a / b for a, b in zip(rates, base) if b]
        cpu = [a / b for a, b in zip((r["cpu_ms"] for r in rs), base_cpu) if b]
        out["sides"][side] = {"settings": TELEMETRY_SIDES[side], "throughput_rps": statistics.median(rates),
                              "spread": [min(rates), max(rates)],
                              "ratio": statistics.median(ratios) if ratios else None,
                              "ratio_spread": [min(ratios), max(ratios)] if ratios else None,
                              "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                              "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                              "cpu_ratio": statistics.median(cpu) if cpu else None,
                              "failures": sum(r["failures"] for r in rs), "runs": rs}
    out["targets"] = telemetry_targets(runs)
    return out


def telemetry_targets(runs: dict[str, list[dict]]) -> dict:
    """Each target side's throughput against the plain servers' in the same round: the mean of ``as shipped`` and
    ``tracing 0``, the baseline's very code served twice. Against ``as shipped`` alone the verdict leaned on one
    server: in five runs of one day the second plain server read 0.999-1.047 of the first."""
    plain = [(a["throughput_rps"] + b["throughput_rps"]) / 2 for a, b in zip(runs["as shipped"], runs["tracing 0"])]
    out = {}
    for side, floor in TELEMETRY_TARGETS.items():
        ratios = [r["throughput_rps"] / p for r, p in zip(runs[side], plain) if p]
        ratio = statistics.median(ratios) if ratios else 0.0
        out[side] = {"floor": floor, "ratio": ratio, "against": "plain", "met": ratio >= floor}
    return out


def settled(d: dict) -> str:
    """How long the runs waited for every server to be idle again (``interleaved``), where recorded."""
    waits = [r["settle_s"] for x in d["sides"].values() for r in x["runs"] if "settle_s" in r]
    return (f"; each run began once every server was idle, after waiting a median {statistics.median(waits):.1f} s, "
            f"at most {max(waits):.1f} s" if waits else "")


def telemetry_lines(name: str, d: dict) -> list[str]:
    lines = [f"{name}, {d['concurrency']} connections, {d['repeats']} interleaved rounds x {d['duration_s']:.0f} s "
             f"each ({d['spans_received']:,} spans received by the local OTLP receiver{settled(d)}):", "",
             "| side | arguments | req/s (median) | spread | / as shipped (median of rounds) | rounds' spread | "
             "p99 ms | CPU-ms per request | its / as shipped | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    for side, x in d["sides"].items():
        args = " ".join(f"`{k}={'URL' if k == 'tracing_endpoint' else v}`" for k, v in x["settings"].items()) or "-"
        ratio = f"{x['ratio']:.3f}" if x["ratio"] else "-"
        spread = f"{x['ratio_spread'][0]:.3f}-{x['ratio_spread'][1]:.3f}" if x["ratio_spread"] else "-"
        lines.append(f"| {side} | {args} | {x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                     f"{ratio} | {spread} | {x['p99_ms']:.1f} | {x['cpu_ms']:.3f} | "
                     f"{x['cpu_ratio']:.3f} | {x['failures']} |" if x.get("cpu_ratio") else
                     f"{ratio} | {spread} | {x['p99_ms']:.1f} | {x['cpu_ms']:.3f} | - | {x['failures']} |")
    lines.append("")
    if d.get("request_cpu_us"):
        base = d["sides"]["as shipped"]["cpu_ms"] * 1000
        lines += ["CPU each path adds to a request, measured in one process (`request_cpu`), and as a share of the "
                  f"service's {base:.0f} us per request as shipped:", ""]
        lines += [f"- {k}: {v:.1f} us ({v / base:.1%})" for k, v in d["request_cpu_us"].items()]
        traced = d["request_cpu_us"].get("traced request")
        if traced:
            lines.append(f"- so tracing at 1%: {traced / 100:.1f} us a request on average ({traced / 100 / base:.2%})")
        lines.append("")
    same = d["sides"].get("tracing 0")
    if same and same["ratio_spread"]:  # no tracer is made at 0: the very code of the baseline, so its ratio is noise
        lines.append(f"- the noise: `tracing 0` runs the baseline's very code (no tracer at 0) and measured "
                     f"{same['ratio']:.3f} of it, rounds {same['ratio_spread'][0]:.3f}-{same['ratio_spread'][1]:.3f}")
    for side, t in d["targets"].items():
        against = ("the plain servers' throughput (the mean of as shipped and tracing 0 in each round)"
                   if t.get("against") == "plain" else "the baseline's throughput")
        lines.append(f"- {side}: {t['ratio']:.3f} of {against}, target at least {t['floor']:.2f}: "
                     f"**{'MET' if t['met'] else 'MISSED'}**")
    return lines + [""]
