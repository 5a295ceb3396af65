"""The search behind ``cnnserve tune`` (``bench/tune.py``): the knobs and their ladders, what a trial
scores, and the hill-climb with its final check.

Each trial starts the real service (``bentoml serve``) with one candidate setting and drives it with
``wrk`` (a C load generator) POSTing the model's own held-out images (``/models/NAME/samples``) at each
``--concurrency``: req/s, p50/p95/p99, CPU-ms per request (the server's whole process tree, by psutil),
the mean batch formed (the service's ``/metrics``), 503s and other failures. A trial *meets* the
constraint when its p99 is at most ``--p99-ms`` at every concurrency with no failed request; among
those, the one that serves most over all of them wins (``served``: the geometric mean of its req/s).

The search is a hill-climb from the defaults: each step tries the neighbours of the best setting so far
(one knob one step up or down its ladder, first the direction that last paid) and moves to the first that
beats it by more than ``GAIN``; it stops when none does or the budget would not leave room for the check.
The check: the winner and the defaults serve side by side and are measured interleaved, three runs each;
the winner is kept only if its slowest run beats the defaults' fastest (their spread) under the
constraint; else the defaults stay and the report says so. ``bench/tune.py`` is the command that runs
it and ``bench/tune_report.py`` writes the results.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from cnnserve.core.config import DEFAULTS, cores

from .tune_measure import measure, start

GAIN = 0.03  # a neighbour must beat the best so far by this fraction of what it serves to be moved to


def log(msg: str) -> None:
    print(f"[tune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the search space ---------------------------------------------------------------------------

def knobs(precisions: list[str], gpu: bool = False) -> dict[str, list]:
    """Each knob's ladder of values, in order (a step moves to a neighbour on it); inline decoding is
    added once the images are known (``Tuner.fetch_bodies``). ``gpu``: onnxruntime runs on CUDA here, and
    the GPU's knobs join (runs in flight, CUDA graphs; docs/gpu.md), which do nothing on a CPU."""
    # precision first where there is a choice: tried before the other knobs' steps from each point, as the
    # one most likely to move a model-bound workload (and the one a short budget would otherwise never reach)
    out = {"precision": ["auto", *precisions]} if len(precisions) > 1 else {}  # auto and each verified variant
    out |= {"workers": list(range(1, min(8, 2 * cores()) + 1)), "threads": [0, *range(1, cores() + 1)],
            "max_batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256], "max_wait_ms": [0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]}
    if gpu:
        out |= {"runs_in_flight": [1, 2, 3, 4], "cuda_graphs": [False, True]}
    return out


def defaults_point(space: dict[str, list]) -> dict:
    d = {"workers": DEFAULTS.workers, "threads": DEFAULTS.threads, "max_batch_size": DEFAULTS.max_batch_size,
         "max_wait_ms": DEFAULTS.max_wait_ms, "precision": DEFAULTS.precision,
         "runs_in_flight": DEFAULTS.runs_in_flight, "cuda_graphs": DEFAULTS.cuda_graphs,
         "inline_decode": (DEFAULTS.inline_decode_pixels, DEFAULTS.inline_decode_bytes)}
    return {k: d[k] for k in space}


def settings_of(point: dict) -> dict:
    """The service arguments of a point (``inline_decode`` is two of them)."""
    out = {}
    for k, v in point.items():
        if k == "inline_decode":
            out["inline_decode_pixels"], out["inline_decode_bytes"] = v
        else:
            out[k] = v
    return out


def neighbours(point: dict, space: dict[str, list], first: tuple[str, int] | None) -> list[tuple[str, int, dict]]:
    """Every point one step away (ordinal knobs: one up or down; two-valued: the other), the move ``first``
    (the one that last paid) at the head."""
    moves = []
    for k, ladder in space.items():
        i = ladder.index(point[k]) if point[k] in ladder else 0
        steps = [+1, -1] if k not in ("precision",) else [j - i for j in range(len(ladder)) if j != i]
        for d in steps:
            if 0 <= i + d < len(ladder):
                moves.append((k, d, {**point, k: ladder[i + d]}))
    if first:
        moves.sort(key=lambda m: (m[0], m[1]) != first)
    return moves


def describe(point: dict, base: dict) -> str:
    diff = {k: v for k, v in settings_of(point).items() if settings_of(base).get(k) != v}
    return " ".join(f"{k}={v}" for k, v in diff.items()) or "defaults"


def meets(rows: list[dict], p99_ms: float) -> bool:
    return bool(rows) and all(r["p99_ms"] <= p99_ms and r["failures"] == 0 for r in rows)


def served(rows: list[dict]) -> float:
    """What a setting serves over every concurrency asked, as one figure: the geometric mean of its req/s. Each
    concurrency counts alike, and at one connection req/s is one over the latency, so a setting that keeps a
    lone client waiting loses what it gains at the highest. (Ranked by req/s at the highest alone, ResNet-18 on
    2 cores kept two workers of one thread each: 200 req/s at 32 connections against one worker's 198, while
    one client got 91 against 139 and its p99 at 32 was 238 ms against 179.)"""
    return math.exp(statistics.fmean(math.log(max(r["throughput_rps"], 1e-9)) for r in rows))


def score(rows: list[dict], p99_ms: float) -> tuple:
    """What the search maximises: meeting the constraint first; then what it serves (``served``), or, while
    nothing meets it, the smallest worst p99 over the limit."""
    if not rows:
        return (False, float("-inf"))
    if meets(rows, p99_ms):
        return (True, served(rows))
    return (False, -max(r["p99_ms"] / p99_ms + r["failures"] for r in rows))


def better(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return a[0]
    if a[0]:
        return a[1] > b[1] * (1 + GAIN)
    return a[1] > b[1] + GAIN


# --- the search ----------------------------------------------------------------------------------

class Tuner:
    def __init__(self, tag: str, name: str, space: dict[str, list], work: Path, a: argparse.Namespace):
        self.tag, self.name, self.space, self.work, self.a = tag, name, space, work, a
        self.bodies: Path | None = None
        self.samples: list[dict] = []
        self.trials: list[dict] = []
        self.t0 = time.monotonic()
        self.start_s: list[float] = []
        self.stopped: str | None = None  # why the search ended before no neighbour of the best beat it

    def left(self) -> float:
        return self.a.budget_min * 60 - (time.monotonic() - self.t0)

    def per_trial(self) -> float:
        start = statistics.mean(self.start_s) if self.start_s else 15.0
        return start + len(self.a.concurrency) * (self.a.duration + self.a.warmup + 1)

    def confirm_cost(self) -> float:
        start = statistics.mean(self.start_s) if self.start_s else 15.0
        return 2 * start + len(self.a.concurrency) * (2 * self.a.warmup + 6 * (self.a.duration + 1))

    def one_pass(self) -> tuple[int, float]:
        """The trials and seconds that one pass over the knobs needs: the defaults, each knob one step from them
        (at most --max-trials in all), and the check. Below it the search ends before it has tried them, and
        "no other setting beat the defaults" would say nothing."""
        trials = min(self.a.max_trials, 1 + len(neighbours(defaults_point(self.space), self.space, None)))
        return trials, trials * self.per_trial() + self.confirm_cost()

    def budget_check(self) -> tuple[str | None, str | None]:
        """A refusal when ``--budget-min`` leaves no room for a second trial and the check (the search could
        compare nothing with the defaults), else a warning when it is below one pass over the knobs; each
        names what one pass needs. The figures assume 15 s per server start, more than most models take."""
        trials, seconds = self.one_pass()
        need = (f"the {seconds / 60:.1f} min that one pass over the knobs needs here ({trials} trials: the defaults "
                f"and each of {', '.join(self.space)} one step, about {self.per_trial():.0f} s each at "
                f"{len(self.a.concurrency)} concurrencies, then {self.confirm_cost():.0f} s for the check)")
        budget = self.a.budget_min * 60
        if self.a.max_trials > 1 and budget < 2 * self.per_trial() + self.confirm_cost():
            return (f"--budget-min {self.a.budget_min:g} leaves no room to try anything beside the defaults; it is "
                    f"below {need}: give --budget-min {math.ceil(seconds / 60)}, or fewer --concurrency values, a "
                    "shorter --duration or fewer --max-trials"), None
        if budget < seconds:
            return None, (f"--budget-min {self.a.budget_min:g} is below {need}: the search may stop before it has "
                          "tried every knob (it says so at the end)")
        return None, None

    def trial(self, point: dict, base: dict) -> dict:
        n = len(self.trials) + 1
        t = {"trial": n, "point": point, "settings": settings_of(point), "label": describe(point, base), "rows": []}
        t0 = time.monotonic()
        try:
            srv = start(self.tag, settings_of(point))
        except RuntimeError as e:  # a setting the service refuses (a variant it lacks) or cannot start with
            t["error"] = str(e).splitlines()[0][:200]
            log(f"trial {n} ({t['label']}): the service did not start: {t['error']}")
            self.trials.append(t)
            return t
        self.start_s.append(time.monotonic() - t0)
        try:
            if self.bodies is None:
                self.fetch_bodies(srv, t)
            for c in self.a.concurrency:
                r = measure(srv, self.name, self.bodies, c, self.a.duration, self.a.warmup)
                t["rows"].append(r)
                log(f"trial {n} ({t['label']}) x{c}: {r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.1f} "
                    f"p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.2f} CPU-ms/req, "
                    f"batch {r['mean_batch']:.1f}, 503s {r['n_503']}, failures {r['failures']}")
        finally:
            srv.stop()
        t["meets"] = meets(t["rows"], self.a.p99_ms)
        self.trials.append(t)
        return t

    def fetch_bodies(self, srv, t: dict) -> None:
        """The model's own held-out images, from the first server (``/models/NAME/samples``), as wrk's bodies;
        images over the inline-decoding limits add that knob to the search."""
        from .lb import sample_bodies

        found = sample_bodies(srv)
        if not found:
            raise ValueError(f"{self.tag} carries no held-out sample images (/models/{self.name}/samples is "
                             "empty): export it again with `cnnserve export` to embed them")
        lines = []
        for i, (data, ctype) in enumerate(found):
            path = self.work / f"sample-{i}.{ctype.split('/')[-1]}"
            path.write_bytes(data)
            lines.append(f"{ctype} {path}")
            self.samples.append({"bytes": len(data), "type": ctype})
        self.bodies = self.work / "bodies.txt"
        self.bodies.write_text("\n".join(lines) + "\n")
        biggest = max(len(d) for d, _ in found)
        pixels = max(_pixels(d) for d, _ in found)
        if pixels > DEFAULTS.inline_decode_pixels or biggest > DEFAULTS.inline_decode_bytes:
            self.space["inline_decode"] = [(DEFAULTS.inline_decode_pixels, DEFAULTS.inline_decode_bytes),
                                           (pixels, biggest)]
            t["point"] = {**t["point"], "inline_decode": self.space["inline_decode"][0]}
            t["settings"] = settings_of(t["point"])
        log(f"sending the model's {len(found)} held-out images ({', '.join(sorted({c for _, c in found}))}, "
            f"up to {biggest} bytes) round-robin")

    def search(self) -> tuple[dict, dict]:
        """Hill-climb from the defaults; returns the defaults' trial and the best one."""
        base = defaults_point(self.space)
        first = best = self.trial(base, base)
        if "error" in first:
            raise ValueError(f"the service does not start with its default settings: {first['error']}")
        base = first["point"]  # with the inline-decoding knob where the images call for it
        seen, last = {repr(base)}, None
        while True:
            moved = False
            for knob, step, point in neighbours(best["point"], self.space, last):
                if repr(point) in seen:
                    continue
                if len(self.trials) >= self.a.max_trials or self.left() < self.per_trial() + self.confirm_cost():
                    self.stopped = "--max-trials reached" if len(self.trials) >= self.a.max_trials else "budget"
                    log(f"search stops after {len(self.trials)} trials: {self.stopped}")
                    return first, best
                seen.add(repr(point))
                t = self.trial(point, base)
                if better(score(t["rows"], self.a.p99_ms), score(best["rows"], self.a.p99_ms)):
                    log(f"trial {t['trial']} is the best so far ({knob} {'up' if step > 0 else 'down'})")
                    best, last, moved = t, (knob, step), True
                    break
            if not moved:
                log(f"search done after {len(self.trials)} trials: no neighbour of the best beats it")
                return first, best

    def confirm(self, defaults: dict, winner: dict) -> dict:
        """The winner and the defaults served side by side, measured interleaved, three runs each."""
        runs: dict[str, list[list[dict]]] = {"defaults": [], "winner": []}
        log(f"checking trial {winner['trial']} ({winner['label']}) against the defaults: 3 interleaved runs each")
        servers = {}
        try:
            for k, t in (("defaults", defaults), ("winner", winner)):
                servers[k] = start(self.tag, t["settings"])
            for i in range(3):
                for k, srv in servers.items():
                    rows = [measure(srv, self.name, self.bodies, c, self.a.duration, self.a.warmup if i == 0 else 0)
                            for c in self.a.concurrency]
                    runs[k].append(rows)
                    log(f"check run {i + 1}, {k}: serves {served(rows):.0f} req/s, p99 at {rows[-1]['concurrency']} "
                        f"connections {rows[-1]['p99_ms']:.1f} ms")
        finally:
            for srv in servers.values():
                srv.stop()
        rates = {k: [served(rows) for rows in rs] for k, rs in runs.items()}
        ok = {k: meets([_median_row([rows[j] for rows in rs]) for j in range(len(self.a.concurrency))],
                       self.a.p99_ms) for k, rs in runs.items()}
        kept = ok["winner"] and (not ok["defaults"] or min(rates["winner"]) > max(rates["defaults"]))
        return {"concurrency": list(self.a.concurrency), "runs": runs, "rates": rates, "meets": ok, "kept": kept,
                "median": {k: statistics.median(v) for k, v in rates.items()}}


def _pixels(data: bytes) -> int:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.width * im.height


def _median_row(rows: list[dict]) -> dict:
    """The median of repeated runs at one concurrency (each figure its own median; failures summed)."""
    out = {k: statistics.median(r[k] for r in rows) for k in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms")}
    return {**out, "concurrency": rows[0]["concurrency"], "failures": sum(r["failures"] for r in rows)}
