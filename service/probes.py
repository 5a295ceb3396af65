"""The probes of ``patches.py``: for each patch, its target found in the installed library with the shape the
fix needs (``UnknownShape`` where it is not), and whether the defect is there (``DEFECT`` or ``FIXED``); for
each reading, the shape it reads. The verdicts come from small harnesses that run the library's installed code
on stand-ins (a private event loop in its own thread, a stand-in transport, a stand-in metrics client) and
report what it did, so a patch is applied only where the defect it fixes is seen. Nothing here changes a
library.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import signal
import textwrap
import threading

from . import http_server

DEFECT, FIXED = "defect", "fixed"


def tree_digest(func) -> str:
    """A digest of a function's syntax tree without its docstring and annotations: the same for the same
    code whatever its formatting, different when a statement changes."""
    node = ast.parse(textwrap.dedent(inspect.getsource(func))).body[0]
    if ast.get_docstring(node) is not None:
        node.body = node.body[1:]
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            sub.annotation = None
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sub.returns = None
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:16]


class UnknownShape(RuntimeError):
    """The patched library's code is not the shape the fix was written for."""


# --- bentoml-timeout-timers ---------------------------------------------------------------------------

def timeout_middleware():
    """BentoML's ``TimeoutMiddleware``, which the fix replaces the ``__call__`` of."""
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError as e:
        raise UnknownShape(f"no bentoml._internal.server.http.traffic.TimeoutMiddleware: {e}") from None
    return TimeoutMiddleware


#: ``TimeoutMiddleware.__call__`` as ``http_server.timeout_call`` mirrors it (read in BentoML 1.4.39 and 1.4.40).
TIMEOUT_CALL_DIGESTS = frozenset({"e9ff39e0c293ffe8"})


def probe_timeout_timers() -> str:
    mw = timeout_middleware()
    if mw.__call__ is http_server.timeout_call:
        raise UnknownShape("already patched in this process")  # check() before apply, or probe the original
    return _probe_timeout_class(mw)


def _probe_timeout_class(mw) -> str:
    if live_timers_after_one_request(mw) == 0:
        return FIXED
    if not callable(getattr(mw, "_set_timer_out", None)):
        raise UnknownShape("TimeoutMiddleware has no _set_timer_out, which the fix calls")
    digest = tree_digest(mw.__call__)
    if digest not in TIMEOUT_CALL_DIGESTS:
        raise UnknownShape(f"TimeoutMiddleware.__call__ is not the one the fix mirrors (digest {digest})")
    return DEFECT


# --- bentoml-metric-labels ----------------------------------------------------------------------------

def metrics_middleware():
    """BentoML's ``RunnerTrafficMetricsMiddleware``, whose ``_setup`` the fix wraps."""
    try:
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
    except ImportError as e:
        raise UnknownShape(f"no bentoml._internal.server.http.instruments.RunnerTrafficMetricsMiddleware: {e}") from None
    if not callable(getattr(RunnerTrafficMetricsMiddleware, "_setup", None)):
        raise UnknownShape("RunnerTrafficMetricsMiddleware has no _setup, which the fix wraps")
    return RunnerTrafficMetricsMiddleware


def probe_metric_labels() -> str:
    mw = metrics_middleware()
    if getattr(mw._setup, "__cnnserve_patch__", False):
        raise UnknownShape("already patched in this process")
    found = endpoint_labels(mw, ["/cnnserve-probe/a", "/cnnserve-probe/b"])
    return DEFECT if len(found & {"/cnnserve-probe/a", "/cnnserve-probe/b"}) == 2 else FIXED


# --- uvicorn-head-limits ------------------------------------------------------------------------------

#: What ``GuardedHttpTools`` overrides or uses of uvicorn's protocol.
HEAD_LIMIT_NEEDS = ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete",
                    "data_received")


def httptools_protocol():
    """uvicorn's configuration module and its httptools protocol, which ``GuardedHttpTools`` extends."""
    try:
        import uvicorn.config as uc
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as e:
        raise UnknownShape(f"uvicorn's httptools protocol cannot be imported: {e}") from None
    missing = [n for n in HEAD_LIMIT_NEEDS if not callable(getattr(HttpToolsProtocol, n, None))]
    if missing or not {"auto", "httptools"} <= set(getattr(uc, "HTTP_PROTOCOLS", {})):
        raise UnknownShape(f"HttpToolsProtocol lacks {missing} or uvicorn.config.HTTP_PROTOCOLS has no "
                           f"'auto' and 'httptools' entries")
    return uc, HttpToolsProtocol


def probe_head_limits() -> str:
    _, protocol = httptools_protocol()
    return FIXED if head_refused(protocol, 1024 * 1024) else DEFECT


# --- uvicorn-sigterm-drain ----------------------------------------------------------------------------

def server_handle_exit():
    """uvicorn and its ``Server.handle_exit``, which the fix wraps."""
    try:
        import uvicorn
    except ImportError as e:
        raise UnknownShape(f"uvicorn cannot be imported: {e}") from None
    handle_exit = getattr(uvicorn.Server, "handle_exit", None)
    if handle_exit is None or list(inspect.signature(handle_exit).parameters) != ["self", "sig", "frame"]:
        raise UnknownShape("uvicorn.Server.handle_exit(self, sig, frame) is not there")
    return uvicorn, handle_exit


