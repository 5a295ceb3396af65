"""The Open Inference Protocol's methods over the engine: Triton's ``inference.GRPCInferenceService``, as
``tritonclient.grpc`` speaks it, answered by the worker's ``Engine`` (``grpc_server.py`` serves them).

- **One engine**: the same models, batchers (one per model, shared by both protocols), decoding, limits and
  refusals as HTTP; requests become ``v2.Tensor``s as the HTTP infer route's do (``v2.py``).
- **Refusals** map ``APIError`` to status codes (``STATUS``): 400/413/415 INVALID_ARGUMENT, 404 NOT_FOUND,
  503 overloaded RESOURCE_EXHAUSTED with ``retry-after`` (seconds) and ``grpc-retry-pushback-ms`` in the
  trailing metadata, 504 DEADLINE_EXCEEDED; every refusal carries its code in ``cnnserve-code``. A message
  that does not parse is INVALID_ARGUMENT (``Unparsed``); one over ``max_request_mb`` is RESOURCE_EXHAUSTED
  (gRPC's own check, before it is parsed).
- **Deadlines**: the client's gRPC deadline is the request's deadline (Triton's ``timeout`` parameter, in
  microseconds, too, whichever is sooner; the server's ``timeout_ms`` without either). ``priority``: a
  request parameter, ``interactive`` or ``bulk`` (string), or Triton's integer (1 interactive, 2 and more
  bulk, 0 the default).
- **Answers** within ``grpc_max_answer_mb``, checked before one is built (``ModelInfer``).
- **Beside inference** (as HTTP has them): Triton's model configuration and statistics (``ModelConfig``,
  ``ModelStatistics``, ``triton.py``) and the model repository (``RepositoryIndex``, ``RepositoryModelLoad``,
  ``RepositoryModelUnload``: the control token as ``authorization: Bearer TOKEN`` call metadata). With
  ``api_keys_file``, ``ModelInfer`` needs a key as call metadata (401 is UNAUTHENTICATED).
- **Request ids** (``telemetry.py``): ``ModelInfer`` answers with ``x-request-id`` in its initial metadata (the
  client's ``x-request-id`` call metadata where it is sane, else one made here), and in a refusal's trailing
  metadata too; its access line and trace are HTTP's.
"""

from __future__ import annotations

import time

import anyio
import grpc
import numpy as np
from google.protobuf import json_format

from cnnserve import __version__
from cnnserve.core.grpc_proto import pb

from . import apikeys, repository, telemetry as _telemetry, triton, v2
from .engine import Engine
from .errors import APIError, short

Code = grpc.StatusCode
#: HTTP statuses of ``APIError`` to gRPC status codes (an unlisted 4xx is INVALID_ARGUMENT).
STATUS = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
          408: Code.DEADLINE_EXCEEDED, 409: Code.FAILED_PRECONDITION, 413: Code.INVALID_ARGUMENT,
          415: Code.INVALID_ARGUMENT, 499: Code.CANCELLED, 500: Code.INTERNAL, 503: Code.UNAVAILABLE,
          504: Code.DEADLINE_EXCEEDED, 507: Code.RESOURCE_EXHAUSTED}
#: The methods served (others answer UNIMPLEMENTED): the metric's closed set of ``endpoint`` labels.
SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
          "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelConfig", "ModelStatistics")
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


def trailing_of(e: APIError) -> tuple:
    """The refusal's trailing metadata: its code, and when to retry where it says."""
    trailing = [("cnnserve-code", e.code)]
    rid = getattr(e, "request_id", None)  # set by ModelInfer
    if rid:
        trailing.append((_telemetry.HEADER, rid))
    retry = e.headers.get("Retry-After")
    if retry:
        trailing += [("retry-after", retry), ("grpc-retry-pushback-ms", str(int(retry) * 1000))]
    return tuple(trailing)


class Unparsed:
    """What a request that did not parse becomes (gRPC would answer INTERNAL for a deserializer's error)."""

    def __init__(self, error: str) -> None:
        self.error = error


def parser_of(cls):
    """The deserializer of a request message of class ``cls``: the message, or ``Unparsed``."""

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or anything a hostile message provokes
            return Unparsed(f"the message is not a valid {cls.DESCRIPTOR.name}: {str(e)[:200]}")
    return parse


