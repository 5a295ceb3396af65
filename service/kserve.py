"""The Open Inference Protocol (KServe v2, as Triton speaks it) over the engine: model metadata, and infer
requests as JSON, with the binary tensor extension, and as encoded images (a BYTES input named ``image``).
A front end parses here and the engine does the work, so every protocol gets the same limits and answers.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Annotated

import anyio
import numpy as np
from fastapi import Query, Request
from fastapi.responses import JSONResponse

from cnnserve import __version__
from cnnserve.core import onnxmeta
from cnnserve.core.confidence import not_finite_rows
from cnnserve.core.config import Settings
from cnnserve.core.runtime import Model

from .engine import Engine, Ticket
from .errors import APIError, decimal, json_depth, model_output_not_finite, short
from .bodies import read_body, watch_disconnect
from .params import RequestParams, declare_route
from .patches import runtime_info

#: The Open Inference Protocol's extensions served (Triton's names), over HTTP and gRPC alike.
EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "statistics")
#: The input that carries encoded images (BYTES) instead of pixels.
IMAGE_INPUT = "image"


def model_metadata(engine: Engine, name: str, version: str | None = None) -> dict:
    m = engine.model(name, version)
    d = m.describe()
    versions = engine.manager.loaded().get(m.name) or ([m.version] if m.version else [])
    return {"name": m.name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": [d["input"]], "outputs": d["outputs"]}

async def parse(config: Settings, body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of an infer request and, with the binary tensor extension, the binary part.
    Its size and nesting are checked before the parser sees it; a large one parses in a thread."""
    n = len(body)
    if header_length is not None:
        n = decimal(header_length)
        if n is None or n > len(body):
            raise APIError(400, "bad_request", f"Inference-Header-Content-Length {header_length[:40]!r} "
                                               f"does not fit a body of {len(body)} bytes")
    head, binary = body[:n], body[n:]
    if len(head) > config.max_json_bytes:
        raise APIError(413, "too_large", f"the JSON part is {len(head):,} bytes; the limit is "
                                         f"{config.max_json_bytes:,} (send tensors with the binary "
                                         "tensor extension)")
    if json_depth(head) > config.max_json_depth:
        raise APIError(400, "bad_json", f"the JSON nests deeper than {config.max_json_depth} levels")
    problem = None
    try:
        if len(head) > 64 * 1024:
            req = await anyio.to_thread.run_sync(json.loads, head or b"{}")
        else:
            req = json.loads(head or b"{}")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers
        problem = f"the request is not valid JSON: {str(e)[:200]}"
    if problem:
        raise APIError(400, "bad_json", problem)
    if not isinstance(req, dict):
        raise APIError(400, "bad_request", "the request must be a JSON object with 'inputs'")
    return req, binary

@dataclass
class Tensor:
    """An infer request's input tensor, whatever the protocol carried it in: its name, datatype and shape as
    the client sent them (checked here, so of any type), and its contents as either ``raw`` bytes (the binary
    tensor extension's part over HTTP, ``raw_input_contents`` over gRPC: pixels as bytes, images each as a
    4-byte little-endian length and its bytes) or ``data`` (JSON's list: integers, or base64 strings for
    images; gRPC's typed contents: ``uint_contents``, or ``bytes_contents`` already decoded)."""

    name: object
    datatype: object
    shape: object
    raw: bytes | memoryview | None = None
    data: object = None
    base64: bool = True  # ``data`` of an image input holds base64 strings (JSON), not the bytes (gRPC)


