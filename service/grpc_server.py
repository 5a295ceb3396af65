"""The gRPC server of each BentoML worker: the Open Inference Protocol (``grpc_service.py``'s methods) beside
HTTP, on the worker's event loop and the same ``Engine``, with health and reflection.

- **Health** (``grpc.health.v1``): SERVING once every model is warm, NOT_SERVING from the first SIGTERM.
  **Reflection** lists the services.
- **Drain**: on SIGTERM, health says NOT_SERVING at once; after ``drain_s`` (HTTP's drain) new calls get
  UNAVAILABLE, the calls in flight finish, then the server stops (GOAWAY), all within ``grace_s`` (``stop``).
- Both workers bind ``grpc_port`` (SO_REUSEPORT); the kernel spreads connections between them. The address is
  HTTP's (``bentoml serve --host``); with ``tls_certfile``, the port serves TLS with HTTP's certificate.
- **Bounds** (``server_options``; docs/grpc.md): calls per worker (``grpc_max_calls``: more are refused
  RESOURCE_EXHAUSTED before their message is read) and per connection (``grpc_max_streams``), 64 KB of a
  message before its call is taken up (BDP probing off: it grew that window to megabytes), the whole message
  within the call's deadline (each call reads its own message, ``receive``), answers within
  ``grpc_max_answer_mb`` (``grpc_service.py``), connections that stop answering pings, sit idle or grow old
  closed (``grpc_keepalive_s``, ``IDLE_S``, ``grpc_connection_age_s``), and the freed heap given back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from cnnserve.core.config import KB, MB
from cnnserve.core.grpc_proto import HEALTH_SERVICE, METHODS, POOL, SERVICE

from .engine import Engine
from .errors import APIError
from .grpc_service import SERVED, InferenceService, Metrics, Unparsed, details_of, parser_of, status_of, trailing_of
from .http_server import DRAIN
from .patches import worker_host
from .registry import request_scope
from .memory import trim_memory

log = logging.getLogger("cnnserve.grpc")

Code = grpc.StatusCode
#: Bounds nobody needs to tune (docs/grpc.md): a connection without calls for this long is closed; a worker
#: takes at most this many connections (each costs about 16 KB and a file descriptor HTTP needs too); the heap
#: is trimmed this often (what gRPC frees when a connection or a large message goes stays with the process
#: otherwise: 10 x 5 unfinished 19 MB messages left 600 MB behind after their connections closed).
IDLE_S, MAX_CONNECTIONS, TRIM_EVERY_S = 60, 1024, 5.0


class Gate:
    """The calls in flight, and whether new ones are refused (a drain's last phase)."""

    def __init__(self) -> None:
        self.refusing = False
        self.inflight = 0
        self.started = 0  # calls ever begun
        self.idle = asyncio.Event()
        self.idle.set()


def _handler(service: InferenceService, metrics: Metrics, name: str, gate: Gate, config):
    """The method as gRPC calls it: request-streaming on the server's side (a unary call on the wire), so that
    it runs as soon as the call begins and reads the one message itself, within the call's deadline
    (``receive``); gRPC's own unary handling reads the message first, for as long as the client takes."""
    method = getattr(service, name)
    takes_start = name == "ModelInfer"

    async def handle(requests, context):
        t0 = time.perf_counter()
        code = Code.OK
        gate.inflight += 1
        gate.started += 1
        gate.idle.clear()
        try:
            if gate.refusing:
                raise APIError(503, "draining", "the server is shutting down; call another replica")
            request = await receive(context, config)
            if request is grpc.aio.EOF:
                raise APIError(400, "bad_message", "the call carried no request message")
            if isinstance(request, Unparsed):
                raise APIError(400, "bad_message", request.error)
            with request_scope():  # the model versions it looks up stay loaded until it is answered (registry.py)
                return await (method(request, context, t0) if takes_start else method(request, context))
        except APIError as e:
            e.__traceback__ = e.__context__ = None
            code = status_of(e)
            metrics.rejected(e.code)
            await context.abort(code, details_of(e), trailing_of(e))
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = Code.INTERNAL
            log.exception("%s failed", name)
            raise
        finally:
            gate.inflight -= 1
            if not gate.inflight:
                gate.idle.set()
            metrics.observe(name, code, time.perf_counter() - t0)

    request_cls, response_cls = METHODS[name]
    return grpc.stream_unary_rpc_method_handler(handle, request_deserializer=parser_of(request_cls),
                                                response_serializer=response_cls.SerializeToString)


async def receive(context, config):
    """The call's next message, within its deadline (the client's, else ``timeout_ms`` from now): a message
    that has not arrived by then is refused (408: DEADLINE_EXCEEDED), and what came of it is dropped with the
    call. gRPC itself waits for as long as the client takes (a connection that sent the first part of a 19 MB
    message was still held after 180 s). ``grpc.aio.EOF`` when the client sent none."""
    seconds = config.timeout_ms / 1000 or None
    left = context.time_remaining()
    if left is not None and (seconds is None or left < seconds):
        seconds = left
    try:
        async with asyncio.timeout(seconds):
            return await context.read()
    except TimeoutError:
        pass
    raise APIError(408, "body_timeout", f"the request message did not arrive within {seconds:g} s (the call's "
                                        "deadline, or timeout_ms)")


def bounded(handler, config):
    """One of gRPC's own services' handlers (health's Check and Watch, reflection's stream) with each request
    message read as ``receive`` reads ours: request-streaming on the server's side, like ours."""
    if handler is None:
        return None

    async def messages(context):
        while True:
            try:
                request = await receive(context, config)
            except APIError as e:
                await context.abort(status_of(e), details_of(e), trailing_of(e))
            if request is grpc.aio.EOF:
                return
            yield request

    async def requests_of(context):  # what the handler takes: its one message, or all of them
        if handler.request_streaming:
            return messages(context)
        async for request in messages(context):
            return request
        await context.abort(Code.INVALID_ARGUMENT, "the call carried no request message")

    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if not handler.response_streaming:
        async def answer(requests, context):
            return await inner(await requests_of(context), context)
        return grpc.stream_unary_rpc_method_handler(answer, **kw)
    if inspect.isasyncgenfunction(inner):
        async def answers(requests, context):
            async for one in inner(await requests_of(context), context):
                yield one
    else:
        async def answers(requests, context):  # the handler writes its answers itself (context.write)
            await inner(await requests_of(context), context)
    return grpc.stream_stream_rpc_method_handler(answers, **kw)


class Bounded(grpc.GenericRpcHandler):
    """A generic handler's methods, each ``bounded`` (made once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, config) -> None:
        self.inner, self.config, self.made = inner, config, {}

    def service(self, details):
        handler = self.inner.service(details)
        made = self.made.get(details.method)
        if made is None or made[0] is not handler:
            made = self.made[details.method] = (handler, bounded(handler, self.config))
        return made[1]


class Collected:
    """Stands in for the server while gRPC's own services register, so that their handlers can be ``bounded``
    (the generated registration gives each service twice: generic, and by method name, which is left out)."""

    def __init__(self) -> None:
        self.generic: list = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers) -> None:
        pass


def c_int(value: float) -> int:
    """A channel argument is a C int: larger settings mean "no limit" and are given as the largest."""
    return min(int(value), 2**31 - 1)


def server_options(config) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, each checked to take effect on the installed grpcio by
    tests/test_grpc.py (HTTP/2 written by hand, as hostile clients write it)."""
    keepalive_ms = c_int(config.grpc_keepalive_s * 1000)
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", c_int(config.max_request_bytes)),
        # at least 4 MB for the other methods' answers (reflection's descriptors); ModelInfer checks its own
        ("grpc.max_send_message_length", c_int(max(config.grpc_max_answer_bytes, 4 * MB) + 64 * KB)),
        ("grpc.max_concurrent_streams", c_int(config.grpc_max_streams)),
        # ... counted as HTTP/2 counts them (calls not yet finished), so that a client that keeps to the limit
        # is never refused: gRPC's "overload protection" also counts finished calls whose memory is not yet
        # freed, and refused a client's 17th call at 16 in flight with REFUSED_STREAM (UNAVAILABLE to it)
        ("grpc.http.overload_protection", 0),
        # BDP probing grows each connection's window to megabytes: a client could then send that much of a
        # message for each of its calls before any is taken up (measured: 4-16 MB a stream). Without it, 64 KB;
        # a call being read still opens its window to the size of its message, so large messages stream as fast.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
        # a connection that stops answering pings (a client that stopped reading) is closed: keepalive pings
        # every grpc_keepalive_s while calls are open, each answered within as long again; the ping's own
        # timeout is what closes it (the keepalive timeout alone did not, on grpcio 1.85)
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.http2.ping_timeout_ms", keepalive_ms),
        ("grpc.max_connection_idle_ms", IDLE_S * 1000),
        # then every connection goes (GOAWAY: a client reconnects for its next call, as load balancing wants too),
        # its calls in flight given what a call may take (timeout_ms) or the drain's grace, whichever is longer
        ("grpc.max_connection_age_ms", c_int(config.grpc_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", c_int(max(config.grace_s * 1000, config.timeout_ms))),
        # a client may keep a connection for long; its pings are fine, at most one every 10 s without calls
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def http_host() -> str:
    """The address HTTP listens on (``bentoml serve --host``), so that gRPC listens there too (BentoML's socket,
    ``patches.worker_host``); all interfaces where it cannot be read."""
    host = worker_host()
    if host is None:
        return "[::]"
    return f"[{host}]" if ":" in host else host


class GrpcServer:
    """The worker's gRPC server: started on its event loop, drained with HTTP, stopped with the worker."""

    def __init__(self, engine: Engine, port: int, host: str | None = None, sync=None, api_keys=None,
                 tls: tuple[str, str] | None = None) -> None:
        """``api_keys``: ModelInfer needs one (``apikeys.APIKeys``); ``tls``: (certificate, key) PEM files to serve
        TLS with, as HTTP does."""
        self.engine, self.port, self.host, self.tls = engine, port, host or http_host(), tls
        config = engine.config
        # calls past grpc_max_calls are refused RESOURCE_EXHAUSTED by gRPC before anything of them is read; a call
        # counts until its answer is handed to the connection (a large one a client never reads: until it closes)
        self.server = grpc.aio.server(options=server_options(config),
                                      maximum_concurrent_rpcs=c_int(config.grpc_max_calls))
        service, metrics, self.gate = InferenceService(engine, sync, api_keys), Metrics(engine), Gate()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {name: _handler(service, metrics, name, self.gate, config) for name in SERVED}),))
        self.health = health_aio.HealthServicer()
        theirs = Collected()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, theirs)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
            (SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), pool=POOL), theirs)
        self.server.add_generic_rpc_handlers(tuple(Bounded(h, config) for h in theirs.generic))
        self.stopped: asyncio.Task | None = None
        self.trimming: asyncio.Task | None = None

    async def start(self) -> int:
        address = f"{self.host}:{self.port}"
        if self.tls:
            with open(self.tls[0], "rb") as cert, open(self.tls[1], "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            bound = self.server.add_secure_port(address, credentials)
        else:
            bound = self.server.add_insecure_port(address)
        if not bound:
            raise RuntimeError(f"cannot bind gRPC port {self.port}")
        await self.server.start()
        await self._health(self.engine.ready)
        loop = asyncio.get_running_loop()
        DRAIN.listeners.append(lambda: loop.call_soon_threadsafe(self._drain))
        self.trimming = asyncio.ensure_future(self._trim())
        log.info("gRPC (Open Inference Protocol, health, reflection) on %s:%d", self.host, bound)
        return bound

    async def _trim(self) -> None:
        """Give the heap's free pages back every ``TRIM_EVERY_S`` (a microsecond when there are none)."""
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            trim_memory()

    async def _health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    def _drain(self) -> None:
        config = self.engine.config

        async def drain() -> None:
            await self._health(False)
            await asyncio.sleep(config.drain_s)
            await self.stop()

        asyncio.ensure_future(drain())

    async def stop(self) -> None:
        """Stop accepting and finish the calls in flight within ``grace_s`` (once, whoever asks)."""
        if self.stopped is None:
            async def stop() -> None:
                # New calls are refused UNAVAILABLE by the service itself first, while the calls in flight
                # finish: gRPC's own shutdown answers a call that races it CANCELLED, which a client cannot
                # tell from a call lost mid-way. Then the server stops (GOAWAY) with what is left of grace_s.
                t = time.monotonic()
                grace = self.engine.config.grace_s
                self.gate.refusing = True
                await self.health.enter_graceful_shutdown()
                try:  # idle, and no call begun for a moment (calls still in gRPC's queue get their answer)
                    async with asyncio.timeout(grace):
                        while True:
                            await self.gate.idle.wait()
                            started = self.gate.started
                            await asyncio.sleep(0.25)
                            if self.gate.idle.is_set() and self.gate.started == started:
                                break
                except TimeoutError:
                    pass
                await self.server.stop(max(0.0, grace - (time.monotonic() - t)))
                if self.trimming is not None:
                    self.trimming.cancel()
            self.stopped = asyncio.ensure_future(stop())
        await asyncio.shield(self.stopped)
