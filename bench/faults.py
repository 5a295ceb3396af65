"""The harness's fault section (``cnnserve bench --sections faults``): the trials of
``tests/support/faults.py`` (drain on SIGTERM, kill -9 of a worker, a soak with hostile images), each on
a fresh server, and their rows in the report. The tests run the same trials and assert on their counts.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.faults import drain_trial, kill_worker_trial, soak_trial
from tests.support.server import Server

from .workloads import log


def run_all(server_args: list[str], bodies, hostile_bodies, soak_s: float = 20.0) -> dict:
    """The three trials, each on a fresh server with ``server_args``, for the benchmark report."""
    out = {}
    for name, trial in (("drain", lambda s: drain_trial(s, bodies, clients=32)),
                        ("kill_worker", lambda s: kill_worker_trial(s, bodies, clients=32)),
                        ("soak", lambda s: soak_trial(s, bodies, hostile_bodies, seconds=soak_s, clients=16))):
        srv = Server(*server_args)
        try:
            out[name] = trial(srv)
        except Exception as e:  # noqa: BLE001 - reported, the other trials still run
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            srv.stop()
    return out


def section(w: dict) -> dict:
    """Drain on SIGTERM, kill -9 of a worker, and a soak with hostile images (``bench/faults.py``)."""
    from tests.support import hostile

    log(f"{w['name']}: fault trials (drain, kill -9 of a worker, soak with hostile images)")
    files = sorted(Path(w["images"]).iterdir())[:16]
    ctype = "image/png" if w["format"] == "PNG" else "image/jpeg"
    bodies = [(f.read_bytes(), ctype) for f in files]
    bad = [(data, "application/octet-stream") for data, _, _ in hostile.images().values()]
    settings = [a for k, v in w["serve"].items() if k != "workers" for a in ("--arg", f"{k}={v}")]
    return run_all(["--arg", f"models={w['tag']}", *settings], bodies, bad)


def report_lines(name: str, r: dict) -> list[str]:
    """Markdown for one workload's trials."""
    d, k, s = r.get("drain", {}), r.get("kill_worker", {}), r.get("soak", {})
    lines = [f"### {name}", "", "| trial | result |", "|---|---|"]
    if "exit_code" in d:
        lines.append(f"| SIGTERM under load (kept-alive and new-connection clients; they stop when /readyz "
                     f"is not 200) | /readyz 503 after {d['readyz_503_after_s']} s; exit code {d['exit_code']} after "
                     f"{d['exit_s']} s; {d['answered_after_sigterm']} answered after the signal, "
                     f"{d['dropped_after_sigterm']} dropped, {d['5xx_after_sigterm']} 5xx |")
    if "workers" in k:
        lines.append(f"| kill -9 of one of {k['workers']} workers under load ({k['clients']} clients) | "
                     f"{k['failed']} requests lost (those it held), {k['5xx']} 5xx; first answer "
                     f"{k['first_answer_after_s']} s after the kill, longest pause {k['longest_gap_s']} s, "
                     f"{k['answered_after_kill']} answered after it; worker back and ready after "
                     f"{k['worker_back_after_s']} s |")
    if "seconds" in s:
        lines.append(f"| soak {s['seconds']:.0f} s, good and hostile images mixed | statuses {s['statuses']}, "
                     f"{s['failed']} connection failures; server memory {s['rss_before_mb']} MB before, "
                     f"{s['rss_peak_mb']} MB peak, {s['rss_after_mb']} MB after; ready after: {s['ready_after']} |")
    lines += [f"| {t} | could not run: `{v['error']}` |" for t, v in r.items() if "error" in v]
    return lines
