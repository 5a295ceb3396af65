"""The Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``, as ``tritonclient.grpc``
speaks it) beside HTTP, in each BentoML worker, on the worker's event loop and the same ``Engine``.

- **One engine**: the same models, batchers (one per model, shared by both protocols), decoding, limits and
  refusals as HTTP; requests are parsed by ``kserve.tensor_input`` like the HTTP infer route's.
- **Refusals** map ``APIError`` to status codes (``STATUS``): 400/413/415 INVALID_ARGUMENT, 404 NOT_FOUND,
  503 overloaded RESOURCE_EXHAUSTED with ``retry-after`` (seconds) and ``grpc-retry-pushback-ms`` in the
  trailing metadata, 504 DEADLINE_EXCEEDED; every refusal carries its code in ``cnnserve-code``. A message
  that does not parse is INVALID_ARGUMENT; one over ``max_request_mb`` is RESOURCE_EXHAUSTED (gRPC's own
  check, before it is parsed).
- **Deadlines**: the client's gRPC deadline is the request's deadline (Triton's ``timeout`` parameter, in
  microseconds, too, whichever is sooner; the server's ``timeout_ms`` without either). ``priority``: a
  request parameter, ``interactive`` or ``bulk`` (string), or Triton's integer (1 interactive, 2 and more
  bulk, 0 the default).
- **Health** (``grpc.health.v1``): SERVING once every model is warm, NOT_SERVING from the first SIGTERM.
  **Reflection** lists the services.
- **Drain**: on SIGTERM, health says NOT_SERVING at once; after ``drain_s`` (HTTP's drain) new calls get
  UNAVAILABLE, the calls in flight finish, then the server stops (GOAWAY), all within ``grace_s`` (``stop``).
- Both workers bind ``grpc_port`` (SO_REUSEPORT); the kernel spreads connections between them. The address is
  HTTP's (``bentoml serve --host``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import anyio
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cnnserve import __version__
from cnnserve.core.grpc_proto import HEALTH_SERVICE, METHODS, POOL, SERVICE, pb

from . import kserve
from .engine import Engine
from .errors import APIError, short
from . import repository
from .http_server import DRAIN
from .manager import request_scope

log = logging.getLogger("cnnserve.grpc")

SC = grpc.StatusCode
#: HTTP statuses of ``APIError`` to gRPC status codes (an unlisted 4xx is INVALID_ARGUMENT).
STATUS = {400: SC.INVALID_ARGUMENT, 404: SC.NOT_FOUND, 408: SC.DEADLINE_EXCEEDED, 413: SC.INVALID_ARGUMENT,
          415: SC.INVALID_ARGUMENT, 499: SC.CANCELLED, 503: SC.UNAVAILABLE, 504: SC.DEADLINE_EXCEEDED}
#: The methods served (others answer UNIMPLEMENTED): the metric's closed set of ``endpoint`` labels.
SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
          "RepositoryIndex")


def status_of(e: APIError) -> grpc.StatusCode:
    if e.code == "overloaded":
        return SC.RESOURCE_EXHAUSTED
    return STATUS.get(e.status, SC.INVALID_ARGUMENT if 400 <= e.status < 500 else SC.UNAVAILABLE)


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

    def __init__(self, engine: Engine, sync=None) -> None:
        self.engine, self.sync = engine, sync  # sync: the workers' shared served set (workers.py), for the index

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        m = self.engine.model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=m.warmup_ms > 0 and not DRAIN.active)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="cnnserve", version=__version__, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):  # noqa: N802
        d = kserve.model_metadata(self.engine, request.name, request.version or None)
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

    async def ModelInfer(self, request, context):  # noqa: N802
        t0 = time.perf_counter()
        e = self.engine
        model = e.model(request.model_name, request.model_version or None)
        ticket = e.ticket(None, priority_of(request.parameters), t0)
        left = context.time_remaining()
        timeout_us = _param(request.parameters, "timeout")
        for seconds in (left, timeout_us / 1e6 if type(timeout_us) is int and timeout_us > 0 else None):
            if seconds is not None and (ticket.deadline is None or t0 + seconds < ticket.deadline):
                ticket.deadline = t0 + seconds
        if len(request.inputs) != 1:
            raise kserve.one_input_please()
        t = request.inputs[0]
        tensor = kserve.Tensor(t.name, t.datatype, [int(s) for s in t.shape], base64=False)
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
        pixels = kserve.tensor_input(e, model, tensor)
        wanted = kserve.output_names([o.name for o in request.outputs])
        classes = [classification(o.parameters, model.spec.num_classes) for o in request.outputs] or [None] * 2
        parts = await kserve.outputs(e, model, pixels, ticket)
        out = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, k in zip(wanted, classes):
            part = np.ascontiguousarray(parts[name], np.float32)
            if k:  # Triton's classification extension: the top k as "value:index:label", BYTES
                top = np.argsort(-part, axis=1, kind="stable")[:, :k]
                labels = model.spec.labels
                texts = [f"{row[i]:f}:{i}:{labels[i]}".encode() for row, idx in zip(part, top) for i in idx]
                out.outputs.add(name=name, datatype="BYTES", shape=[len(part), k])
                out.raw_output_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
                continue
            out.outputs.add(name=name, datatype="FP32", shape=list(part.shape))
            out.raw_output_contents.append(part.astype("<f4", copy=False).tobytes())
        return out


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


def _handler(service: InferenceService, metrics: Metrics, name: str, gate: Gate):
    method = getattr(service, name)

    async def handle(request, context):
        t0 = time.perf_counter()
        code = SC.OK
        gate.inflight += 1
        gate.started += 1
        gate.idle.clear()
        try:
            if gate.refusing:
                raise APIError(503, "draining", "the server is shutting down; call another replica")
            if isinstance(request, _Unparsed):
                raise APIError(400, "bad_message", request.error)
            with request_scope():  # the model versions it looks up stay loaded until it is answered (manager.py)
                return await method(request, context)
        except APIError as e:
            e.__traceback__ = e.__context__ = None
            code = status_of(e)
            metrics.rejected(e.code)
            trailing = [("cnnserve-code", e.code)]
            retry = e.headers.get("Retry-After")
            if retry:
                trailing += [("retry-after", retry), ("grpc-retry-pushback-ms", str(int(retry) * 1000))]
            await context.abort(code, e.message, tuple(trailing))
        except asyncio.CancelledError:
            code = SC.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = SC.INTERNAL
            log.exception("%s failed", name)
            raise
        finally:
            gate.inflight -= 1
            if not gate.inflight:
                gate.idle.set()
            metrics.observe(name, code, time.perf_counter() - t0)

    request_cls, response_cls = METHODS[name]
    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=_parser(request_cls),
                                               response_serializer=response_cls.SerializeToString)


def http_host() -> str:
    """The address HTTP listens on (``bentoml serve --host``), so that gRPC listens there too: BentoML hands
    each worker the listening socket as ``--fd N``. All interfaces where it cannot be read."""
    import socket
    import sys

    args = sys.argv
    try:
        fd = int(args[args.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            host = sock.getsockname()[0]
    except (ValueError, IndexError, OSError):
        return "[::]"
    return f"[{host}]" if ":" in host else host


class GrpcServer:
    """The worker's gRPC server: started on its event loop, drained with HTTP, stopped with the worker."""

    def __init__(self, engine: Engine, port: int, host: str | None = None, sync=None) -> None:
        self.engine, self.port, self.host = engine, port, host or http_host()
        config = engine.config
        limit = config.max_request_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            # a client may keep a connection for long; its pings are fine, at most one every 10 s without calls
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        service, metrics, self.gate = InferenceService(engine, sync), Metrics(engine), Gate()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {name: _handler(service, metrics, name, self.gate) for name in SERVED}),))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server,
                                            pool=POOL)
        self.stopped: asyncio.Task | None = None

    async def start(self) -> int:
        bound = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if not bound:
            raise RuntimeError(f"cannot bind gRPC port {self.port}")
        await self.server.start()
        await self._health(self.engine.ready)
        loop = asyncio.get_running_loop()
        DRAIN.listeners.append(lambda: loop.call_soon_threadsafe(self._drain))
        log.info("gRPC (Open Inference Protocol, health, reflection) on %s:%d", self.host, bound)
        return bound

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
            self.stopped = asyncio.ensure_future(stop())
        await asyncio.shield(self.stopped)
