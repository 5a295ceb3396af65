"""The harness's ``shadow`` section: what shadowing a candidate version on live traffic costs the primary
(docs/rollout.md). One server, with the workload's settings and the control routes on, serves the workload's model;
a copy of the same file is stored as a second version, the candidate. Two sides on that one server: "no shadow"
(rate 0) and "shadow 1.0" (every answered request run again on the candidate, at bulk priority, dropped first
under load), switched through the control route ``cnnserve shadow`` calls. ``wrk`` (the C load generator) POSTs the
workload's images, ``repeats`` rounds, each round starting one side further on (as ``overhead.interleaved``), so
that the machine's drift falls on both sides alike.

Reported: each side's median req/s, p50 and p99 with their spreads; the shadow side over the no-shadow side of the
same round, throughput and p99 (the medians of the rounds' ratios; targets: throughput at least 0.90, p99 at most
1.5 times); and the share of the shadowed requests the candidate actually ran, from the server's own figures
(the runs recorded in its rollout file, and ``/models/NAME/monitor``'s count of the ones it dropped).
"""

from __future__ import annotations

import json
import math
import secrets
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

#: side: the shadow's rate
SIDES = {"no shadow": 0.0, "shadow 1.0": 1.0}
#: the shadow side's throughput over the no-shadow side's, at least; its p99 over theirs, at most
TARGETS = {"throughput": 0.90, "p99": 1.5}


def store_candidate(w: dict) -> str:
    """The workload's model file stored again under its name: a second version, answering exactly as the served
    one (as tests/test_rollout.py's copies), so that the shadow's work is the primary's again."""
    from cnnserve.export.store import store_model

    return store_model(w["onnx"], name=w["tag"].split(":")[0]).tag.version


def set_rate(url: str, name: str, candidate: str, rate: float, token: str, wait: float = 120) -> None:
    """The shadow of ``name:candidate`` at ``rate`` (0 ends it) through the control route, once every worker
    applies it (a 202 says some do not yet: asked again until they do)."""
    from cnnserve.command.remote import call

    deadline = time.monotonic() + wait
    while True:
        status, _ = call(url, f"/v2/repository/models/{name}:{candidate}/shadow", {"parameters": {"rate": rate}},
                         token, timeout=wait)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the shadow at rate {rate:g} was not applied by every worker in {wait:.0f} s")
        time.sleep(0.5)


def shadow_runs(home: str) -> int:
    """The shadow runs the server has recorded so far: the newest row number of its rollout file's ``shadows``
    table (``$BENTOML_HOME/cnnserve-servers/PID/rollout.sqlite``, docs/rollout.md). The monitor's ``compared``
    counts only the newest ``feedback_ring`` runs, which 64 clients fill in seconds; the row numbers keep rising
    as the oldest rows are trimmed. One model and one candidate in this server: every row is theirs."""
    import sqlite3

    files = sorted(Path(home).glob("cnnserve-servers/*/rollout.sqlite"))
    if len(files) != 1:
        raise RuntimeError(f"expected one server's rollout file under its BENTOML_HOME, found {len(files)}")
    db = sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM shadows").fetchone()[0]
    finally:
        db.close()


def shadow_counts(srv, name: str, candidate: str) -> dict:
    """The server's shadow figures for ``candidate``: runs recorded (``shadow_runs``), dropped (a counter),
    agreement and the candidate's milliseconds (the monitor's rollout block)."""
    url = srv.url
    with urllib.request.urlopen(f"{url}/models/{name}/monitor", timeout=30) as r:
        rollout = json.loads(r.read()).get("rollout") or {}
    pair = next((s for s in rollout.get("shadow", []) if s["candidate"] == candidate), {})
    return {"runs": shadow_runs(srv.home), "compared": pair.get("compared", 0),
            "dropped": rollout.get("shadow_dropped", {}).get(candidate, 0), "agreement": pair.get("agreement"),
            "candidate_ms_p99": pair.get("candidate_ms_p99")}


def section(w: dict, concurrency: int, duration: float, warmup: float, repeats: int, log=print) -> dict:
    import shutil

    from .overhead import bodies_file
    from .tune_measure import measure, start, wrk

    if not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    name = w["tag"].split(":")[0]
    bodies = bodies_file(w, Path(w["work"]) / "shadow")
    candidate = store_candidate(w)
    token = secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="cnnserve-shadow-"))
    (folder / "token").write_text(token + "\n")
    (folder / "token").chmod(0o600)
    settings = {**w["serve"], "model_control": "true", "control_token_file": str(folder / "token"),
                "drift_monitor": "true"}  # the rollout figures are read from the monitor route
    sync_s = float(settings.get("model_sync_s", 0.5))
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    srv = start(w["tag"], settings)
    try:
        order = list(SIDES)
        for i in range(repeats):
            for side in order[i % len(order):] + order[:i % len(order)]:
                rate = SIDES[side]
                set_rate(srv.url, name, candidate, rate, token)
                before = shadow_counts(srv, name, candidate)
                warm = wrk(srv.url + "/classify", bodies, concurrency, warmup) if warmup and i == 0 else None
                r = measure(srv, name, bodies, concurrency, duration, 0)
                time.sleep(2 * sync_s + 1)  # the last shadow runs ended, and every worker's counts written
                after = shadow_counts(srv, name, candidate)
                if rate:
                    offered = r["requests"] + (warm["requests"] if warm else 0)
                    dropped = after["dropped"] - before["dropped"]
                    ran = after["runs"] - before["runs"]
                    r["shadow"] = {"offered": offered, "ran": ran, "dropped": dropped,
                                   "share_ran": ran / (ran + dropped) if ran + dropped else 0.0,
                                   "agreement": after["agreement"], "candidate_ms_p99": after["candidate_ms_p99"]}
                runs[side].append(r)
                log(f"{w['name']}: shadow section, {side} x{concurrency}, round {i + 1}: {r['throughput_rps']:.0f} "
                    f"req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, failures {r['failures']}"
                    + (f", shadow ran {r['shadow']['ran']}, dropped {r['shadow']['dropped']}" if rate else ""))
    finally:
        srv.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return summarise(runs, concurrency, duration, repeats, candidate)


