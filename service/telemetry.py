"""What each request leaves behind for operators: its id, its log line, and for a sampled share its trace.

- **Request ids.** Every answer carries one: the client's ``X-Request-ID`` when it is sane (``sane_id``: at most
  128 visible ASCII characters, no quotes or backslashes), else one made here (16 random bytes in hex). HTTP answers
  carry it in ``X-Request-ID`` and every JSON error body as ``request_id``; gRPC's ``ModelInfer`` in its initial
  metadata (``x-request-id``) and a refusal's trailing metadata too. The data plane reaches it through the
  request's ``Call`` (``Call.request``, ``Call.request_id``), so what a request leaves behind can name it.
- **Access lines** (``access_log``; on by default with ``log_format=json``): one per request, written once the
  answer is sent: method, path, status, milliseconds and the API key's name as text, or as JSON the same and the
  id, client, route template, model and version, each stage's milliseconds, the batch size and the refusal's
  code, under Elastic Common Schema names (``http.request.id``, ``url.path``, ``event.duration`` in ns ...), which
  Elasticsearch maps as they are and Loki's ``json`` parser turns into labels (dots become underscores). JSON
  lines are written in batches, at most ``Lines.FLUSH_S`` late (``logs.Lines``: what a line per request costs).
  ``log_format=json`` also makes every other line of the server JSON (``logs.json_logging``).
- **Traces** (``tracing_sample``, the share of requests traced; 0, the default: none, and no tracer is made). The
  decision is taken when a request arrives, before any span object exists: a request whose W3C ``traceparent``
  says sampled is traced (one that says not sampled is not), others at the ratio. A traced request's spans
  are made when it is answered, from the times its stages recorded (``RequestRecord.marks``): the request's span
  (kind SERVER) with ``decode``, ``queue``, ``inference`` (its batch's real start and end, and size) and
  ``respond`` under it, sent by the SDK's batch processor to an OTLP/HTTP collector (``tracing_endpoint``, else
  the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``). Queue and inference
  happen per batch: each traced request of a batch gets its own child spans with the batch's times.

Untraced requests pay for their id, one random number and one ``ContextVar`` (measured in bench/overhead.py).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from contextvars import ContextVar

from .logs import Lines, access_json

log = logging.getLogger("cnnserve.telemetry")
access = logging.getLogger("cnnserve.access")

HEADER = "x-request-id"
_HEADER_B = HEADER.encode()
_TRACEPARENT_B = b"traceparent"
#: An id a client may choose: what logs, headers and JSON carry without escaping or surprise.
_SANE = re.compile(r"[!#-\[\]-~]{1,128}")


def sane_id(value: str | None) -> str | None:
    """``value`` when it may serve as a request id (1 to 128 visible ASCII characters, no ``"`` or ``\\``), less
    the spaces and tabs around it: httptools keeps a header value's trailing ones, which RFC 9110 says are not
    part of the value."""
    value = value.strip(" \t") if value else value
    return value if value and len(value) <= 128 and _SANE.fullmatch(value) else None


def new_id() -> str:
    """16 bytes of ``os.urandom`` as 32 hex digits (unguessable: feedback joins on them), drawn 4 KiB at a time
    (a syscall per request was 5% of a v2 request's CPU), under a lock (the event loop and gRPC's threads)."""
    with _ids_lock:
        if _ids[1] >= len(_ids[0]):
            _ids[:] = os.urandom(4096).hex(), 0
        _ids[1] += 32
        return _ids[0][_ids[1] - 32:_ids[1]]


def _fresh_ids() -> None:  # in a forked worker: not the ids its parent drew, nor a lock held in it at the fork
    global _ids_lock, _ids
    _ids_lock, _ids = threading.Lock(), ["", 0]  # hex digits drawn, how many are used


_fresh_ids()
os.register_at_fork(after_in_child=_fresh_ids)


class RequestRecord:
    """One request as telemetry sees it: filled as it goes (the front end, ``Engine.call``, the batcher) and read
    once it is answered. ``marks`` (``time.perf_counter()`` seconds: ``read`` when its body was in, ``queued``,
    ``started``, ``run``, ``ran``, and ``batch``, the largest batch that carried it) exists only where something
    will read it: a traced request, or a JSON access line."""

    __slots__ = ("id", "start", "protocol", "method", "path", "client", "status", "code", "call", "timings", "marks",
                 "api_key", "parent", "sampled")

    def __init__(self, request_id: str, start: float, protocol: str, method: str, path: str, client: str | None):
        self.id, self.start, self.protocol, self.method, self.path, self.client = (request_id, start, protocol,
                                                                                  method, path, client)
        self.status, self.code, self.call, self.timings, self.marks = 0, None, None, None, None
        self.api_key, self.parent, self.sampled = None, None, False

    def mark(self, name: str) -> None:
        if self.marks is not None:
            self.marks[name] = time.perf_counter()


CURRENT: ContextVar[RequestRecord | None] = ContextVar("cnnserve_request", default=None)


def current() -> RequestRecord | None:
    """The request this task serves (None outside one)."""
    return CURRENT.get()


def current_id() -> str | None:
    record = CURRENT.get()
    return record.id if record is not None else None


class Telemetry:
    """A worker's telemetry: the access lines it writes and the tracer of its sampled requests."""

    def __init__(self, access_log: bool = False, log_format: str = "text", sample: float = 0.0,
                 endpoint: str = "", routes=None) -> None:
        self.access_log, self.json = access_log, log_format == "json"
        self.sample = sample
        self.endpoint = endpoint
        self.routes = routes  # metrics.ROUTES: the route template of a path, a closed set
        self._tracer = None
        self.lines = Lines()

    @classmethod
    def of(cls, config, routes=None) -> "Telemetry":
        return cls(config.access_lines, config.log_format, config.trace_ratio, config.tracing_endpoint, routes)

    # -- at a request's start --------------------------------------------------------------------------------

    def begin(self, client_id: str | None, traceparent: str | None, protocol: str, method: str, path: str,
              client: str | None, start: float) -> RequestRecord:
        record = RequestRecord(sane_id(client_id) or new_id(), start, protocol, method, path, client)
        if self.sample > 0:
            self._decide(record, traceparent)
        if (self.json and self.access_log) or record.sampled:  # something will read the stages' times
            record.marks = {}
        return record

    def _decide(self, record: RequestRecord, traceparent: str | None) -> None:
        """Whether ``record`` is traced: as its sampled parent says, else at the ratio (no span object either
        way: spans are made at the end, for traced requests only)."""
        if traceparent:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            from opentelemetry import trace

            ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
            parent = trace.get_current_span(ctx).get_span_context()
            if parent.is_valid:
                record.parent, record.sampled = ctx, parent.trace_flags.sampled
                return
        record.sampled = self.sample >= 1 or random.random() < self.sample

    # -- once it is answered -----------------------------------------------------------------------------------

    def end(self, record: RequestRecord) -> None:
        end = time.perf_counter()
        trace_ids = self._trace(record, end) if record.sampled else None
        if self.access_log:
            self._log(record, end, trace_ids)

    def route_of(self, record: RequestRecord) -> str:
        if record.protocol == "grpc":
            return record.path
        return self.routes.label(record.path) if self.routes is not None else record.path

    def _log(self, record: RequestRecord, end: float, trace_ids) -> None:
        ms = (end - record.start) * 1000
        path = record.path[:200]
        if not self.json:
            access.info("%s %s %s %.1f ms key=%s id=%s", record.method, path, record.status, ms,
                        record.api_key or "-", record.id)
            return
        self.lines.write(access_json(self.lines, record, end, ms, path, self.route_of(record), self._stages,
                                     trace_ids))

    @staticmethod
    def _stages(record: RequestRecord, end: float) -> dict[str, tuple[float, float]]:
        """Each stage's (start, end) in ``perf_counter`` seconds, as far as the request went: decode (from its
        body's arrival to its pixels' hand-off to the batcher), queue, inference (its batches' runs, first start to
        last end) and respond (from there to the answer sent)."""
        marks = record.marks or {}
        out = {}
        queued = marks.get("queued")
        if queued is None:
            return out
        read = marks.get("read")
        if read is None:
            read = record.start + (record.timings or {}).get("read", 0.0)
        out["decode"] = (min(read, queued), queued)
        if "started" in marks:
            out["queue"] = (queued, marks["started"])
        if "run" in marks:
            out["inference"] = (marks["run"], marks["ran"])
            out["respond"] = (marks["ran"], end)
        return out

    # -- traces ------------------------------------------------------------------------------------------

    def tracer(self):
        if self._tracer is None:
            self._tracer = make_tracer(self.endpoint)
        return self._tracer

    def start(self) -> bool:
        """The tracer made where tracing is on; a setup that fails turns tracing off in this worker, with a warning
        (requests never fail for it). Whether tracing is on."""
        if self.sample <= 0:
            return False
        try:
            self.tracer()
            return True
        except Exception as e:  # noqa: BLE001 - whatever the exporter's setup raises
            log.warning("tracing is off in this worker: %s: %s", type(e).__name__, e)
            self.sample = 0.0
            return False

    def _trace(self, record: RequestRecord, end: float) -> tuple[str, str] | None:
        """The request's span and its stages' under it, with their recorded times; its (trace id, span id)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        if not self.start():
            return None
        tracer = self._tracer
        offset = time.time_ns() - time.perf_counter_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        route = self.route_of(record)
        attrs = {"http.request.method": record.method, "url.path": record.path[:200], "http.route": route,
                 "cnnserve.request_id": record.id, "network.protocol.name": record.protocol}
        if record.client:
            attrs["client.address"] = record.client
        if record.protocol == "grpc":
            attrs["rpc.system"], attrs["rpc.method"], attrs["rpc.grpc.status_code"] = "grpc", route, str(record.status)
        else:
            attrs["http.response.status_code"] = record.status
        call = record.call
        if call is not None:
            attrs["cnnserve.model"], attrs["cnnserve.model_version"] = call.model.name, call.model.version
        span = tracer.start_span(f"{record.method} {route}" if record.protocol == "http" else route.lstrip("/"),
                                 context=record.parent, kind=SpanKind.SERVER, attributes=attrs,
                                 start_time=ns(record.start))
        if record.code:
            span.set_attribute("error.type", record.code)
        failed = record.code is not None and (record.protocol == "grpc" or record.status >= 500 or record.status == 0)
        if failed:
            span.set_status(Status(StatusCode.ERROR, record.code))
        inside = trace.set_span_in_context(span)
        batch = (record.marks or {}).get("batch")
        for stage, (a, b) in self._stages(record, end).items():
            child = tracer.start_span(stage, context=inside, start_time=ns(a),
                                      attributes={"cnnserve.batch_size": batch} if stage in ("queue", "inference")
                                      and batch else None)
            child.end(end_time=ns(max(a, b)))
        span.end(end_time=ns(end))
        ctx = span.get_span_context()
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    def shutdown(self) -> None:
        """What is held is written and sent (a worker that stops): the JSON lines, the batch processor's spans."""
        self.lines.flush()
        if self._tracer is not None:
            self._tracer.provider.shutdown()


def make_tracer(endpoint: str = ""):
    """A tracer of its own (not the global provider, which BentoML configures for its own spans): every span it is
    asked for is recorded (the sampling decision is ``Telemetry._decide``'s), and sent in batches over OTLP/HTTP to
    ``endpoint``, or where the standard OTEL_EXPORTER_OTLP_* variables say."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from cnnserve import __version__

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "cnnserve",
                                "service.version": __version__, "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None)))
    tracer = provider.get_tracer("cnnserve")
    tracer.provider = provider
    return tracer


class RequestTelemetry:
    """ASGI middleware, the outermost of the service's own: each HTTP request's id (in ``X-Request-ID`` out, and in
    ``scope["state"]["request_id"]`` for what runs outside the request's context, such as a time-out's answer),
    its record as the current one while it is served, and its access line and trace once it is answered."""

    def __init__(self, app, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client_id = traceparent = None
        for key, value in scope["headers"]:
            if key == _HEADER_B:
                client_id = value.decode("latin-1")
            elif key == _TRACEPARENT_B:
                traceparent = value.decode("latin-1")
        client = scope.get("client")
        record = self.telemetry.begin(client_id, traceparent, "http", scope["method"], scope["path"],
                                      client[0] if client else None, time.perf_counter())
        scope.setdefault("state", {})["request_id"] = record.id
        header = (_HEADER_B, record.id.encode())

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = CURRENT.set(record)
        try:
            await self.app(scope, receive, sending)
        finally:
            CURRENT.reset(token)
            if self.telemetry.access_log or record.sampled:
                self.telemetry.end(record)
