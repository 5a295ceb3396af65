"""Every change cnnserve makes to another library's internals, in one place, each applied only where a
probe of the installed code shows the defect it fixes.

A patch is a ``Patch``: the library it touches, what it fixes, a **probe** (``probes.py``) that runs the
installed code (or reads its shape) and answers ``DEFECT`` or ``FIXED``, and an ``apply`` that installs the
fix and returns how to undo it. ``apply_patches(settings)`` is the one entry point; the service calls it
when its module loads, logs one line per patch and keeps the outcome for ``/models`` and ``/v2``:

- the defect is there and the code has the shape the fix was written for: **applied**;
- the probe finds the defect gone (fixed upstream): **not needed**, the library is left alone;
- the code has a shape the fix was not written for: **refused**, logged as an error, the library is
  left alone, and the patch's test fails with a message naming the patch, the library and its version
  (``check`` raises ``UnknownShape``), so an upgrade that changes a patched target cannot pass the suite.

The probes decide by behaviour or shape, never by a version string: each costs a few milliseconds.
Two more entries only **read** BentoML's internals (``Reading``): HTTP's address from click's context of
``bentoml serve`` (``serve_address``) and each worker's listening socket, ``--fd N`` (``worker_host``). Each is
probed on the live object before it is read; a shape it was not written for is refused, reported as the
patches are, and read as nothing (gRPC then listens on every interface, and its port is not checked first).

The patches:

``bentoml-timeout-timers``
    BentoML's ``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` for every request and never
    cancels it. Each timer holds its request's context (OpenTelemetry span, futures, closures) for the
    whole 60 s timeout: at 1,000 requests/s some 60,000 requests' objects stay alive, every full garbage
    collection walks them (measured on LeNet-5 at 64 clients: gen-2 collections grew from 87 to 180 ms
    within 8 s and p99 latency went to 5-10x p95). Probe: one request through the installed middleware on
    a private event loop; a timer still pending afterwards is the defect. The fix is the same
    ``__call__`` with the timer cancelled when the request ends (and a request whose app fails before
    answering is passed on at once, not held for the timer and answered 504), so it also requires the
    upstream function to be the one it mirrors (its syntax tree, docstrings and annotations aside).
``uvicorn-head-limits``
    uvicorn's httptools protocol sets no bound on a request head (a 96 MB header held a worker
    for 13.8 s) and none on a connection that never sends its head. Probe: a head larger than
    ``max_header_kb`` fed to the installed protocol over a stand-in transport; no refusal is the defect.
    The fix makes uvicorn's ``auto`` and ``httptools`` choices ``http_server.GuardedHttpTools``, which
    needs the protocol methods and attributes it overrides.
``bentoml-metric-labels``
    BentoML's request metrics (``RunnerTrafficMetricsMiddleware``, on unless ``bentoml_metrics=false``)
    label every series with the request's raw path: each new path a client makes up adds series that
    every worker keeps for good and /metrics serves (measured: 6,000 requests to ``/nope/<uuid>``, +128 MB
    in a worker, /metrics from 4 KB to 25.6 MB). Probe: two requests to made-up paths through the
    installed middleware, with a stand-in metrics client that records the labels; two different
    ``endpoint`` values are the defect. The fix keeps BentoML's metrics and gives their ``endpoint`` label
    the route's template or ``other`` (``metrics.ROUTES``), so it needs ``_setup`` to create metrics with
    an ``endpoint`` label on the middleware.
``uvicorn-sigterm-drain``
    uvicorn's ``Server.handle_exit`` stops at the first SIGTERM: a load balancer still sending gets
    refused connections. Probe: the installed ``handle_exit`` called with SIGTERM on a stand-in server;
    ``should_exit`` set at once is the defect. The fix drains first (``http_server.draining_handle_exit``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from importlib import metadata
from typing import Callable

from cnnserve import modules_with_two_names

from . import http_server
from .metrics import ROUTES, BoundedEndpoint
from .probes import (FIXED, UnknownShape, httptools_protocol, metrics_middleware, probe_head_limits,
                     probe_metric_labels, probe_serve_command, probe_sigterm_drain, probe_timeout_timers,
                     probe_worker_command, server_handle_exit, timeout_middleware)

log = logging.getLogger("cnnserve.service")

APPLIED, NOT_NEEDED, REFUSED = "applied", "not needed", "refused"


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Patch:
    name: str
    library: str  # the distribution whose internals it changes
    fixes: str  # one line
    probe: Callable[[], str]  # DEFECT or FIXED; raises UnknownShape
    apply: Callable[[object], Callable[[], None]]  # installs the fix for these settings, returns its undo

    def unknown(self, why: str) -> UnknownShape:
        return UnknownShape(f"patch {self.name!r}: {self.library} {version_of(self.library)} has an unknown shape "
                            f"({why}); read the installed code, then update or remove the patch in "
                            f"service/patches.py")

    def check(self) -> str:
        """The probe's answer; ``UnknownShape`` names this patch, the library and its version."""
        try:
            return self.probe()
        except UnknownShape as e:
            raise self.unknown(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a probe that cannot run is an unknown shape, said as such
            raise self.unknown(f"the probe failed: {type(e).__name__}: {e}") from None


# --- each patch's fix (its probe, and the lookup of its target, are in probes.py) ------------------------

def _apply_timeout(settings) -> Callable[[], None]:
    mw = timeout_middleware()
    original = mw.__call__
    mw.__call__ = http_server.timeout_call

    def undo() -> None:
        mw.__call__ = original
    return undo


def _apply_metric_labels(settings) -> Callable[[], None]:
    mw = metrics_middleware()
    original = mw._setup

    def _setup(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name, value in list(vars(self).items()):
            if "endpoint" in getattr(value, "_labelnames", ()):
                setattr(self, name, BoundedEndpoint(value, ROUTES.label))

    _setup.__cnnserve_patch__ = True
    mw._setup = _setup

    def undo() -> None:
        mw._setup = original
    return undo


def _apply_head_limits(settings) -> Callable[[], None]:
    uc, _ = httptools_protocol()
    guarded = http_server.GuardedHttpTools
    before = (guarded.max_head_bytes, guarded.head_timeout_s, dict(uc.HTTP_PROTOCOLS))
    guarded.max_head_bytes, guarded.head_timeout_s = settings.max_header_bytes, settings.header_timeout_s
    uc.HTTP_PROTOCOLS["auto"] = uc.HTTP_PROTOCOLS["httptools"] = f"{http_server.__name__}:GuardedHttpTools"

    def undo() -> None:
        guarded.max_head_bytes, guarded.head_timeout_s = before[0], before[1]
        uc.HTTP_PROTOCOLS.clear()
        uc.HTTP_PROTOCOLS.update(before[2])
    return undo


def _apply_drain(settings) -> Callable[[], None]:
    uvicorn, original = server_handle_exit()
    uvicorn.Server.handle_exit = http_server.draining_handle_exit(original, settings.drain_s, settings.grace_s)

    def undo() -> None:
        uvicorn.Server.handle_exit = original
    return undo


# --- readings: what cnnserve reads of BentoML's internals, changing nothing ---------------------------------

@dataclass(frozen=True)
class Reading:
    """A value read from another library's internals. ``probe(obj)`` raises ``UnknownShape`` where the installed
    code is not the shape the reading assumes; the reading then gives None (its caller does without it), says so
    once in the log and in the runtime report, and its test fails on the upgrade that changed it."""

    name: str
    library: str
    reads: str
    probe: Callable[[object], None]

    def usable(self, obj) -> bool:
        if self.name not in APPLIED_PATCHES:
            try:
                self.probe(obj)
                APPLIED_PATCHES[self.name] = f"reads {self.library} {version_of(self.library)}"
            except Exception as e:  # noqa: BLE001 - an unknown shape, said as such
                APPLIED_PATCHES[self.name] = f"{REFUSED}: {self.library} {version_of(self.library)} has an unknown " \
                                             f"shape ({e}); read the installed code, then update service/patches.py"
                log.error("reading %s: %s", self.name, APPLIED_PATCHES[self.name])
        return not APPLIED_PATCHES[self.name].startswith(REFUSED)


SERVE_ADDRESS = Reading("bentoml-serve-address", "bentoml", "HTTP's host and port from click's context of `bentoml "
                        "serve`, to check gRPC's port beside it in the first process", probe_serve_command)
WORKER_SOCKET = Reading("bentoml-worker-fd", "bentoml", "the listening socket each worker gets as --fd N, for gRPC "
                        "to listen on HTTP's address", probe_worker_command)


def serve_address() -> tuple[str, int] | None:
    """HTTP's host and port in the first process of ``bentoml serve`` (the module is imported inside its
    command); None elsewhere (``bentoml build``, a worker, a script) or where the command is not as read."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.info_name != "serve" or not SERVE_ADDRESS.usable(ctx.command):
        return None
    return ctx.params.get("host") or "0.0.0.0", int(ctx.params.get("port") or 0)


def worker_host() -> str | None:
    """The address of the socket BentoML handed this worker (``--fd N``), or None."""
    import socket
    import sys

    args = sys.argv
    if "--fd" not in args:
        return None
    from _bentoml_impl.worker.service import main

    if not WORKER_SOCKET.usable(main):
        return None
    try:
        with socket.socket(fileno=os.dup(int(args[args.index("--fd") + 1]))) as sock:
            return sock.getsockname()[0]
    except (ValueError, IndexError, OSError):
        return None


PATCHES: tuple[Patch, ...] = (
    Patch("bentoml-timeout-timers", "bentoml", "TimeoutMiddleware's per-request timers kept every request alive "
          "for 60 s (full GC 80-180 ms, p99 over 300 ms)", probe_timeout_timers, _apply_timeout),
    Patch("bentoml-metric-labels", "bentoml", "request metrics labelled by raw path grew a series per path a "
          "client made up (21.8 KB of worker memory each)", probe_metric_labels, _apply_metric_labels),
    Patch("uvicorn-head-limits", "uvicorn", "httptools' request heads had no size or time bound",
          probe_head_limits, _apply_head_limits),
    Patch("uvicorn-sigterm-drain", "uvicorn", "SIGTERM stopped at once instead of draining",
          probe_sigterm_drain, _apply_drain),
)

#: name -> outcome in this process, for /models, /v2 and the start-up log.
APPLIED_PATCHES: dict[str, str] = {}
_UNDO: dict[str, Callable[[], None]] = {}


def apply_patches(settings) -> dict[str, str]:
    """Probe every patch and apply those whose defect is there; one log line each. Idempotent."""
    for patch in PATCHES:
        if patch.name in APPLIED_PATCHES:
            continue
        lib = f"{patch.library} {version_of(patch.library)}"
        try:
            found = patch.check()
        except UnknownShape as e:
            APPLIED_PATCHES[patch.name] = f"{REFUSED}: {e}"
            log.error("%s; left as it is", e)
            continue
        if found == FIXED:
            APPLIED_PATCHES[patch.name] = f"{NOT_NEEDED}: fixed in {lib}"
            log.info("patch %s: not needed, %s does not have the defect", patch.name, lib)
            continue
        _UNDO[patch.name] = patch.apply(settings)
        APPLIED_PATCHES[patch.name] = f"{APPLIED} to {lib}"
        log.info("patch %s applied to %s: %s", patch.name, lib, patch.fixes)
    return dict(APPLIED_PATCHES)


def revert_patches() -> None:
    """Undo what ``apply_patches`` did in this process (tests)."""
    for name, undo in list(_UNDO.items()):
        undo()
        del _UNDO[name]
    APPLIED_PATCHES.clear()


def running_versions() -> dict[str, str]:
    """The versions of the libraries the service runs on, as installed."""
    return {name: version_of(name) for name in ("bentoml", "onnxruntime", "onnxruntime-gpu", "uvicorn", "numpy",
                                                "pillow", "fastapi", "starlette")
            if version_of(name) != "not installed"}


def runtime_info() -> dict:
    """What runs: library versions and each patch's outcome (``/models``, ``/v2``). ``bare_service_importable``:
    whether this process could import the service's folder under a second name, ``service`` (the repository
    root on its path) beside ``cnnserve.service``; looked up, never imported."""
    import importlib.util

    return {"versions": running_versions(), "patches": dict(APPLIED_PATCHES),
            "modules_with_two_names": modules_with_two_names(),
            "bare_service_importable": importlib.util.find_spec("service") is not None}
