"""What a server settles before its workers start, and how a worker that cannot start stops the server.

BentoML imports the service module in the server's first process (the one ``bentoml serve`` or a
container starts) before it starts any worker, then in every worker; and it starts a worker again
whenever one exits, forever (seen: 54 tracebacks in 90 s for a model whose warm-up could never
allocate; a forced precision the model lacks, 820 log lines a minute). So:

- **Refuse in the first process.** ``preflight`` checks what every worker would meet: each model
  (``cnnserve.core.servable.trial``, in a process of its own under ``load_timeout_s`` and ``load_memory_mb``:
  loadable, metadata that describes the graph, an input an image can be decoded into, finite outputs at the
  largest batch) and a forced precision's variant. The settings' own types are
  checked by BentoML when it parses them (``Settings``). A refusal is raised as a BentoML exception
  while the module loads: ``bentoml serve`` prints one line, ``Error: [serve] `serve` failed: ...``,
  and exits 1 within seconds (so does ``bentoml build``).
- **A failure nobody foresaw stops the server too** (a warm-up out of memory, CUDA required where it
  does not load): the worker logs its reason once, leaves it in the server's folder and asks the first
  process to stop (SIGTERM); the first process prints the reason and exits 1 (``at_exit``), instead of
  BentoML restarting the worker for ever.
- **gRPC's port is checked in the first process** (``check_grpc_port``, HTTP's beside it): every worker binds it with
  SO_REUSEPORT so that they share it, and Linux lets any process of the same user join that group, so a
  second server on a host with the same ``grpc_port`` silently took half the first one's gRPC connections,
  and one running as another user (a container) stopped the other's workers from binding at all.
- **The server's own folder**, ``$BENTOML_HOME/cnnserve-servers/PID``, removed at exit (and, for a
  server that was killed, by the next one to start): the reason above, and the server's Prometheus
  files. BentoML keeps every server's in ``$BENTOML_HOME/prometheus_multiproc_dir`` and a starting
  server empties it, so two servers sharing a BENTOML_HOME deleted each other's.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cnnserve.service")

#: Set by a server's first process for its workers, which are its children.
FOLDER_ENV, OWNER_ENV = "CNNSERVE_SERVER_DIR", "CNNSERVE_SERVER_PID"


@dataclass(frozen=True)
class ServerRun:
    """This process's place in its server: the server's folder, and whether this is its first process."""

    folder: Path
    first: bool

    @property
    def prometheus(self) -> Path:
        return self.folder / "prometheus"

    @property
    def reason(self) -> Path:
        """Where a worker that cannot start leaves its reason for the first process."""
        return self.folder / "cannot-start"


def begin(home: str | os.PathLike | None = None) -> ServerRun:
    """Join this process's server: in a worker (a child of the process that made the folder), its
    folder; otherwise make one (this process is a server's first, or a build's). Either way, point
    Prometheus at the server's own folder before anything creates a metric."""
    inherited = os.environ.get(FOLDER_ENV)
    if inherited and os.environ.get(OWNER_ENV) == str(os.getppid()):
        run = ServerRun(Path(inherited), first=False)
    else:
        base = Path(home or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "cnnserve-servers"
        base.mkdir(parents=True, exist_ok=True)
        for old in base.iterdir():  # left by servers that were killed
            if old.name.isdigit() and not _alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
        run = ServerRun(base / str(os.getpid()), first=True)
        shutil.rmtree(run.folder, ignore_errors=True)
        run.prometheus.mkdir(parents=True)
        os.environ[FOLDER_ENV], os.environ[OWNER_ENV] = str(run.folder), str(os.getpid())
        atexit.register(at_exit, run, os.getpid())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run.prometheus)
    return run


def at_exit(run: ServerRun, pid: int) -> None:
    """In the first process, at its exit: remove the server's folder, and if a worker could not start,
    print its reason and exit 1 (BentoML's own exit status would be 0 after the stop it asked for)."""
    if os.getpid() != pid:
        return
    try:
        reason = run.reason.read_text(errors="replace").strip()
    except OSError:
        reason = ""
    shutil.rmtree(run.folder, ignore_errors=True)
    if reason:
        sys.stderr.write(f"Error: cnnserve cannot start: {reason}\n")
        sys.stderr.flush()
        os._exit(1)


