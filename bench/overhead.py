"""The harness's ``drift`` section: what the drift monitor costs the service (it runs off the request
path, so it should cost nothing measurable at 64 clients). The service with the workload's settings, once as
it ships and once with ``drift_monitor=false``, both serving side by side; ``wrk`` (the C load generator) POSTs the workload's
images to each in turn, ``repeats`` runs each, interleaved, so that the machine's drift over the run
falls on both alike. Reported: each side's median req/s and p99, their spreads, and the ratio."""

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


def section(w: dict, concurrency: int, duration: float, warmup: float, repeats: int, log=print) -> dict:
    import shutil

    from .tune_measure import measure, start

    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    name = w["tag"].split(":")[0]
    bodies = bodies_file(w, Path(w["work"]) / "drift")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    servers = {}
    try:
        for side, extra in SIDES.items():
            servers[side] = start(w["tag"], {**w["serve"], **extra})
        for i in range(repeats):
            for side, srv in servers.items():
                r = measure(srv, name, bodies, concurrency, duration, warmup if i == 0 else 0)
                runs[side].append(r)
                log(f"{w['name']}: drift {side} x{concurrency}, run {i + 1}: {r['throughput_rps']:.0f} req/s, "
                    f"p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.3f} CPU-ms/request, failures {r['failures']}")
    finally:
        for srv in servers.values():
            srv.stop()
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
