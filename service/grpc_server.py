"""The Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``, as ``tritonclient.grpc``
speaks it) beside HTTP, in each BentoML worker, on the worker's event loop and the same ``Engine``.

- **One engine**: the same models, batchers (one per model, shared by both protocols), decoding, limits and
  refusals as HTTP; requests become ``v2.Tensor``s as the HTTP infer route's do (``v2.py``).
- **Refusals** map ``APIError`` to status codes (``STATUS``): 400/413/415 INVALID_ARGUMENT, 404 NOT_FOUND,
  503 overloaded RESOURCE_EXHAUSTED with ``retry-after`` (seconds) and ``grpc-retry-pushback-ms`` in the
  trailing metadata, 504 DEADLINE_EXCEEDED; every refusal carries its code in ``cnnserve-code``. A message
  that does not parse is INVALID_ARGUMENT; one over ``max_request_mb`` is RESOURCE_EXHAUSTED (gRPC's own
  check, before it is parsed).
- **Deadlines**: the client's gRPC deadline is the request's deadline (Triton's ``timeout`` parameter, in
  microseconds, too, whichever is sooner; the server's ``timeout_ms`` without either). ``priority``: a
  request parameter, ``interactive`` or ``bulk`` (string), or Triton's integer (1 interactive, 2 and more
  bulk, 0 the default).
- **Beside inference** (as HTTP has them): Triton's model configuration and statistics (``ModelConfig``,
  ``ModelStatistics``, ``triton.py``) and the model repository (``RepositoryIndex``, ``RepositoryModelLoad``,
  ``RepositoryModelUnload``: the control token as ``authorization: Bearer TOKEN`` call metadata). With
  ``api_keys_file``, ``ModelInfer`` needs a key as call metadata (401 is UNAUTHENTICATED); with
  ``tls_certfile``, the port serves TLS with HTTP's certificate.
- **Health** (``grpc.health.v1``): SERVING once every model is warm, NOT_SERVING from the first SIGTERM.
  **Reflection** lists the services.
- **Drain**: on SIGTERM, health says NOT_SERVING at once; after ``drain_s`` (HTTP's drain) new calls get
  UNAVAILABLE, the calls in flight finish, then the server stops (GOAWAY), all within ``grace_s`` (``stop``).
- Both workers bind ``grpc_port`` (SO_REUSEPORT); the kernel spreads connections between them. The address is
  HTTP's (``bentoml serve --host``).
- **Bounds** (``server_options``; docs/grpc.md): calls per worker (``grpc_max_calls``: more are refused
  RESOURCE_EXHAUSTED before their message is read) and per connection (``grpc_max_streams``), 64 KB of a
  message before its call is taken up (BDP probing off: it grew that window to megabytes), the whole message
  within the call's deadline (each call reads its own message, ``receive``), answers within
  ``grpc_max_answer_mb`` (checked before one is built), connections that stop answering pings, sit idle or
  grow old closed (``grpc_keepalive_s``, ``IDLE_S``, ``grpc_connection_age_s``), and the freed heap given back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import anyio
import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from cnnserve import __version__
from cnnserve.core.config import KB, MB
from cnnserve.core.grpc_proto import HEALTH_SERVICE, METHODS, POOL, SERVICE, pb

from . import apikeys, repository, triton, v2
from .engine import Engine
from .errors import APIError, short
from .http_server import DRAIN
from .patches import worker_host
from .registry import request_scope
from .memory import trim_memory

log = logging.getLogger("cnnserve.grpc")

Code = grpc.StatusCode
#: HTTP statuses of ``APIError`` to gRPC status codes (an unlisted 4xx is INVALID_ARGUMENT).
STATUS = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
          408: Code.DEADLINE_EXCEEDED, 409: Code.FAILED_PRECONDITION, 413: Code.INVALID_ARGUMENT,
          415: Code.INVALID_ARGUMENT, 499: Code.CANCELLED, 500: Code.INTERNAL, 503: Code.UNAVAILABLE,
          504: Code.DEADLINE_EXCEEDED, 507: Code.RESOURCE_EXHAUSTED}
#: The methods served (others answer UNIMPLEMENTED): the metric's closed set of ``endpoint`` labels.
SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
          "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelConfig", "ModelStatistics")
#: Bounds nobody needs to tune (docs/grpc.md): a connection without calls for this long is closed; a worker
#: takes at most this many connections (each costs about 16 KB and a file descriptor HTTP needs too); the heap
#: is trimmed this often (what gRPC frees when a connection or a large message goes stays with the process
#: otherwise: 10 x 5 unfinished 19 MB messages left 600 MB behind after their connections closed).
IDLE_S, MAX_CONNECTIONS, TRIM_EVERY_S = 60, 1024, 5.0
#: Refusal messages carry at most this many bytes (they are status details, i.e. metadata: a client refuses
#: metadata past 8 KB, and a message that echoes a 100 KB model name came back RESOURCE_EXHAUSTED).
MAX_DETAILS = 1000


def details_of(e: APIError) -> str:
    """The refusal's message, cut to ``MAX_DETAILS`` bytes of UTF-8."""
    text = e.message
    if len(text.encode()) <= MAX_DETAILS:
        return text
    return text.encode()[:MAX_DETAILS - 3].decode(errors="ignore") + "..."