def probe_sigterm_drain() -> str:
    _, handle_exit = server_handle_exit()
    if getattr(handle_exit, http_server.DRAIN_MARK, False):
        raise UnknownShape("already patched in this process")
    if stops_at_once(handle_exit):
        return DEFECT
    raise UnknownShape("Server.handle_exit(SIGTERM) no longer sets should_exit: its shutdown changed")


# --- the readings (patches.Reading): the shape each reads of BentoML --------------------------------------

def probe_serve_command(command) -> None:
    names = {getattr(p, "name", None) for p in getattr(command, "params", ())}
    if not {"host", "port"} <= names:
        raise UnknownShape(f"the serve command has no host and port parameters (it has {sorted(map(str, names))})")


def probe_worker_command(command) -> None:
    if not any("--fd" in getattr(p, "opts", ()) for p in getattr(command, "params", ())):
        raise UnknownShape("BentoML's worker command has no --fd option")


# --- the harnesses -------------------------------------------------------------------------------------------

def answering(status: int):
    """A stand-in ASGI app that answers ``status`` with an empty body."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return app


async def _sent(message) -> None:
    return None


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def live_timers_after_one_request(middleware_class) -> int:
    """Timers a middleware leaves pending after one fast request, on a private event loop in its own
    thread (the caller's loop, if any, is not touched)."""
    pending: list[asyncio.TimerHandle] = []

    class Loop(asyncio.SelectorEventLoop):
        def call_at(self, when, callback, *args, context=None):
            handle = super().call_at(when, callback, *args, context=context)
            pending.append(handle)
            return handle

    in_private_loop(lambda: middleware_class(answering(200), timeout=60)(
        {"type": "http", "path": "/", "method": "GET", "headers": []}, _receive, _sent), Loop)
    return sum(1 for h in pending if not h.cancelled() and h.when() > 1)


def in_private_loop(coroutine, loop_class=asyncio.SelectorEventLoop) -> None:
    """Run ``coroutine()`` to its end on a new event loop in a thread of its own (a probe must not touch
    the caller's loop, if there is one); its exception is raised here."""
    def run() -> None:
        loop = loop_class()
        try:
            loop.run_until_complete(coroutine())
        finally:
            loop.close()

    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: catch(run, errors), name="cnnserve-patch-probe")
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]


def catch(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        errors.append(e)


def endpoint_labels(middleware_class, paths: list[str]) -> set[str]:
    """The ``endpoint`` label values a metrics middleware gives requests to ``paths``, with a stand-in
    metrics client that records labels (nothing reaches Prometheus), on a private event loop in its own
    thread. Raises ``UnknownShape`` when the middleware creates no metric labelled ``endpoint``."""
    import contextlib

    seen: set[str] = set()

    class Metric:
        def __init__(self, **kwargs) -> None:
            self._labelnames = tuple(kwargs.get("labelnames", ()))

        def labels(self, *args, **kwargs):
            if "endpoint" in kwargs:
                seen.add(kwargs["endpoint"])
            return self

        def inc(self, *args, **kwargs) -> None:
            return None

        observe = set = dec = set_to_current_time = inc

        def track_inprogress(self):
            return contextlib.nullcontext()

    class Client:
        def Histogram(self, **kwargs):  # noqa: N802 - BentoML's PrometheusClient names
            return Metric(**kwargs)

        Counter = Gauge = Summary = Histogram

    async def requests() -> None:
        mw = middleware_class(answering(404), namespace="cnnserve_probe")
        mw._setup(metrics_client=Client(), duration_buckets=(1.0,))
        if not any("endpoint" in getattr(v, "_labelnames", ()) for v in vars(mw).values()):
            raise UnknownShape("its _setup creates no metric labelled 'endpoint'")
        for path in paths:
            await mw({"type": "http", "path": path, "method": "GET", "headers": []}, _receive, _sent)

    in_private_loop(requests)
    return seen


def head_refused(protocol_class, head_bytes: int) -> bool:
    """Feed a head of ``head_bytes`` to a protocol over a stand-in transport: whether it refused it (wrote
    an answer or closed the connection) before the head ended."""
    import uvicorn

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.written, self.closing = b"", False

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

        def write(self, data) -> None:
            self.written += bytes(data)

        def is_closing(self) -> bool:
            return self.closing

        def close(self) -> None:
            self.closing = True

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            self.closing = True

        def pause_reading(self) -> None:
            return None

        def resume_reading(self) -> None:
            return None

    async def app(scope, receive, send):  # never reached: the head does not end
        return None

    async def feed() -> bool:
        from uvicorn.server import ServerState

        config = uvicorn.Config(app=app, http=protocol_class, log_config=None, lifespan="off")
        config.load()
        proto = protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        proto.connection_made(transport)
        try:
            proto.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n")
            line, sent = b"X-Pad: " + b"a" * 8000 + b"\r\n", 0
            while sent < head_bytes and not (transport.written or transport.closing):
                proto.data_received(line)
                sent += len(line)
            return bool(transport.written or transport.closing)
        finally:
            proto.connection_lost(None)

    return asyncio.run(feed())


def stops_at_once(handle_exit) -> bool:
    """Whether ``handle_exit`` asks uvicorn to stop at the first SIGTERM (no drain)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app=lambda *a: None, log_config=None))
    handle_exit(server, signal.SIGTERM, None)
    return bool(server.should_exit)