class InferenceService:
    """The methods of ``inference.GRPCInferenceService`` over an ``Engine``."""

    #: the worker's ``telemetry.Telemetry`` (service.py sets it): ModelInfer's request ids, access lines and traces
    telemetry = None

    def __init__(self, engine: Engine, sync=None, api_keys=None) -> None:
        self.engine, self.sync = engine, sync  # sync: the workers' shared served set (workers.py), for the index
        self.api_keys = api_keys  # apikeys.APIKeys: ModelInfer needs a key, as HTTP's infer routes do
        self.max_answer = engine.config.grpc_max_answer_bytes

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=v2.model_ready(self.engine, request.name, request.version or None)[1])

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="cnnserve", version=__version__,
                                         extensions=list(v2.EXTENSIONS))

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
        HTTP's counts from before the body). The call's id goes out in the initial metadata at once, so that
        every answer, a refusal's too, carries it."""
        t0 = started or time.perf_counter()
        if self.telemetry is None:
            return await self._infer(request, context, t0)
        client_id = traceparent = None
        for key, value in context.invocation_metadata() or ():
            if key == _telemetry.HEADER:
                client_id = value if isinstance(value, str) else None
            elif key == "traceparent":
                traceparent = value if isinstance(value, str) else None
        record = self.telemetry.begin(client_id, traceparent, "grpc", "POST", MODEL_INFER, peer_address(context), t0)
        token = _telemetry.CURRENT.set(record)
        try:
            await context.send_initial_metadata(((_telemetry.HEADER, record.id),))
            answer = await self._infer(request, context, t0)
            record.status = "OK"
            return answer
        except APIError as e:
            e.request_id, record.code, record.status = record.id, e.code, status_of(e).name
            raise
        except Exception:
            record.code, record.status = "internal", "INTERNAL"
            raise
        finally:
            _telemetry.CURRENT.reset(token)
            if self.telemetry.access_log or record.sampled:
                self.telemetry.end(record)

    async def _infer(self, request, context, t0: float):
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
        model_name, model_version = request.model_name or None, request.model_version or None
        try:
            priority = priority_of(request.parameters)
        except APIError:
            engine.model(model_name, model_version)  # an unknown model is NOT_FOUND, whatever else is wrong
            raise
        call = engine.call(model_name, model_version, priority=priority, start=t0)
        model, ticket = call.model, call.ticket
        left = context.time_remaining()
        for seconds in (left, v2.timeout_seconds(_param(request.parameters, "timeout"))):
            v2.tighten(ticket, seconds)
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
        classes = [v2.classification(_param(o.parameters, "classification"), model.spec.num_classes)
                   for o in request.outputs] or [None] * 2
        parts = await v2.outputs(engine, call, pixels)
        # what the answer will take, before it is built: one FP32 row per image, or k texts per image
        planned, size = [], len(request.id) + len(model.name) + len(model.version or "") + 64
        for name, k in zip(wanted, classes):
            part = np.ascontiguousarray(parts[name], np.float32)
            top = v2.top_of(part, k)
            size += 64 + (part.nbytes if top is None else v2.text_bytes(part, top, model.spec.labels))
            planned.append((name, part, top))
        if size > self.max_answer:
            raise APIError(413, "answer_too_large", f"the answer would take {size / 2**20:.2f} MB, over the "
                                                    f"{self.max_answer / 2**20:.2f} MB an answer may take "
                                                    "(grpc_max_answer_mb): ask for fewer images, outputs or "
                                                    "classes")
        out = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, part, top in planned:
            if top is not None:  # Triton's classification extension: the top k as "value:index:label", BYTES
                texts = [t.encode() for t in v2.classified(part, top, model.spec.labels)]
                out.outputs.add(name=name, datatype="BYTES", shape=list(top.shape))
                out.raw_output_contents.append(b"".join(len(t).to_bytes(4, "little") + t for t in texts))
                continue
            out.outputs.add(name=name, datatype="FP32", shape=list(part.shape))
            out.raw_output_contents.append(part.astype("<f4", copy=False).tobytes())
        return out


#: ModelInfer's full name, its access line's path and its span's name
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def peer_address(context) -> str | None:
    """The client's address from gRPC's peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or None


def _settled(pending) -> None:
    """A control call's answer: OK once every worker applied it (gRPC has no 202)."""
    if pending is not None:
        raise APIError(504, "pending", "not yet served by every worker within control_wait_s; RepositoryIndex says "
                                       "when it is READY")


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
    return v2.priority_value(_param(params, "priority"))


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