def cannot_start(run: ServerRun, reason: str) -> None:
    """In a worker whose start failed: say why once, have the whole server stop with that reason, and
    exit (never returns)."""
    log.error("cannot start: %s; stopping the server", reason)
    try:
        with open(run.reason, "x") as f:  # the first worker's reason is the one told
            f.write(reason)
    except OSError:
        pass
    try:
        os.kill(int(os.environ[OWNER_ENV]), signal.SIGTERM)
    except (KeyError, ValueError, OSError):
        pass
    logging.shutdown()
    os._exit(3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_grpc_port(port: int) -> str | None:
    """Why the server cannot have its ports on HTTP's address, asked in the first process of ``bentoml serve``
    before any worker starts; None when they are free (or when this is not a server's start). HTTP's port is
    asked too, though BentoML binds it: taken, BentoML fails only after the workers are set up, with a
    50-line traceback, and a message naming gRPC's port alone would send the user to the wrong one."""
    from .patches import serve_address

    address = serve_address()
    if address is None:
        return None
    host, http_port = address
    if not http_port:  # no --port: BentoML's configured one (3000 unless its configuration says otherwise)
        from bentoml._internal.configuration.containers import BentoMLContainer

        http_port = int(BentoMLContainer.http.port.get())
    if port and port == http_port:
        return f"grpc_port {port} is HTTP's port too: give gRPC another (--arg grpc_port=PORT, 0 for none)"
    return taken_ports(host, {"HTTP": http_port, "gRPC": port})


def taken_ports(host: str, ports: dict[str, int]) -> str | None:
    """One line naming each of ``ports`` (protocol: port; 0 for none) that cannot be bound on ``host``, and
    what to pass instead; None when every one is free. ``cnnserve up`` asks before it says it serves."""
    import socket

    host = host.strip("[]")
    taken, why = [], ""
    for name, port in ports.items():
        if not port:
            continue
        # SO_REUSEADDR: a port whose last connections wait out TIME_WAIT is free; no SO_REUSEPORT, so that a
        # socket any process listens on (another server's gRPC workers included) makes the bind fail
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                taken.append(name)
                why = e.strerror
    if not taken:
        return None
    fixes = {"HTTP": "--port PORT", "gRPC": "--arg grpc_port=PORT, `cnnserve up --grpc-port PORT`, or 0 for no gRPC"}
    return (" and ".join(f"{name}'s port {ports[name]}" for name in taken) + f" on {host} "
            + ("is" if len(taken) == 1 else "are") + f" taken ({why}; another server?): give this one "
            + ("another" if len(taken) == 1 else "others") + " (" + "; ".join(fixes[n] for n in taken) + ")")


def preflight(path: str, settings) -> None:
    """What every worker would meet when it loads the model at ``path`` with ``settings``, checked now:
    ``ModelLoadError`` naming the model and the problem."""
    from cnnserve.core.servable import NotServable, check_model, trial

    from cnnserve.core.runtime import ModelLoadError, choose_precision

    try:  # in a process of its own, as a runtime load is: a model that never warms up stops this one in time
        trial(path, settings.limits, settings.max_batch_size, settings.precision, settings.load_timeout_s,
              settings.load_memory_mb)
        if settings.precision != "auto":  # the forced variant: there, from the same weights, and servable
            _, choice = choose_precision(path, settings.precision, "cpu", threads=1)
            if choice["file"] != str(path):
                check_model(choice["file"], settings.limits)
    except NotServable as e:
        raise ModelLoadError(str(e)) from None
    # Not checked here: CUDA where it is required. A build machine may have no GPU, and this process would
    # keep a CUDA context for nothing; a worker that cannot have it stops the server (``cannot_start``).


def tls_files(settings) -> tuple[str, str] | str | None:
    """The certificate and key files HTTP and gRPC serve TLS with (``tls_certfile``, ``tls_keyfile``), None without
    TLS, or why they cannot be used (one line, for the server's start to stop on)."""
    cert, key = settings.tls_certfile, settings.tls_keyfile
    if not cert and not key:
        return None
    if not (cert and key):
        return "TLS needs both --arg tls_certfile=PEM and --arg tls_keyfile=PEM"
    for what, path in (("tls_certfile", cert), ("tls_keyfile", key)):
        try:
            with open(path, "rb") as f:
                if b"-----BEGIN" not in f.read(1 << 20):
                    return f"{what} {path}: not a PEM file"
        except OSError as e:
            return f"{what} {path}: cannot read it ({e.strerror})"
    return os.path.abspath(cert), os.path.abspath(key)