def input_of(engine: Engine, model: Model, req: dict, binary: bytes) -> np.ndarray | list[bytes]:
    """The JSON request's one input (see ``tensor_input``), with the binary tensor extension's part."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise one_input_please()
    t = inputs[0]
    tensor = Tensor(t.get("name"), t.get("datatype"), t.get("shape"), data=t.get("data"))
    size = binary_data_size(t)
    if size is not None:
        if type(size) is not int or not 0 < size <= len(binary):
            raise APIError(400, "bad_binary", f"binary_data_size {short(size)} does not fit the "
                                                 f"{len(binary)} bytes sent")
        tensor.raw = memoryview(binary)[:size]
    return tensor_input(engine, model, tensor)


def one_input_please() -> APIError:
    return APIError(400, "bad_request", f"'inputs' must hold exactly one tensor: {onnxmeta.INPUT!r} "
                                        f"(UINT8 pixels) or {IMAGE_INPUT!r} (BYTES, encoded images)")


def tensor_input(engine: Engine, model: Model, t: Tensor) -> np.ndarray | list[bytes]:
    """The request's one input, by any protocol: the ``pixels`` tensor (UINT8 N x C x H x W), or ``image``, a
    BYTES tensor of N encoded images (decoded later by the service's preprocessing). Every field is
    type-checked (a bool is not an int), and the count is checked before any content is read."""
    if t.name == IMAGE_INPUT:
        return images_of(engine, t)
    c, h, w = model.spec.input_shape
    if t.name != onnxmeta.INPUT:
        raise APIError(400, "bad_input_name", f"input must be named {onnxmeta.INPUT!r} or {IMAGE_INPUT!r}, "
                                              f"got {short(t.name)}")
    if t.datatype != "UINT8":
        raise APIError(400, "bad_datatype", f"input datatype must be UINT8, got {short(t.datatype)}")
    shape = t.shape
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(s) is int for s in shape)
            or shape[1:] != [c, h, w] or shape[0] < 1):
        raise APIError(400, "bad_shape", f"input shape must be [N, {c}, {h}, {w}] with N >= 1, got {short(shape)}")
    engine.check_count(shape[0])
    count = shape[0] * c * h * w
    if t.raw is not None:
        if len(t.raw) != count:
            raise APIError(400, "bad_binary", f"the input's {len(t.raw)} bytes do not match shape {shape} "
                                                 f"({count} bytes)")
        return np.frombuffer(t.raw, np.uint8, count).reshape(shape)
    data = t.data
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__len__"):
        raise APIError(400, "bad_request", "input needs 'data' (a list of integers) or binary_data_size")
    if not isinstance(data, list) and len(data) != count:  # gRPC's flat contents: counted before converted
        raise APIError(400, "bad_data", f"input data must be {count} integers for shape {shape}, got {len(data)}")
    problem = None
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        problem = "input data is ragged or holds values that are not integers"
    if problem:
        raise APIError(400, "bad_data", problem)
    if arr.size != count or arr.dtype.kind not in "iu":
        raise APIError(400, "bad_data", f"input data must be {count} integers for shape {shape}, "
                                           f"got {arr.size} values of type {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise APIError(400, "bad_data", "UINT8 data must lie in 0..255")
    return arr.astype(np.uint8).reshape(shape)


def images_of(engine: Engine, t: Tensor) -> list[bytes]:
    """The encoded images of a BYTES input: raw, each element is a 4-byte little-endian length and its
    bytes (Triton's serialisation, over HTTP's binary extension and gRPC's raw contents alike); as data,
    base64 strings (JSON) or the bytes themselves (gRPC's ``bytes_contents``)."""
    if t.datatype != "BYTES":
        raise APIError(400, "bad_datatype", f"input {IMAGE_INPUT!r} must be BYTES, got {short(t.datatype)}")
    shape = t.shape
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or not all(type(s) is int for s in shape)
            or shape[0] < 1 or shape[1:] not in ([], [1])):
        raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} shape must be [N] or [N, 1], got {short(shape)}")
    n = shape[0]
    engine.check_count(n)
    if t.raw is not None:
        size = len(t.raw)
        if not size:
            raise APIError(400, "bad_binary", f"input {IMAGE_INPUT!r} has no bytes")
        images, view, pos = [], memoryview(t.raw), 0
        while pos < size:
            if len(images) == n:  # more elements than the shape says: stop before reading them all
                raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds more images")
            if pos + 4 > size:
                raise APIError(400, "bad_binary", f"element {len(images)} of {IMAGE_INPUT!r}: truncated length")
            length = int.from_bytes(view[pos:pos + 4], "little")
            if pos + 4 + length > size:
                raise APIError(400, "bad_binary", f"element {len(images)} of {IMAGE_INPUT!r}: {length} bytes "
                                                     f"announced, {size - pos - 4} left")
            images.append(bytes(view[pos + 4:pos + 4 + length]))
            pos += 4 + length
    elif not t.base64:
        data = t.data
        if data is None or len(data) != n:  # counted before anything is copied
            raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds "
                                             f"{0 if data is None else len(data)} images")
        images = list(data)
    else:
        data = t.data
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise APIError(400, "bad_request", f"input {IMAGE_INPUT!r} needs 'data' (base64 strings) or "
                                               "binary_data_size")
        if len(data) != n:
            raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds {len(data)} images")
        try:
            images = [base64.b64decode(d, validate=True) for d in data]
        except ValueError:
            images = None
        if images is None:
            raise APIError(400, "bad_data", f"input {IMAGE_INPUT!r} data must be base64 strings")
    if len(images) != n:
        raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds {len(images)} images")
    return images

