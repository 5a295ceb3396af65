"""A peer as the section sees it (``Peer``: its server script, the requests it takes, its documented settings
and the settings its tuning tries) and a running server of it or of cnnserve (``Running``): started on free
loopback ports, ready when its v2 readiness route says so, its process tree for CPU time and memory."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: The request kinds: Open Inference Protocol JSON tensors, the binary tensor extension, a BYTES ``image`` input
#: of base64 encoded images (a decoding model), and cnnserve's own ``/classify`` (the encoded image as the body).
KINDS = ("json", "binary", "image", "classify")


@dataclass
class Peer:
    name: str  # the environment's name (pins.PEERS)
    label: str  # as the report names it
    script: str  # its server script in this folder
    kinds: tuple[str, ...]  # the request kinds it takes
    default: dict  # its documented settings
    default_from: str  # where the documented settings come from
    trials: list[dict] = field(default_factory=list)  # what its tuning tries, in order (each over ``default``)
    extra_ports: tuple[str, ...] = ()  # further free ports its script takes (``--grpc-port`` ...)
    notes: str = ""


def tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pid: int) -> dict[int, float]:
    out = {}
    for p in tree(pid):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except Exception:  # noqa: BLE001 - a process gone between the listing and the read
            pass
    return out


def tree_memory(pid: int) -> dict:
    """The tree's processes and their memory: RSS of each (MB), and the sum of their PSS (shared pages counted
    once across the tree), so that workers forked from one parent are not counted twice."""
    rss, pss = [], 0.0
    for p in tree(pid):
        try:
            m = p.memory_full_info()
            rss.append(round(m.rss / 2**20, 1))
            pss += getattr(m, "pss", m.rss) / 2**20
        except Exception:  # noqa: BLE001 - a process gone, or one we may not read
            pass
    return {"processes": len(rss), "rss_mb": sorted(rss, reverse=True), "pss_total_mb": round(pss, 1)}


class Running:
    """A server of the section: a peer's script in its environment, or cnnserve (``Running.cnnserve``)."""

    def __init__(self, label: str, proc: subprocess.Popen, url: str, model: str, log_path: Path | None = None,
                 stop=None):
        self.label, self.proc, self.url, self.model, self.log_path, self._stop = label, proc, url, model, log_path, stop
        self.infer = f"{url}/v2/models/{model}/infer"

    @classmethod
    def peer(cls, peer: Peer, python: Path, onnx: str, model: str, settings: dict, folder: Path,
             ready_timeout: float = 240) -> Running:
        from tests.support.server import free_port

        port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / f"{peer.name}-{port}.log"
        cmd = [str(python), str(HERE / peer.script), "--onnx", onnx, "--name", model, "--port", str(port),
               "--settings", json.dumps(settings)]
        for option in peer.extra_ports:
            cmd += [option, str(free_port())]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
        # the environment's own libpython first (PyTriton's backend stub links it; see pins.py)
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True).stdout.strip()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        run = cls(peer.label, proc, f"http://127.0.0.1:{port}", model, log_path)
        run._log = log
        run.wait(ready_timeout)
        return run

    @classmethod
    def cnnserve(cls, tag: str, settings: dict) -> Running:
        from ..tune_measure import start

        srv = start(tag, settings)
        return cls("cnnserve", srv.proc, srv.url, tag.split(":")[0], stop=srv.stop)

    def wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/{self.model}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:] if self.log_path else ""

    def stop(self) -> None:
        if self._stop:
            self._stop()
            return
        from tests.support.server import stop_group

        stop_group(self.proc, 30)
        self._log.close()
