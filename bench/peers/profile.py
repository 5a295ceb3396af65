"""Where a v2 infer request's CPU goes, cnnserve against Triton (PyTriton), both under ``wrk`` (64 connections,
binary tensor extension, the LeNet-5 workload): each server's process tree's CPU per request, process by process
(psutil), and for cnnserve's workers the Python functions that took it (``py-spy record``, collapsed stacks, run
from an environment of one's own: ``PYSPY=/path/to/py-spy``). Prints a Markdown summary; the flame data is kept
where ``--out`` says.

    python -m bench.peers.profile --work bench/work --seconds 20 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import time
from pathlib import Path

from .base import Running, tree, tree_cpu
from .env import venv
from .load import bodies, wrk
from .section import PEERS

def short(frame: str) -> str:
    """``function (file:line)`` as ``function (package/file)``: no machine's folders."""
    m = re.match(r"(.*) \((.*?):(\d+)\)", frame)
    if not m:
        return frame
    fn, path, _ = m.groups()
    for prefix in (r".*site-packages/", r".*/lib/python3\.\d+/", r".*/(?=(service|cnnserve|bench)/)"):
        path = re.sub(prefix, "", path)
    return f"{fn} ({path})"


def summarise(files: list[Path], top: int = 30) -> tuple[int, int, list, list]:
    """py-spy's collapsed stacks: samples busy and idle (a thread waiting on a condition or a queue), the
    functions that held the most busy samples themselves (self) and under them (inclusive)."""
    own, under = collections.Counter(), collections.Counter()
    busy = idle = 0
    for f in files:
        for line in f.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = [short(x) for x in stack.split(";")[1:]]
            if not frames or frames[-1].startswith(("Condition.wait", "Queue.get")) or (
                    frames[-1].startswith("_worker (concurrent") and "Queue.get" in stack):
                idle += int(n)
                continue
            busy += int(n)
            own[frames[-1]] += int(n)
            for x in set(frames):
                under[x] += int(n)
    return busy, idle, own.most_common(top), under.most_common(top * 3)


def spy(pids: list[int], seconds: float, out: Path) -> list[Path]:
    exe = os.environ.get("PYSPY", "py-spy")
    procs = [subprocess.Popen([exe, "record", "--pid", str(p), "--duration", str(int(seconds)), "--rate", "250",
                               "--nonblocking", "--format", "raw", "--output", str(out / f"cnnserve-{p}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in pids]
    for p in procs:
        p.wait(seconds + 60)
    return [out / f"cnnserve-{p}.txt" for p in pids if (out / f"cnnserve-{p}.txt").is_file()]


def per_process(srv: Running, lists: dict, seconds: float) -> tuple[dict, dict]:
    before = tree_cpu(srv.proc.pid)
    # each process by its program and its first argument's last part (no machine's folders)
    names = {p.pid: " ".join(os.path.basename(a) for a in p.cmdline()[:3]) for p in tree(srv.proc.pid)}
    r = wrk(srv.url + "/", f"/v2/models/{srv.model}/infer", lists["binary"], 64, seconds)
    after = tree_cpu(srv.proc.pid)
    ms = {f"{names.get(pid, pid)} ({pid})": 1000 * (t - before.get(pid, 0.0)) / r["requests"]
          for pid, t in after.items()}
    return r, {k: v for k, v in sorted(ms.items(), key=lambda kv: -kv[1]) if v > 0.005}


def main() -> None:
    from ..workloads import ROOT, prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "bench" / "work"))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--out", default="profile")
    ap.add_argument("--no-triton", action="store_true", help="cnnserve only (Triton's side starts PyTriton)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = prepare("lenet5", ROOT, Path(args.work))
    files = sorted(Path(w["images"]).glob("*.png"))[:16]
    lists = bodies(files, tuple(w["spec"].input_shape), out / "bodies", kinds=("binary",))
    lines = ["| server | req/s | p99 ms | CPU-ms per request, by process |", "|---|---|---|---|"]
    srv = Running.cnnserve(w["tag"], {**w["serve"], "precision": "fp32"})
    try:
        wrk(srv.url + "/", f"/v2/models/{srv.model}/infer", lists["binary"], 64, 3)
        r, ms = per_process(srv, lists, args.seconds)
        lines.append(f"| cnnserve | {r['throughput_rps']:.0f} | {r['p99_ms']:.1f} | "
                     + "; ".join(f"{k}: {v:.3f}" for k, v in ms.items()) + " |")
        workers = [p.pid for p in tree(srv.proc.pid) if p.pid != srv.proc.pid]
        import threading

        result = {}
        th = threading.Thread(target=lambda: result.update(
            wrk(srv.url + "/", f"/v2/models/{srv.model}/infer", lists["binary"], 64, args.seconds + 4)))
        th.start()
        time.sleep(2)
        busy, idle, own, under = summarise(spy(workers, args.seconds, out))
        th.join()
        prof = ["", f"cnnserve's workers under py-spy ({args.seconds:.0f} s at {result.get('throughput_rps', 0):.0f} "
                f"req/s; {busy} busy samples, {idle} of threads waiting left out): share of the busy samples", "",
                "| function (self) | share |", "|---|---|"]
        prof += [f"| {k} | {v / busy:.1%} |" for k, v in own]
        prof += ["", "| function (inclusive) | share |", "|---|---|"] + [f"| {k} | {v / busy:.1%} |" for k, v in under]
    finally:
        srv.stop()
    if args.no_triton:
        print("\n".join(lines + prof))
        return
    peer = PEERS["triton"]
    trt = Running.peer(peer, venv("triton", Path(args.work)), w["onnx"], srv.model,
                       {**peer.default, "max_batch_size": 64, "spin": False}, out / "triton")
    try:
        wrk(trt.url + "/", f"/v2/models/{trt.model}/infer", lists["binary"], 64, 3)
        r, ms = per_process(trt, lists, args.seconds)
        lines.append(f"| Triton (PyTriton, max_batch_size=64, spin off) | {r['throughput_rps']:.0f} | "
                     f"{r['p99_ms']:.1f} | " + "; ".join(f"{k}: {v:.3f}" for k, v in ms.items()) + " |")
    finally:
        trt.stop()
    print("\n".join(lines + prof))


if __name__ == "__main__":
    main()