async def decode(engine: Engine, model: Model, images: list[bytes], ticket: Ticket | None = None) -> np.ndarray:
    """Every image decoded; one that fails fails the request, naming its index."""
    decoded = await engine.decode_all(model, images, ticket)
    bad = next(((i, d) for i, d in enumerate(decoded) if isinstance(d, APIError)), None)
    if bad:
        i, e = bad
        raise APIError(e.status, e.code, f"image {i}: {e.message}")
    return np.stack(decoded)

def outputs_of(req: dict) -> list[str]:
    wanted = req.get("outputs")
    if wanted is None:
        return list(onnxmeta.OUTPUTS)
    if not isinstance(wanted, list):
        raise APIError(400, "bad_output", f"'outputs' must be a list, got {short(wanted)}")
    return output_names([o.get("name") if isinstance(o, dict) else o for o in wanted])


def output_names(names: list) -> list[str]:
    """The outputs a request asks for, by name (all of them when it names none), each at most once: an answer
    is built per name, so a request naming one output thousands of times asked for thousands of copies of it
    (a 353 KB request got a 70 MB answer, built on the event loop). The first unknown or repeated name is
    refused, so neither the check nor its message grows with the list."""
    seen: list[str] = []
    for o in names:
        if not isinstance(o, str) or o not in onnxmeta.OUTPUTS:
            raise APIError(400, "bad_output", f"unknown output {short(o)}; this model has {list(onnxmeta.OUTPUTS)}")
        if o in seen:
            raise APIError(400, "duplicate_output", f"output {o!r} is asked for more than once; name each output "
                                                    "at most once")
        seen.append(o)
    return seen or list(onnxmeta.OUTPUTS)


async def outputs(engine: Engine, model: Model, pixels: np.ndarray | list[bytes],
                  ticket: Ticket | None = None) -> dict[str, np.ndarray]:
    """The input (pixels, or encoded images, decoded first) through the model's batcher: every output,
    N rows each (float32). Every protocol answers from this."""
    if isinstance(pixels, list):
        pixels = await decode(engine, model, pixels, ticket)
    out, _ = await engine.run(model, pixels, ticket=ticket)
    bad = not_finite_rows(out)
    if bad:  # no protocol can carry NaN as a number (JSON has none), and no client can use it
        raise model_output_not_finite(model.name, model.version, bad)
    k = model.spec.num_classes
    return {onnxmeta.LOGITS: out[:, :k], onnxmeta.PROBABILITIES: out[:, k:]}


#: An answer of more numbers than this is serialised in a thread, not on the event loop that serves the others
#: (about a microsecond a number: 256 images of a 1,000-class model, 512,000 numbers, took 0.58 s).
INLINE_ANSWER_VALUES = 4096