def status_of(e: APIError) -> grpc.StatusCode:
    if e.code == "overloaded":
        return Code.RESOURCE_EXHAUSTED
    return STATUS.get(e.status, Code.INVALID_ARGUMENT if 400 <= e.status < 500 else Code.UNAVAILABLE)


class _Unparsed:
    """What a request that did not parse becomes (gRPC would answer INTERNAL for a deserializer's error)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or anything a hostile message provokes
            return _Unparsed(f"the message is not a valid {cls.DESCRIPTOR.name}: {str(e)[:200]}")
    return parse


class InferenceService:
    """The methods of ``inference.GRPCInferenceService`` over an ``Engine``."""

    def __init__(self, engine: Engine, sync=None, api_keys=None) -> None:
        self.engine, self.sync = engine, sync  # sync: the workers' shared served set (workers.py), for the index
        self.api_keys = api_keys  # apikeys.APIKeys: ModelInfer needs a key, as HTTP's infer routes do
        self.max_answer = engine.config.grpc_max_answer_bytes

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        m = self.engine.model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=m.warmup_ms > 0 and not DRAIN.active)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="cnnserve", version=__version__,
                                         extensions=[*v2.EXTENSIONS, "classification"])

    async def ModelMetadata(self, request, context):  # noqa: N802
        d = v2.model_metadata(self.engine, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=d["name"], versions=d["versions"], platform=d["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["outputs"]])

    async def RepositoryIndex(self, request, context):  # noqa: N802
        """Every stored model version and its state over the server's workers, as HTTP's index says it."""
        entry = pb.RepositoryIndexResponse.ModelIndex
        rows = await anyio.to_thread.run_sync(repository.index, self.engine, self.sync)
        return pb.RepositoryIndexResponse(models=[
            entry(name=r["name"], version=r["version"], state=r["state"], reason=r["reason"])
            for r in rows if not request.ready or r["state"] == "READY"])

    async def ModelConfig(self, request, context):  # noqa: N802
        """Triton's model configuration, as HTTP's ``/config`` gives it (``triton.py``)."""
        config = triton.model_config(self.engine, request.name, request.version or None)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse(), ignore_unknown_fields=True)

    async def ModelStatistics(self, request, context):  # noqa: N802
        """Triton's statistics of every loaded version, one model's, or one version's, summed over the workers."""
        stats = await anyio.to_thread.run_sync(triton.model_stats, self.engine, self.sync, request.name or None,
                                               request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        """A load as HTTP's (``repository.py``): the control token as ``authorization: Bearer TOKEN`` call
        metadata; parameters ``version`` (string) and ``default`` (bool). Not yet in every worker within
        control_wait_s: DEADLINE_EXCEEDED (the index then says when it is READY)."""
        params = self._control(context, request.parameters)
        name, version = repository.split_tag(request.model_name, params)
        _settled(await repository.load_model(self.engine, self.sync, name, version, params.get("default", False)))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        params = self._control(context, request.parameters)
        name, version = repository.split_tag(request.model_name, params)
        _settled(await repository.unload_model(self.engine, self.sync, name, version))
        return pb.RepositoryModelUnloadResponse()

    def _control(self, context, parameters) -> dict:
        metadata = dict(context.invocation_metadata() or ())
        repository.check_token(self.engine.config, str(metadata.get("authorization", "")))
        return {key: _param(parameters, key) for key in parameters}

    async def ModelInfer(self, request, context, started: float | None = None):  # noqa: N802
        """``started``: when the call began, before its message arrived (the deadline counts from there, as
        HTTP's counts from before the body)."""
        t0 = started or time.perf_counter()
        engine = self.engine
        if self.api_keys is not None:  # the inference call needs a key, as HTTP's infer does (apikeys.py)
            metadata = dict(context.invocation_metadata() or ())
            caller = self.api_keys.identify(apikeys.presented(str(metadata.get("authorization", "")),
                                                              str(metadata.get("x-api-key", ""))))
            if caller is None:
                raise APIError(401, "unauthorized", "this call needs an API key: 'authorization: Bearer KEY' or "
                                                    "'x-api-key: KEY' call metadata")
            if engine.metrics and hasattr(engine.metrics, "api_key_requests"):
                engine.metrics.api_key_requests.labels(caller, "grpc").inc()
        call = engine.call(request.model_name or None, request.model_version or None,
                      priority=priority_of(request.parameters), start=t0)
        model, ticket = call.model, call.ticket
        left = context.time_remaining()
        timeout_us = _param(request.parameters, "timeout")
        for seconds in (left, timeout_us / 1e6 if type(timeout_us) is int and timeout_us > 0 else None):
            if seconds is not None and (ticket.deadline is None or t0 + seconds < ticket.deadline):
                ticket.deadline = t0 + seconds
        if len(request.inputs) != 1:
            raise v2.not_one_input()
        t = request.inputs[0]
        tensor = v2.Tensor(t.name, t.datatype, [int(s) for s in t.shape], base64=False)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise APIError(400, "bad_binary", f"{len(request.raw_input_contents)} raw_input_contents for "
                                                  "one input")
            tensor.raw = request.raw_input_contents[0]
        elif t.datatype == "BYTES":
            tensor.data = t.contents.bytes_contents
        else:
            tensor.data = t.contents.uint_contents  # converted once its length matches the shape
            if (t.datatype == "UINT8" and not len(tensor.data)
                    and any(len(getattr(t.contents, f)) for f in TYPED if f != "uint_contents")):
                raise APIError(400, "bad_data", "UINT8 contents go in uint_contents (or raw_input_contents)")
        pixels = v2.tensor_input(engine, call, tensor)
        wanted = v2.output_names([o.name for o in request.outputs])  # each at most once
        classes = [classification(o.parameters, model.spec.num_classes) for o in request.outputs] or [None] * 2
        parts = await v2.outputs(engine, call, pixels)
        # what the answer will take, before it is built: one FP32 row per image, or k texts per image
        planned, size = [], len(request.id) + len(model.name) + len(model.version or "") + 64
        for name, k in zip(wanted, classes):
            part = np.ascontiguousarray(parts[name], np.float32)
            top = np.argsort(-part, axis=1, kind="stable")[:, :k] if k else None
            size += 64 + (part.nbytes if top is None else text_bytes(part, top, model.spec.labels))
            planned.append((name, part, top))
        if size > self.max_answer:
            raise APIError(413, "answer_too_large", f"the answer would take {size / 2**20:.2f} MB, over the "
                                                    f"{self.max_answer / 2**20:.2f} MB an answer may take "
                                                    "(grpc_max_answer_mb): ask for fewer images, outputs or "
                                                    "classes")
        out = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, part, top in planned:
            if top is not None:  # Triton's classification extension: the top k as "value:index:label", BYTES
                labels = model.spec.labels
                texts = [f"{row[i]:f}:{i}:{labels[i]}".encode() for row, idx in zip(part, top) for i in idx]
                out.outputs.add(name=name, datatype="BYTES", shape=list(top.shape))
                out.raw_output_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
                continue
            out.outputs.add(name=name, datatype="FP32", shape=list(part.shape))
            out.raw_output_contents.append(part.astype("<f4", copy=False).tobytes())
        return out


def _settled(pending) -> None:
    """A control call's answer: OK once every worker applied it (gRPC has no 202)."""
    if pending is not None:
        raise APIError(504, "pending", "not yet served by every worker within control_wait_s; RepositoryIndex says "
                                       "when it is READY")


def text_bytes(part: np.ndarray, top: np.ndarray, labels: tuple[str, ...]) -> int:
    """What the texts ``"value:index:label"`` of ``top`` (indices into ``part``'s rows) take with their 4-byte
    lengths, at most: each value as wide as the widest in ``part`` (with a sign), each index as the largest."""
    width = len(f"{float(np.abs(part).max(initial=0)):f}") + 1
    return top.size * (4 + width + 1 + len(str(len(labels) - 1)) + 1) + int(label_bytes(labels)[top].sum())


_LABEL_BYTES: dict[int, tuple[tuple, np.ndarray]] = {}


def label_bytes(labels: tuple[str, ...]) -> np.ndarray:
    """Each label's length in UTF-8, once per model (a model may have 100,000 labels)."""
    hit = _LABEL_BYTES.get(id(labels))
    if hit is None or hit[0] is not labels:
        if len(_LABEL_BYTES) > 64:  # models come and go at runtime
            _LABEL_BYTES.clear()
        hit = _LABEL_BYTES[id(labels)] = (labels, np.array([len(x.encode()) for x in labels], np.int64))
    return hit[1]


def classification(params, num_classes: int) -> int | None:
    """An output's ``classification`` parameter (tritonclient's ``class_count``): how many classes, or None."""
    k = _param(params, "classification")
    if k is None or k == 0:
        return None
    if type(k) is not int or not 1 <= k <= num_classes:
        raise APIError(400, "bad_top_k", f"classification must be between 1 and {num_classes}, got {short(k)}")
    return k


TYPED = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
         "fp64_contents", "bytes_contents")


