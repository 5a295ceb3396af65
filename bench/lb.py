"""cnnserve replicas behind a real HAProxy (``deploy/haproxy/haproxy.cfg``) on loopback: a rolling restart
under load, a replica killed, and the throughput of one replica against two. Each trial returns counts
and times; tests assert the counts, the report carries the times.

    python -m bench.lb --model lenet5-digits:latest      # all three trials, JSON on stdout
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.faults import Load
from tests.support.server import ROOT, Server, free_port

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


class Balancer:
    """HAProxy with ``deploy/haproxy/haproxy.cfg``, the ``server`` lines of its backends replaced by ``backends``
    (HTTP ports on 127.0.0.1, named r1, r2, ...) and ``grpc`` (each one's gRPC port, in the same order; none:
    the gRPC backend has no servers), listening on free loopback ports (``port``, and ``grpc_port`` for gRPC
    over HTTP/2), with its runtime API on a socket."""

    def __init__(self, backends: list[int], check_ms: int | None = None, grpc: list[int] | None = None):
        exe = shutil.which("haproxy")
        if exe is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
        self.names = [f"r{i + 1}" for i in range(len(backends))]
        self.folder = Path(tempfile.mkdtemp(prefix="cnnserve-lb-"))
        self.socket = str(self.folder / "admin.sock")
        text = configure(CONFIG.read_text(), dict(zip(self.names, backends)), dict(zip(self.names, grpc or [])))
        if check_ms:
            text = text.replace("default-server inter 1s", f"default-server inter {check_ms}ms")
        self.check_s = (check_ms or 1000) / 1000
        (self.folder / "haproxy.cfg").write_text(text)
        self.port, self.grpc_port = free_port(), free_port()
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.folder / "haproxy.cfg")],
                                     env={**os.environ, "CNNSERVE_LB_BIND": f"127.0.0.1:{self.port}",
                                          "CNNSERVE_LB_GRPC_BIND": f"127.0.0.1:{self.grpc_port}",
                                          "CNNSERVE_LB_SOCKET": self.socket},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def states(self, backend: str = "replicas") -> dict[str, str]:
        """Each replica's check state in ``backend`` (``replicas_grpc``: gRPC's) as HAProxy sees it: UP, DOWN,
        MAINT, ..."""
        rows = self.command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        out = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(",")))
            if fields.get("pxname") == backend and fields.get("svname") in self.names:
                out[fields["svname"]] = fields["status"].split()[0]
        return out

    def wait_for(self, name: str, state: str, timeout: float = 60, backend: str = "replicas") -> float | None:
        """Seconds until ``name`` is in ``state`` (None if it never was within ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.states(backend).get(name) == state:
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def enable(self, name: str, on: bool) -> None:
        self.command(f"{'enable' if on else 'disable'} server replicas/{name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def configure(text: str, http: dict[str, int], grpc: dict[str, int]) -> str:
    """The configuration ``text`` with each backend's ``server`` lines replaced by one per replica (name: port),
    each written as the file's first line of that backend is: HTTP's backend with ``http``'s ports, gRPC's
    (``replicas_grpc``) with ``grpc``'s, its check sent to the same replica's HTTP port."""
    import re

    out, backend, template = [], None, {}
    for line in text.splitlines():
        if m := re.match(r"^(frontend|backend|defaults|global|listen)\b\s*(\S*)", line):
            backend = m.group(2) if m.group(1) == "backend" else None
        if backend and re.match(r"^\s+server\s", line):
            if backend not in template:
                template[backend] = line
                ports = grpc if backend == "replicas_grpc" else http
                for name, port in ports.items():
                    new = re.sub(r"^(\s+server\s+)\S+(\s+[\d.]+:)\d+", rf"\g<1>{name}\g<2>{port}", line)
                    out.append(re.sub(r"(\scheck\b.*\sport\s+)\d+", rf"\g<1>{http[name]}", new))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def replicas(n: int, *args: str, **kw) -> list[Server]:
    return [Server(*args, **kw) for _ in range(n)]


def rolling_restart_trial(servers: list[Server], lb: Balancer, bodies, clients: int = 64,
                          warm_s: float = 2.0) -> dict:
    """SIGTERM each replica in turn under ``clients`` closed-loop clients through the balancer; start it
    again on its port and wait until HAProxy has it UP before the next. Every request is counted."""
    load = Load(lb.port, bodies, clients, keep_alive=True).start()
    time.sleep(warm_s)
    t0, steps = time.monotonic(), []
    try:
        for i, old in enumerate(servers):
            name = lb.names[i]
            t = time.monotonic()
            os.kill(old.proc.pid, signal.SIGTERM)
            down = lb.wait_for(name, "DOWN", 60)
            old.proc.wait(120)
            exited = time.monotonic() - t
            servers[i] = Server(*old.args, port=old.port, **old.kwargs)
            up = lb.wait_for(name, "UP", 120)
            steps.append({"replica": name, "out_of_rotation_s": _r(down), "exited_s": round(exited, 2),
                          "back_up_s": round(time.monotonic() - t, 2) if up is not None else None})
        time.sleep(warm_s)
    finally:
        load.finish()
    counted = load.count(since=t0)
    return {"replicas": len(servers), "clients": clients, "steps": steps,
            "answered": counted["answered"], "statuses": counted["statuses"],
            "non_200": counted["answered"] - counted["statuses"].get(200, 0), "failed": counted["failed"],
            "failure_kinds": counted["failure_kinds"]}


def kill_trial(servers: list[Server], lb: Balancer, bodies, clients: int = 64, warm_s: float = 2.0) -> dict:
    """``kill -9`` of a whole replica (every process of it) under load: what failed, and how long until HAProxy
    took it out of the rotation (against its check interval)."""
    load = Load(lb.port, bodies, clients, keep_alive=True).start()
    time.sleep(warm_s)
    victim = servers[0]
    t0 = time.monotonic()
    kill_tree(victim.proc.pid)
    victim.proc.wait(30)
    down = lb.wait_for(lb.names[0], "DOWN", 60)
    time.sleep(warm_s)
    load.finish()
    counted = load.count(since=t0)
    return {"clients": clients, "check_interval_s": lb.check_s, "fall": 2, "out_of_rotation_s": _r(down),
            "answered_after_kill": counted["answered"], "statuses": counted["statuses"],
            "non_200": counted["answered"] - counted["statuses"].get(200, 0), "failed": counted["failed"],
            "failure_kinds": counted["failure_kinds"]}


def throughput_trial(lb: Balancer, body: Path, content_type: str, concurrency: int = 64, duration: float = 10,
                     repeats: int = 3) -> dict:
    """wrk through the balancer with one replica in rotation, then two, interleaved ``repeats`` times."""
    from .floor_section import wrk

    url = f"http://127.0.0.1:{lb.port}/classify"
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            lb.enable(lb.names[1], n == 2)
            time.sleep(0.5)
            runs[n].append(wrk(url, body, content_type, concurrency, duration))
    lb.enable(lb.names[1], True)
    med = {n: sorted(r["throughput_rps"] for r in rs)[len(rs) // 2] for n, rs in runs.items()}
    return {"concurrency": concurrency, "duration_s": duration, "runs": runs,
            "median_rps": med, "two_over_one": round(med[2] / med[1], 3)}


def kill_tree(pid: int) -> None:
    """SIGKILL to a process and every descendant at once, as when its container dies (BentoML's workers
    are not all in the server's process group)."""
    import psutil

    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def sample_bodies(server: Server) -> list[tuple[bytes, str]]:
    """The held-out images the export embedded in the served model (``/models/NAME/samples``)."""
    import base64
    import urllib.request

    with urllib.request.urlopen(server.url + "/models") as r:
        name = json.load(r)["default"]
    with urllib.request.urlopen(f"{server.url}/models/{name}/samples") as r:
        urls = [s["image"] for s in json.load(r)["samples"]]
    out = []
    for u in urls:
        head, data = u.split(",", 1)
        out.append((base64.b64decode(data), head.split(":")[1].split(";")[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet5-digits:latest")
    ap.add_argument("--clients", type=int, default=64)
    a = ap.parse_args(argv)
    args = ("--arg", f"models={a.model}", "--arg", "workers=1")
    servers = replicas(2, *args)
    lb = Balancer([s.port for s in servers], grpc=[s.grpc_port for s in servers])
    bodies = sample_bodies(servers[0])
    try:
        out = {"rolling_restart": rolling_restart_trial(servers, lb, bodies, a.clients)}
        body = Path(tempfile.mkdtemp(prefix="cnnserve-lb-")) / "body"
        body.write_bytes(bodies[0][0])
        out["throughput"] = throughput_trial(lb, body, bodies[0][1], concurrency=a.clients)
        out["kill"] = kill_trial(servers, lb, bodies, a.clients)  # last: it leaves one replica dead
    finally:
        lb.stop()
        for s in servers:
            s.stop()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