async def infer(engine: Engine, name: str, version: str | None, body: bytes, header_length: str | None,
                ticket: Ticket | None = None) -> JSONResponse:
    """The answer: each output asked for once (``output_names``), so at most the N x K numbers of each of the
    model's two outputs, whatever the request says; a large one is serialised off the event loop."""
    model = engine.model(name, version)
    req, binary = await parse(engine.config, body, header_length)
    if "id" in req and not isinstance(req["id"], str):
        raise APIError(400, "bad_request", f"'id' must be a string, got {short(req['id'])}")
    pixels = input_of(engine, model, req, binary)
    wanted = outputs_of(req)  # refused before the model runs
    parts = await outputs(engine, model, pixels, ticket)

    def render() -> JSONResponse:
        resp = {"model_name": model.name, "model_version": model.version,
                "outputs": [{"name": o, "datatype": "FP32", "shape": list(parts[o].shape),
                             "data": parts[o].ravel().tolist()} for o in wanted]}
        if "id" in req:
            resp["id"] = req["id"]
        return JSONResponse(resp)

    if sum(parts[o].size for o in wanted) > INLINE_ANSWER_VALUES:
        return await anyio.to_thread.run_sync(render)
    return render()


def binary_data_size(t: dict):
    """An Open Inference Protocol input's ``binary_data_size`` (None without the binary extension)."""
    params = t.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise APIError(400, "bad_parameters", f"input 'parameters' must be an object, got {short(params)}")
    return (params or {}).get("binary_data_size")


# -- the routes: JSON with the binary tensor extension on input ---------------------------------------------
V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": [onnxmeta.INPUT, IMAGE_INPUT]},
            "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, 1, 28, 28]},
            "data": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": list(onnxmeta.OUTPUTS)}}}}}},
    # a request the default model (28 x 28 grey) answers: a blank image, its probabilities
    "example": {"inputs": [{"name": onnxmeta.INPUT, "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
                "outputs": [{"name": onnxmeta.PROBABILITIES}]}}}}}
TAGS = ["open inference protocol (KServe v2)"]
ROUTES: list = []
route = declare_route(ROUTES)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@route("GET", "/v2", tags=TAGS, summary="Server metadata")
async def server_metadata():
    return {"name": "cnnserve", "version": __version__, "extensions": list(EXTENSIONS),
            "runtime": runtime_info()}


@route("GET", "/v2/health/live", tags=TAGS, summary="Server liveness")
async def live():
    return {"live": True}


@route("GET", "/v2/health/ready", tags=TAGS, summary="Server readiness: every model loaded and warmed")
async def ready(request: Request):
    ok = _engine(request).ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@route("GET", "/v2/models/{name}", tags=TAGS, summary="Model metadata: inputs and outputs with shapes and datatypes")
@route("GET", "/v2/models/{name}/versions/{version}", tags=TAGS, summary="Metadata of one loaded version")
async def get_model_metadata(request: Request, name: str, version: str | None = None):
    return model_metadata(_engine(request), name, version)


@route("GET", "/v2/models/{name}/ready", tags=TAGS, summary="Model readiness")
@route("GET", "/v2/models/{name}/versions/{version}/ready", tags=TAGS, summary="Readiness of one loaded version")
async def model_ready(request: Request, name: str, version: str | None = None):
    m = _engine(request).model(name, version)
    return {"name": m.name, "ready": m.warmup_ms > 0}


@route("POST", "/v2/models/{name}/infer", tags=TAGS, openapi_extra=V2_BODY,
       summary="Inference on a uint8 N x C x H x W tensor named 'pixels', or encoded images named 'image'")
@route("POST", "/v2/models/{name}/versions/{version}/infer", tags=TAGS, openapi_extra=V2_BODY,
       summary="Inference on one loaded version (as /v2/models/{name}/infer)")
async def infer_route(request: Request, p: Annotated[RequestParams, Query()], name: str,
                      version: str | None = None):
    t0 = time.perf_counter()
    e = _engine(request)
    status = "200"
    try:
        e.model(name, version)
        ticket = e.ticket(p.timeout_ms, p.priority, t0)
        body = await read_body(request, e.config.max_request_bytes, e.config.body_timeout_s)
        ticket.gone = watch_disconnect(request)
        return await infer(e, name, version, body, request.headers.get("inference-header-content-length"), ticket)
    except APIError as err:
        status = str(err.status)
        raise
    finally:  # the infer call in the same histogram as gRPC's ModelInfer (status: HTTP's number there)
        if e.metrics and hasattr(e.metrics, "requests"):
            e.metrics.requests.labels("http", "ModelInfer", status).observe(time.perf_counter() - t0)
