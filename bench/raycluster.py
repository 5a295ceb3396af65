"""A real Ray cluster on loopback for batch scoring: a head and worker nodes, each a separate ``ray start
--block`` (its own raylet and object store, ``--num-cpus`` each), joined with a token as Ray's token
authentication wants. ``kill(i)`` is a node lost: SIGKILL to every process of worker node ``i``.

    python -m bench.raycluster --workers 2 -- cnnserve score DIR --engine ray --ray-address {address} ...
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .lb import kill_tree
from tests.support.server import free_port


# Everything a Ray node binds is a port the OS picks, as ray.cluster_utils.Cluster does for its nodes on one
# machine: the dashboard agent's listen port (52365 by default, so the second node on a machine failed to start)
# and the worker ports (a shared fixed range, 10002-19999, by default).
OWN_PORTS = ["--dashboard-agent-listen-port", "0", "--min-worker-port", "0", "--max-worker-port", "0"]


class RayCluster:
    def __init__(self, workers: int = 2, cpus: int = 1, ready_timeout: float = 90):
        self.ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if self.ray is None:
            raise RuntimeError("the ray command is not installed (pip install 'cnnserve[scale]')")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.folder = Path(tempfile.mkdtemp(prefix="cnnserve-ray-"))
        # what a driver needs to join: the same token, no usage reporting
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        common = ["--block", "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        self.workers: list[subprocess.Popen] = []
        self.head = self._start(["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--temp-dir", str(self.folder),
                                 *common, *OWN_PORTS], "head")
        try:
            self._wait_nodes(1, ready_timeout)
            # one node at a time: nodes on one machine name their socket files by counting what the head's session
            # folder holds, and two that start together both take plasma_store.1 (the loser dies on bind)
            for i in range(workers):
                self.workers.append(self._start(["--address", self.address, *common, *OWN_PORTS], f"worker-{i}"))
                self._wait_nodes(2 + i, ready_timeout)
        except BaseException:  # a cluster that never came up is stopped too: its nodes hold fixed ports
            self.stop()
            raise

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        return subprocess.Popen([self.ray, "start", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def nodes(self) -> int:
        """Nodes alive, as the cluster's control store sees them."""
        code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        counts = [line.split(":")[1] for line in out.stdout.splitlines() if line.startswith("alive nodes:")]
        return int(counts[-1]) if out.returncode == 0 and counts else 0

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in [("head", self.head), *((f"worker-{i}", w) for i, w in enumerate(self.workers))]:
                if p.poll() is not None:
                    raise RuntimeError(f"the Ray {name} exited with {p.returncode}: {self._log(name)}")
            if self.nodes() >= n:
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {log.name}: {log.read_text()[-1500:]}" for log in sorted(self.folder.glob("*.log")))
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes within {timeout:g} s\n{logs}")

    def _log(self, name: str) -> str:
        log = self.folder / f"{name}.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"

    def kill(self, i: int) -> None:
        kill_tree(self.workers[i].pid)
        self.workers[i].wait(30)

    def stop(self) -> None:
        for p in [*self.workers, self.head]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.workers, self.head]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="run with {address} filled in, then stop")
    a = ap.parse_args(argv)
    with RayCluster(a.workers) as cluster:
        print(f"Ray cluster at {cluster.address} ({1 + a.workers} nodes)", file=sys.stderr)
        cmd = [c.format(address=cluster.address) for c in a.command if c != "--"]
        return subprocess.run(cmd, env=cluster.env).returncode if cmd else 0


if __name__ == "__main__":
    raise SystemExit(main())
