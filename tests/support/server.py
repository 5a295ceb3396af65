"""A real `bentoml serve` of the project's service on a free loopback port (the tests, and the benchmark
harness in bench/)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from cnnserve.core.store import bentoml_command

ROOT = Path(__file__).resolve().parents[2]  # the repository root: each server runs from it, as a user's would


def free_port(then_free: int = 0) -> int:
    """A loopback port free now (and its next ``then_free`` too), drawn at random below the kernel's ephemeral
    range and handed out once (``_reserve``): a server binds it seconds later, and meanwhile the suite's
    outgoing connections and port-0 binds take ephemeral ports (in CI one took a port handed out this way
    before its server bound it)."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low - 1 - then_free)
        socks = [socket.socket() for _ in range(then_free + 1)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", port + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        if all(_reserve(port + i) for i in range(then_free + 1)):
            return port
    raise RuntimeError(f"no {then_free + 1} free ports in a row below the ephemeral range ({low})")


#: Ports handed out lately, one file each, shared by every process of the machine (pytest's workers, the harness)
RESERVED = Path(tempfile.gettempdir()) / "cnnserve-test-ports"
HOLD_S = 900


def _reserve(port: int) -> bool:
    """Whether ``port`` was not handed out in the last HOLD_S seconds by any process, marking it handed out now.
    A free port is not enough: BentoML's HTTP socket and every gRPC worker bind with SO_REUSEPORT, so a port
    drawn for one server's gRPC and, before it bound, for another's HTTP was bound by both, and the second
    server's readiness probe got HTTP/2 frames from the first one's gRPC (seen in CI)."""
    import time

    RESERVED.mkdir(exist_ok=True)
    mark = RESERVED / str(port)
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        pass
    try:
        if time.time() - mark.stat().st_mtime < HOLD_S:
            return False
        os.utime(mark)
        return True
    except FileNotFoundError:
        return _reserve(port)


class Server:
    """A real `bentoml serve` of the project's service (or ``service``) on a free loopback port."""

    def __init__(self, *args: str, ready_timeout: float = 90, service: str = "cnnserve.service.service:CnnServe",
                 memory_limit_mb: int | None = None, port: int | None = None, home: str | None = None):
        """``memory_limit_mb`` caps the address space of every process of the server (``RLIMIT_AS``),
        so a test feeding it hostile input fails instead of exhausting the machine. ``port``: a given one
        (a replica restarted where it was), else a free one. ``home``: the BENTOML_HOME to use (default:
        one of its own, sharing the current model store)."""
        self.kwargs = {"ready_timeout": ready_timeout, "service": service,
                       "memory_limit_mb": memory_limit_mb, "home": home}
        self.port = port or free_port()
        # a server given a certificate (tls_certfile) answers HTTPS only
        self.tls = any(str(a).startswith("tls_certfile=") for a in args)
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        # gRPC on a free port of its own too, unless the arguments name one (grpc_port=0: none): never the
        # default 3001, which servers of parallel tests would all bind (SO_REUSEPORT)
        named = [a.split("=", 1)[1] for a in args if a.startswith("grpc_port=")]
        if not named and service.startswith("cnnserve.service"):
            args = (*args, "--arg", f"grpc_port={free_port()}")
        self.grpc_port = int(([a.split("=", 1)[1] for a in args if a.startswith("grpc_port=")] or ["0"])[-1])
        self.grpc_target = f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None
        self.home = home or home_of_its_own()
        self.args = args
        # bentoml serve puts its working directory on sys.path: cnnserve's is an empty folder, as `cnnserve up`'s,
        # so that nothing in the served process can import the repository's folders under bare names (service)
        workdir = ()
        if service.startswith("cnnserve."):
            (Path(self.home) / "workdir").mkdir(exist_ok=True)
            workdir = ("--working-dir", str(Path(self.home) / "workdir"))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bentoml-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [bentoml_command(), "serve", service, *workdir, "--host", "127.0.0.1", "--port", str(self.port),
             *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "BENTOML_HOME": self.home},
            preexec_fn=(lambda: cap_memory(memory_limit_mb)) if memory_limit_mb else None)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import ssl
        import time
        import urllib.request

        # readiness only: the test itself checks the certificate
        context = ssl._create_unverified_context() if self.tls else None  # noqa: S323
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2, context=context) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def stop(self) -> None:
        stop_group(self.proc, 20)


def home_of_its_own() -> str:
    """A BENTOML_HOME for one server that shares the current model store (a link) but not the rest
    (BentoML keeps its Prometheus multiprocess files under BENTOML_HOME and a starting server wipes
    them; the service points PROMETHEUS_MULTIPROC_DIR at a folder of its own, but the harness also serves
    peers that do not)."""
    shared = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    (shared / "models").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    (home / "models").symlink_to(shared / "models", target_is_directory=True)
    return str(home)


def cap_memory(megabytes: int) -> None:
    """Cap this process's address space (inherited by its children)."""
    import resource

    limit = megabytes * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group a server was started in; SIGKILL after ``timeout`` seconds."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
