"""The harness's ``peers`` section: cnnserve beside Triton (PyTriton), KServe, Ray Serve and MLServer, each serving
the workload's ``model.onnx`` with onnxruntime on the same cores, under the same ``wrk`` load (``load.py``).

For a workload: each peer's environment made ready (``env.py``; a peer that cannot install or start is reported
with the reason); each peer's tuning, where asked for (``tune_peer``: its trials at 64 connections within the same
budget per peer, the best kept); then every server started side by side, cnnserve with the settings ``cnnserve
tune`` chose (``precision=fp32``: the same file as the peers), each peer with its documented settings and, where
its tuning found better, a second time with those. Then for each request kind and concurrency, ``repeats`` rounds,
each round running every server once in a rotated order, so that the machine's drift falls on all alike: req/s,
p50/p99, CPU-ms per request from the server's process tree (psutil, before and after), and the tree's memory."""

from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

from . import kserve_peer, mlserver_peer, rayserve_peer, triton_peer
from .base import Running, tree_cpu, tree_memory
from .env import Unavailable, freeze, venv
from .load import bodies, wrk

PEERS = {p.PEER.name: p.PEER for p in (triton_peer, kserve_peer, rayserve_peer, mlserver_peer)}
#: the p99 a tuning trial must keep, as ``cnnserve tune`` chose each workload's settings under (docs/tuning.md)
P99_LIMIT_MS = {"lenet5": 100.0, "resnet18": 2000.0}
TUNE_CONCURRENCY = 64


def scrub(message: str, work: Path) -> str:
    """An error for the report, without this machine's folders."""
    for path, name in ((str(work), "<work>"), (str(Path(__file__).resolve().parents[2]), "<repo>"),
                       (os.path.expanduser("~"), "~")):
        message = message.replace(path, name)
    return message


def primary_kind(kinds) -> str:
    return "binary" if "binary" in kinds else "json"


def idle_cpu(servers: dict[str, Running], seconds: float) -> dict[str, float]:
    """Each server's CPU use when no request comes (Ray's and Triton's daemons keep working): % of one core."""
    before = {k: sum(tree_cpu(s.proc.pid).values()) for k, s in servers.items()}
    time.sleep(seconds)
    return {k: round(100 * (sum(tree_cpu(s.proc.pid).values()) - before[k]) / seconds, 1) for k, s in servers.items()}


def settle(srv: Running, idle_cores: float = 0.1, limit: float = 60.0) -> float:
    """Until the server is idle again (``tune_measure.settle``). Returns the seconds waited."""
    from ..tune_measure import settle as settle_tree

    return settle_tree(srv.proc.pid, idle_cores, limit)


def measure(srv: Running, kind: str, lists: dict, concurrency: int, duration: float, idle_cores: float = 0.1) -> dict:
    path = "/classify" if kind == "classify" else f"/v2/models/{srv.model}/infer"
    cpu0 = tree_cpu(srv.proc.pid)
    r = wrk(srv.url + "/", path, lists[kind], concurrency, duration)
    cpu1 = tree_cpu(srv.proc.pid)
    r["settle_s"] = round(settle(srv, idle_cores), 2)  # before the next run, on this server or another
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
    r["cpu_ms"] = 1000 * cpu / r["requests"] if r["requests"] else float("nan")
    return r


