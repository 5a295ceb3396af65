"""What cnnserve adds to the HTTP server that BentoML runs (uvicorn with httptools).

- **A bound on request heads.** httptools sets no limit on the size of a request's head:
  a 96 MB header was measured holding a worker for 13.8 s (the parser joins each header's
  pieces anew per read, so the cost grows with the square of its size) and a 256 MB one
  for 131 s, while every other client of that worker waited. ``GuardedHttpTools`` answers
  431 once a head passes ``max_head_bytes``, and 408 when a head is still incomplete
  after ``head_timeout_s`` (counted from the connection's start for its first request, so a
  connection that never sends a byte is closed too), then closes the connection. uvicorn's h11 parser has its own
  limit (16 KiB) and is left alone.
- **A graceful drain on SIGTERM.** ``draining_handle_exit`` makes the first SIGTERM start a drain
  instead of an immediate stop: ``/readyz`` answers 503 at once (load balancers stop
  sending), every answer carries ``Connection: close`` (kept-alive clients reconnect
  elsewhere instead of sending into a closing socket), and after ``drain_s`` seconds
  uvicorn's own shutdown runs: it stops accepting and waits up to ``grace_s`` seconds for
  the requests in flight. A second SIGTERM or a SIGINT stops at once.

``patches.py`` installs both where its probes find uvicorn without them, and says so in the log.

The server's ASGI middlewares, which ``service.py`` adds with BentoML's documented
``Service.add_asgi_middleware`` (no change to BentoML): ``ConnectionCloseWhileDraining`` (the drain's
``Connection: close``), ``FastPaths`` (the API's fast routes reached past BentoML's router), ``JSONRefusals``
(BentoML's plain-text 404 and 405 as the service's JSON errors), and
``OpenAPIInfo``, which makes the OpenAPI document (``/docs.json``, and the browsable page at ``/``) describe
cnnserve. BentoML writes the document's ``info`` itself: outside a bento the version is the string "None" and
the description is BentoML's own read-me boilerplate (badges, Slack and Twitter links), with BentoML's team as
the contact. ``OpenAPIInfo`` replaces that block with cnnserve's title, version and description; the paths
are BentoML's and FastAPI's as generated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading

log = logging.getLogger("cnnserve.service")


class _DrainState:
    """``active`` from the first SIGTERM: not ready, answers close their connections; ``listeners`` are called
    then (in the signal handler's thread: the gRPC server hands itself the news through its event loop)."""

    active = False

    def __init__(self) -> None:
        self.listeners: list = []

    def begin(self) -> None:
        self.active = True
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the drain
                log.exception("drain listener failed")


DRAIN = _DrainState()

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn runs h11, which bounds heads itself
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class GuardedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol with a size limit and a time limit on each request head."""

        max_head_bytes = 64 * 1024
        head_timeout_s = 10.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # the first head's clock starts with the connection: one that never sends a byte is closed too
            self._head_bytes, self._head_done = 0, False
            self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._head_expired)

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes, self._head_done = 0, False

        def on_headers_complete(self) -> None:
            self._head_done = True
            self._cancel_head_timer()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._head_bytes < 0:  # refused: discard what the client still sends
                return
            super().data_received(data)
            if self._head_done or self._head_bytes < 0 or self.transport.is_closing():  # answered, or refused
                return
            self._head_bytes += len(data)  # the head is still incomplete after this read
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request head passed {self.max_head_bytes:,} bytes (max_header_kb)")
            elif self._head_timer is None:  # only slow heads pay for a timer
                self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self._head_done and not self.transport.is_closing():
                self._refuse(408, "Request Timeout",
                             f"the request head was not complete after {self.head_timeout_s:g} s")

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def send_400_response(self, msg: str) -> None:
            """What is not HTTP (a control character in a header, a broken request line): uvicorn answers it with
            a plain-text 400 and no id; here it gets the service's JSON error, with one."""
            self._refuse(400, "Bad Request", f"not a valid HTTP request: {msg}", "bad_http")

        def _refuse(self, status: int, reason: str, message: str, code: str = "") -> None:
            self._cancel_head_timer()
            from .telemetry import new_id

            rid = new_id()  # the head was not read: an id of the server's own, for the answer and the log
            body = json.dumps({"error": message, "code": code or (
                "header_too_large" if status == 431 else "header_timeout"), "request_id": rid}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"x-request-id: %s\r\nconnection: close\r\n\r\n"
                                 % (status, reason.encode(), len(body), rid.encode()) + body)
            # A lingering close: closing with unread bytes in the socket would send a reset that can
            # destroy the answer before the client reads it. End our side, discard what still comes
            # in, and close a moment later.
            self._head_bytes = -1
            if self.transport.can_write_eof():
                self.transport.write_eof()
                asyncio.get_running_loop().call_later(2.0, self.transport.close)
            else:  # pragma: no cover
                self.transport.close()
            log.info("refused a request head from %s: %s (request %s)", self.client, message, rid)
else:  # pragma: no cover
    GuardedHttpTools = None


DRAIN_MARK = "__cnnserve_drain__"


def draining_handle_exit(original, drain_s: float, grace_s: float):
    """uvicorn's ``Server.handle_exit`` made to drain: on the first SIGTERM ``DRAIN.active`` (readiness
    reads it) and answers with ``Connection: close`` for ``drain_s`` seconds, then ``original`` (uvicorn's
    graceful shutdown, bounded by ``grace_s``). A second SIGTERM or a SIGINT stops at once. Installed by
    ``patches.apply_patches`` where the probe finds uvicorn stopping at once."""

    def handle_exit(self, sig, frame) -> None:
        self.config.timeout_graceful_shutdown = grace_s
        if sig != signal.SIGTERM or DRAIN.active or self.should_exit or drain_s <= 0:
            return original(self, sig, frame)
        DRAIN.begin()
        log.info("SIGTERM: draining for %g s (readyz 503, Connection: close), then stopping within %g s",
                 drain_s, grace_s)
        timer = threading.Timer(drain_s, original, (self, sig, None))
        timer.daemon = True
        timer.start()

    setattr(handle_exit, DRAIN_MARK, True)
    handle_exit.__wrapped__ = original
    return handle_exit


class ConnectionCloseWhileDraining:
    """ASGI middleware: during a drain, every answer carries ``Connection: close``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if not DRAIN.active or scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_closing(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            await send(message)

        return await self.app(scope, receive, send_closing)


class FastPaths:
    """ASGI middleware: a request that the API answers on its fast path (``CnnServeAPI.fast_handler``: /classify,
    v2 infer) goes to it straight, past BentoML's request context, Starlette's exception middleware, the router
    and the mount's matching (which tries the API's every route): a tenth of a v2 request's CPU in the peers
    profile. The fast path answers every error itself, as JSON; everything else goes the usual way."""

    def __init__(self, app, api) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send) -> None:
        handler = self.api.fast_handler(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is not None:
            return await self.api(scope, receive, send, handler)
        return await self.app(scope, receive, send)


class JSONRefusals:
    """ASGI middleware: a 404 or 405 that is not JSON (BentoML's own router answers a path that no route has,
    or a method its routes do not take, with Starlette's plain text "Not Found") becomes the service's JSON
    error, ``{"error", "code"}`` with ``not_found`` or ``method_not_allowed``, its Allow header kept: clients
    such as tritonclient read the error from JSON and failed to parse the text. Other answers pass as they
    come, after one look at their status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def shaped(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] in (404, 405) and not dict(message.get("headers", ())).get(
                        b"content-type", b"").startswith(b"application/json"):
                    held.update(message)  # replaced: its body is dropped as it comes
                    return
            elif held and message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                return await self._refuse(scope, held, send)
            await send(message)

        await self.app(scope, receive, shaped)

    @staticmethod
    async def _refuse(scope, start: dict, send) -> None:
        from .errors import routing_error
        from .telemetry import current

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", ())}
        e = routing_error(scope.get("method", "GET"), scope.get("path", ""), start["status"],
                          headers={"Allow": headers["allow"]} if "allow" in headers else None)
        record = current()  # the request's telemetry (RequestTelemetry, outside this middleware)
        if record is not None:
            record.code = e.code
        body = json.dumps(e.body(record.id if record is not None else None)).encode()
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
        out += [(k, v) for k, v in start.get("headers", ())  # the others (connection: close in a drain)
                if k.lower() not in (b"content-type", b"content-length", b"allow")]
        await send({"type": "http.response.start", "status": e.status, "headers": out})
        await send({"type": "http.response.body", "body": body})


OPENAPI_DESCRIPTION = """CNN image classification on onnxruntime: exported ONNX models that carry their own \
preprocessing spec and labels, served by BentoML.

- `POST /classify`: one image (multipart field `image`, or the raw bytes); the top classes with probabilities
- `POST /classify/batch`: many images, one result (or error) each
- `POST /classify/explain`: where the model looks (occlusion or CAM), as JSON or a PNG heatmap
- `GET /models`: the served models, their spec, labels, precision and providers
- `/v2/...`: the Open Inference Protocol (KServe v2)
- `GET /demo`: a page to try it in a browser

Bad input gets a 4xx with `{"error", "code"}`. Served models: {models}."""


def openapi_info(version: str, models: list[str]) -> dict:
    """The OpenAPI document's ``info`` block for cnnserve serving ``models``."""
    return {"title": "cnnserve", "version": version,
            "description": OPENAPI_DESCRIPTION.replace("{models}", ", ".join(f"`{m}`" for m in models) or "none")}


class OpenAPIInfo:
    """ASGI middleware: the ``info`` block of the OpenAPI document at ``path`` becomes ``info``."""

    def __init__(self, app, info: dict, path: str = "/docs.json") -> None:
        self.app, self.info, self.path = app, info, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                try:
                    doc = json.loads(body)
                    doc["info"] = self.info
                    body = json.dumps(doc).encode()
                except (ValueError, TypeError):
                    pass  # not the JSON expected: passed on as it came
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


async def timeout_call(self, scope, receive, send) -> None:
    """BentoML's ``TimeoutMiddleware.__call__``, with the timer cancelled when the request ends, and an error
    raised before the answer starts passed on at once (BentoML's waits for the timer, 60 s, then answers 504
    for a request that had already failed)."""
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    # the request's end wakes the waiter too: an app that fails (or returns) without answering is not waited for
    fut.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
    try:
        await waiter
    except asyncio.TimeoutError:
        if fut.cancel():
            # the request's id, from the state its telemetry middleware (inside this one) left in the scope
            rid = scope.get("state", {}).get("request_id")
            resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds",
                                 "code": "timeout", **({"request_id": rid} if rid else {})}, status_code=504,
                                headers={"X-Request-ID": rid} if rid else None)
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()
