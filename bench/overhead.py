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
    """Every side's server started, then ``repeats`` rounds of one wrk run each: each side's runs."""
    import shutil

    from .tune_measure import measure, start

    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    name = w["tag"].split(":")[0]
    bodies = bodies_file(w, Path(w["work"]) / what)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    servers = {}
    try:
        for side, extra in sides.items():
            servers[side] = start(w["tag"], {**w["serve"], **extra})
        for i in range(repeats):
            for side, srv in servers.items():
                r = measure(srv, name, bodies, concurrency, duration, warmup if i == 0 else 0)
                runs[side].append(r)
                log(f"{w['name']}: {what} {side} x{concurrency}, run {i + 1}: {r['throughput_rps']:.0f} req/s, "
                    f"p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.3f} CPU-ms/request, failures {r['failures']}")
    finally:
        for srv in servers.values():
            srv.stop()
    return runs


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


def telemetry_section(w: dict, concurrency: int, duration: float, warmup: float, repeats: int, log=print) -> dict:
    from tests.support.otlp import Receiver

    receiver = Receiver(keep=False)  # counts the spans: a collector that answers at once
    try:
        sides = {side: {k: v.replace("{endpoint}", receiver.endpoint) for k, v in extra.items()}
                 for side, extra in TELEMETRY_SIDES.items()}
        runs = interleaved(w, sides, "telemetry", concurrency, duration, warmup, repeats, log)
    finally:
        receiver.close()
    base = [r["throughput_rps"] for r in runs["as shipped"]]
    out = {"concurrency": concurrency, "duration_s": duration, "repeats": repeats, "spans_received": receiver.count,
           "sides": {}}
    for side, rs in runs.items():
        rates = [r["throughput_rps"] for r in rs]
        ratios = [a / b for a, b in zip(rates, base) if b]
        out["sides"][side] = {"settings": TELEMETRY_SIDES[side], "throughput_rps": statistics.median(rates),
                              "spread": [min(rates), max(rates)],
                              "ratio": statistics.median(ratios) if ratios else None,
                              "ratio_spread": [min(ratios), max(ratios)] if ratios else None,
                              "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                              "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
                              "failures": sum(r["failures"] for r in rs), "runs": rs}
    out["targets"] = {side: {"floor": floor, "ratio": out["sides"][side]["ratio"],
                             "met": (out["sides"][side]["ratio"] or 0) >= floor}
                      for side, floor in TELEMETRY_TARGETS.items()}
    return out


def telemetry_lines(name: str, d: dict) -> list[str]:
    lines = [f"{name}, {d['concurrency']} connections, {d['repeats']} interleaved rounds x {d['duration_s']:.0f} s "
             f"each ({d['spans_received']:,} spans received by the local OTLP receiver):", "",
             "| side | arguments | req/s (median) | spread | / as shipped (median of rounds) | rounds' spread | "
             "p99 ms | CPU-ms per request | failures |", "|---|---|---|---|---|---|---|---|---|"]
    for side, x in d["sides"].items():
        args = " ".join(f"`{k}={'URL' if k == 'tracing_endpoint' else v}`" for k, v in x["settings"].items()) or "-"
        ratio = f"{x['ratio']:.3f}" if x["ratio"] else "-"
        spread = f"{x['ratio_spread'][0]:.3f}-{x['ratio_spread'][1]:.3f}" if x["ratio_spread"] else "-"
        lines.append(f"| {side} | {args} | {x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                     f"{ratio} | {spread} | {x['p99_ms']:.1f} | {x['cpu_ms']:.3f} | {x['failures']} |")
    lines.append("")
    for side, t in d["targets"].items():
        lines.append(f"- {side}: {t['ratio']:.3f} of the baseline's throughput, target at least {t['floor']:.2f}: "
                     f"**{'MET' if t['met'] else 'MISSED'}**")
    return lines + [""]