def tune_peer(peer, python: Path, w: dict, lists: dict, budget_s: float, duration: float, warmup: float,
              folder: Path, log) -> dict:
    """The peer's documented settings, then its trials, each started and measured once at 64 connections on its
    primary kind, until the budget (start-up included) is spent; the best req/s within the p99 limit is kept (where
    none keeps it, the best req/s)."""
    kind, limit = primary_kind(peer.kinds), P99_LIMIT_MS.get(w["name"], 2000.0)
    t0, trials = time.time(), []
    for extra in [{}, *peer.trials]:
        if trials and time.time() - t0 > budget_s:
            break
        settings = {**peer.default, **extra}
        try:
            srv = Running.peer(peer, python, w["onnx"], w["model"], settings, folder)
        except RuntimeError as e:
            trials.append({"settings": settings, "error": scrub(str(e)[-300:], folder)})
            log(f"{w['name']}: tuning {peer.label} {settings}: could not start: {trials[-1]['error'][-200:]}")
            continue
        try:
            wrk(srv.url + "/", f"/v2/models/{srv.model}/infer", lists[kind], TUNE_CONCURRENCY, warmup)
            settle(srv, 0.2)
            r = measure(srv, kind, lists, TUNE_CONCURRENCY, duration, 0.2)
        except RuntimeError as e:
            r = {"error": scrub(str(e)[-300:], folder)}
        finally:
            srv.stop()
        r["settings"] = settings
        trials.append(r)
        if "error" not in r:
            log(f"{w['name']}: tuning {peer.label} {settings}: {r['throughput_rps']:.0f} req/s, p99 {r['p99_ms']:.1f} "
                f"ms, failures {r['non_200'] + r['socket_errors']}")
    clean = [t for t in trials if "error" not in t and not t["non_200"] and not t["socket_errors"]]
    within = [t for t in clean if t["p99_ms"] <= limit]
    # none within the limit (a server that cannot keep it at 64 connections): the most req/s all the same
    best = max(within or clean, key=lambda t: t["throughput_rps"]) if clean else None
    return {"kind": kind, "concurrency": TUNE_CONCURRENCY, "p99_limit_ms": limit, "budget_s": budget_s,
            "spent_s": round(time.time() - t0, 1), "trials": trials, "within_limit": bool(within),
            "chosen": best["settings"] if best else None,
            "better_than_default": bool(best) and best["settings"] != trials[0].get("settings")}