def _param(params, key: str):
    """A request parameter's value (its set field), or None."""
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def priority_of(params) -> str | None:
    value = _param(params, "priority")
    if value is None or value == 0:
        return None
    if isinstance(value, bool):
        raise APIError(400, "bad_priority", f"priority must be interactive or bulk (or 1, 2), got {value}")
    if isinstance(value, int):
        return "interactive" if value == 1 else "bulk"
    if isinstance(value, str):
        return value  # the engine checks it
    raise APIError(400, "bad_priority", f"priority must be interactive or bulk (or 1, 2), got {short(value)}")


class Metrics:
    """``cnnserve_requests`` by protocol, endpoint and status (all from closed sets)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.children: dict = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        m = self.engine.metrics
        if not m or not hasattr(m, "requests"):
            return
        key = (method, code)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = m.requests.labels("grpc", method, code.name)
        child.observe(seconds)

    def rejected(self, code: str) -> None:
        m = self.engine.metrics
        if m:
            m.rejected.labels(code, "grpc").inc()


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
            if isinstance(request, _Unparsed):
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
    return grpc.stream_unary_rpc_method_handler(handle, request_deserializer=_parser(request_cls),
                                                response_serializer=response_cls.SerializeToString)


def trailing_of(e: APIError) -> tuple:
    trailing = [("cnnserve-code", e.code)]
    retry = e.headers.get("Retry-After")
    if retry:
        trailing += [("retry-after", retry), ("grpc-retry-pushback-ms", str(int(retry) * 1000))]
    return tuple(trailing)


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