def summarise(runs: dict[str, list[dict]], concurrency: int, duration: float, repeats: int, candidate: str) -> dict:
    out = {"concurrency": concurrency, "duration_s": duration, "repeats": repeats, "candidate": candidate,
           "sides": {}}
    for side, rs in runs.items():
        answered = [r for r in rs if r["requests"]] or [{"p50_ms": math.nan, "p99_ms": math.nan}]  # no latency
        rates, p99 = [r["throughput_rps"] for r in rs], [r["p99_ms"] for r in answered]
        out["sides"][side] = {"rate": SIDES[side], "throughput_rps": statistics.median(rates),
                              "spread": [min(rates), max(rates)],
                              "p50_ms": statistics.median(r["p50_ms"] for r in answered),
                              "p99_ms": statistics.median(p99), "p99_spread": [min(p99), max(p99)],
                              "failures": sum(r["failures"] for r in rs), "runs": rs}
    on, off = runs["shadow 1.0"], runs["no shadow"]
    tput = [a["throughput_rps"] / b["throughput_rps"] for a, b in zip(on, off) if b["throughput_rps"]]
    # a side that completed no request in its run has no p99 (wrk says 0): its latency passed the run's length, so
    # the round's p99 ratio is left out and the target counted as missed
    p99 = [a["p99_ms"] / b["p99_ms"] for a, b in zip(on, off) if a["requests"] and b["requests"]]
    empty = sum(1 for a, b in zip(on, off) if not (a["requests"] and b["requests"]))
    ran = sum(r["shadow"]["ran"] for r in on)
    dropped = sum(r["shadow"]["dropped"] for r in on)
    out["shadow"] = {"ran": ran, "dropped": dropped, "share_ran": ran / (ran + dropped) if ran + dropped else 0.0,
                     "agreement": on[-1]["shadow"]["agreement"] if on else None}
    out["ratios"] = {
        "throughput": {"ratio": statistics.median(tput) if tput else None, "spread": [min(tput), max(tput)] if tput
                       else None, "target": TARGETS["throughput"], "met": bool(tput) and
                       statistics.median(tput) >= TARGETS["throughput"]},
        "p99": {"ratio": statistics.median(p99) if p99 else None, "spread": [min(p99), max(p99)] if p99 else None,
                "target": TARGETS["p99"], "empty_rounds": empty,
                "met": bool(p99) and not empty and statistics.median(p99) <= TARGETS["p99"]}}
    return out


def report_lines(name: str, d: dict) -> list[str]:
    lines = [f"{name}, {d['concurrency']} connections, {d['repeats']} interleaved rounds x {d['duration_s']:.0f} s "
             f"each, one server (the candidate: the same file stored again):", "",
             "| side | req/s (median) | spread | p50 ms | p99 ms | p99 spread | failures |",
             "|---|---|---|---|---|---|---|"]
    for side, x in d["sides"].items():
        lines.append(f"| {side} | {x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                     f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['p99_spread'][0]:.1f}-{x['p99_spread'][1]:.1f} | "
                     f"{x['failures']} |")
    s = d["shadow"]
    agreement = f", top-1 agreement {s['agreement']:.3f}" if s.get("agreement") is not None else ""
    lines += ["", f"- the shadow ran {s['share_ran']:.1%} of the requests it was offered ({s['ran']:,} runs, "
                  f"{s['dropped']:,} dropped under load{agreement}; the server's own counts)"]
    for key, words, bound in (("throughput", "throughput", "at least"), ("p99", "p99", "at most")):
        t = d["ratios"][key]
        if t["ratio"] is None:
            lines.append(f"- {words}: no ratio (a side measured nothing)")
            continue
        empty = (f"; {t['empty_rounds']} round(s) where a side completed no request, left out"
                 if t.get("empty_rounds") else "")
        lines.append(f"- shadow / no shadow, {words}: {t['ratio']:.3f} (rounds {t['spread'][0]:.3f}-"
                     f"{t['spread'][1]:.3f}{empty}), target {bound} {t['target']:.2f}: "
                     f"**{'MET' if t['met'] else 'MISSED'}**")
    return lines + [""]