def check(srv: Running, kind: str, lists: dict, reference) -> float:
    """The server's probabilities for the first request of ``kind`` against onnxruntime's in this process: the
    largest difference (a server that answers otherwise is not measured)."""
    import numpy as np

    ctype, hlen, path = lists[kind].read_text().splitlines()[0].split(" ", 2)
    headers = {"Content-Type": ctype, **({"Inference-Header-Content-Length": hlen} if hlen != "-" else {})}
    req = urllib.request.Request(srv.infer, data=Path(path).read_bytes(), headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    out = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    return float(np.abs(np.asarray(out["data"], np.float32).reshape(reference.shape) - reference).max())


def summarise(runs: list[dict]) -> dict:
    rates = [r["throughput_rps"] for r in runs]
    return {"throughput_rps": statistics.median(rates), "spread": [min(rates), max(rates)],
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
            "failures": sum(r["non_200"] + r["socket_errors"] for r in runs), "runs": runs}


def section(w: dict, work: Path, concurrencies=(1, 8, 64, 256), duration: float = 10, short: float = 5,
            warmup: float = 2, repeats: int = 3, peers=tuple(PEERS), tune_min: float = 5.0, images: int = 16,
            log=print) -> dict:
    """The section for one workload (``workloads.prepare``'s dict); returns what the report reads."""
    name = w["name"]
    model = w["tag"].split(":")[0]
    w = {**w, "model": model}
    folder = Path(work) / "peers" / name
    shape = tuple(w["spec"].input_shape)
    files = sorted(p for p in Path(w["images"]).iterdir() if p.suffix in (".png", ".jpg"))[:images]
    lists = bodies(files, shape, folder / "bodies")
    from .peer_model import Classifier, decode

    reference = Classifier(w["onnx"]).run(decode(files[0].read_bytes(), *shape))
    out = {"load_before": [round(x, 2) for x in os.getloadavg()], "concurrencies": list(concurrencies),
           "duration_s": duration, "short_s": short, "repeats": repeats,
           "tune_budget_s": tune_min * 60, "images": len(files), "servers": {}, "errors": {}, "cells": []}
    envs = {}
    for key in peers:
        peer = PEERS[key]
        try:
            envs[key] = venv(key, Path(work), log)
        except Unavailable as e:
            out["errors"][peer.label] = scrub(str(e), work)
            log(f"{name}: {peer.label} not run: {e}")
    configs = {"cnnserve": ("cnnserve", {**w["serve"], "precision": "fp32"}, "cnnserve tune's choice "
                            f"({w['serve_from']}), precision=fp32")}
    for key, python in envs.items():
        peer = PEERS[key]
        configs[peer.label] = (key, dict(peer.default), peer.default_from)
        if tune_min > 0:
            t = tune_peer(peer, python, w, lists, tune_min * 60, duration, warmup, folder, log)
            out.setdefault("tuning", {})[peer.label] = t
            if t["better_than_default"]:
                configs[f"{peer.label}, tuned"] = (key, dict(t["chosen"]), "its tuning's best trial")
    servers: dict[str, Running] = {}
    try:
        for label, (key, settings, source) in configs.items():
            try:
                servers[label] = (Running.cnnserve(w["tag"], settings) if key == "cnnserve" else
                                  Running.peer(PEERS[key], envs[key], w["onnx"], model, settings, folder))
            except RuntimeError as e:
                if key == "cnnserve":
                    raise
                out["errors"][label] = scrub(str(e)[-500:], work)
                log(f"{name}: {label} could not start: {str(e)[-300:]}")
                continue
            kinds = ("json", "binary", "image", "classify") if key == "cnnserve" else PEERS[key].kinds
            try:
                diff = check(servers[label], primary_kind(kinds), lists, reference)
            except (OSError, ValueError, KeyError, StopIteration) as e:
                diff = f"{type(e).__name__}: {e}"
            if not isinstance(diff, float) or diff > 1e-4:
                out["errors"][label] = f"its answer differs from onnxruntime's: {diff}"
                log(f"{name}: {label} answers otherwise than onnxruntime ({diff}): not measured")
                servers.pop(label).stop()
                continue
            out["servers"][label] = {"peer": key, "settings": settings, "from": source, "kinds": list(kinds),
                                     "tuned": label.endswith(", tuned")}
            if key != "cnnserve":
                out["servers"][label]["versions"] = freeze(envs[key])
        out["idle_cpu_pct"] = idle_cpu(servers, 5)
        top = max(concurrencies)
        cells = [(k, c) for k in ("binary", "json") for c in concurrencies] + [("image", 64), ("classify", 64)]
        for kind, c in cells:
            targets = [lb for lb, s in servers.items() if kind in out["servers"][lb]["kinds"]
                       and (c == 64 or not out["servers"][lb]["tuned"])]
            if not targets:
                continue
            secs = duration if c in (64, top) else short
            runs = {lb: [] for lb in targets}
            for i in range(repeats):
                order = targets[i % len(targets):] + targets[:i % len(targets)]
                for lb in order:
                    srv = servers[lb]
                    try:
                        idle = out["idle_cpu_pct"].get(lb, 0) / 100
                        if i == 0 and warmup:
                            measure(srv, kind, lists, c, warmup, idle)
                        r = measure(srv, kind, lists, c, secs, idle)
                    except RuntimeError as e:
                        out["errors"][f"{lb} {kind} x{c}"] = scrub(str(e)[-300:], work)
                        continue
                    runs[lb].append(r)
            for lb, rs in runs.items():
                if not rs:
                    continue
                cell = {"server": lb, "kind": kind, "concurrency": c, "duration_s": secs, **summarise(rs)}
                if c == 64:
                    cell["memory"] = tree_memory(servers[lb].proc.pid)
                out["cells"].append(cell)
                log(f"{name}: {lb} {kind} x{c}: {cell['throughput_rps']:.0f} req/s ({cell['spread'][0]:.0f}-"
                    f"{cell['spread'][1]:.0f}), p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms, "
                    f"{cell['cpu_ms']:.2f} CPU-ms/request, failures {cell['failures']}")
    finally:
        for srv in servers.values():
            srv.stop()
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return out
