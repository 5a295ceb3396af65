"""The Open Inference Protocol's HTTP front end (KServe v2 REST, as Triton speaks it): server and model
metadata, health, and infer requests as JSON, with the binary tensor extension, and as encoded images (a BYTES
input named ``image``). The JSON is parsed here into ``v2.Tensor``; what the tensors mean, and the engine's
work, are shared with gRPC (``v2.py``), so both protocols get the same limits and answers.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from cnnserve import __version__
from cnnserve.core import onnxmeta
from cnnserve.core.config import Settings

from .engine import Call, Engine
from .errors import APIError, decimal, json_depth, short
from .incoming import EngineDep, RequestParams, read_body, watch_disconnect
from .patches import runtime_info
from .v2 import model_ready as v2_model_ready
from .v2 import (EXTENSIONS, IMAGE_INPUT, Tensor, classification, classified, model_metadata, not_one_input,
                 output_names, outputs, priority_value, tensor_input, tighten, timeout_seconds, top_of)


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
    # nesting needs an opening bracket a level: counting them (C) spares most requests the scan (numpy's steps)
    if head.count(b"[") + head.count(b"{") > config.max_json_depth and json_depth(head) > config.max_json_depth:
        raise APIError(400, "bad_json", f"the JSON nests deeper than {config.max_json_depth} levels")
    problem = None
    try:
        if len(head) > 64 * 1024:
            req = await anyio.to_thread.run_sync(loads, head)
        else:
            req = loads(head)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers
        problem = f"the request is not valid JSON: {str(e)[:200]}"
    if problem:
        raise APIError(400, "bad_json", problem)
    if not isinstance(req, dict):
        raise APIError(400, "bad_request", "the request must be a JSON object with 'inputs'")
    return req, binary


#: A JSON array whose text is at least this long and holds only integers is read by numpy, not as Python ints.
NUMPY_ARRAY_BYTES = 4096
#: Each array read by numpy stands as an integer while the parser reads the rest: the first as this one, the
#: next ones counting down. A body whose text holds these digits anywhere is parsed plainly, so no client can
#: send one of them.
_MARK = -(10 ** 30)
_MARK_DIGITS = b"1" + b"0" * 26
_DATA = re.compile(rb'"data"[ \t\n\r]*:[ \t\n\r]*\[')


def loads(head: bytes):
    """``json.loads``, with each long array of integers that is an input's ``data`` (a UINT8 tensor's pixels)
    read by numpy: the parser's Python ints and numpy's conversion of them took 10 of the 42 CPU-ms of a
    ResNet-18 JSON request. The result is json.loads's, those arrays as int64 ndarrays. Where this reading
    cannot show that it is (a value past int64, a key given twice, an array that is not an input's data),
    json.loads reads the whole body, and says what is wrong with it."""
    if len(head) < NUMPY_ARRAY_BYTES or _MARK_DIGITS in head:
        return json.loads(head or b"{}")
    arrays, pieces, pos = [], [], 0
    for m in _DATA.finditer(head):
        # the array ends at the first "]", and before any quote: looked for up to the next quote, so that each
        # byte is scanned once however many "data" keys a client nests (the first "]" could be far after them)
        quote = head.find(b'"', m.end())
        end = head.find(b"]", m.end(), len(head) if quote < 0 else quote)
        if end - m.end() >= NUMPY_ARRAY_BYTES and m.start() >= pos:
            ints = integers(head[m.end():end])
            if ints is not None:
                pieces += [head[pos:m.end()], str(_MARK - len(arrays)).encode()]
                arrays.append(ints)
                pos = end
    if not arrays:
        return json.loads(head)
    try:
        req = json.loads(b"".join(pieces) + head[pos:])
    except (ValueError, RecursionError):
        return json.loads(head)  # its error, with the client's own positions
    inputs = req.get("inputs") if isinstance(req, dict) else None
    found = {}  # each mark's input (a mark's text is in the body once, so it is found once at most)
    for t in inputs if isinstance(inputs, list) else ():
        data = t.get("data") if isinstance(t, dict) else None
        if type(data) is list and len(data) == 1 and type(data[0]) is int and 0 <= _MARK - data[0] < len(arrays):
            found[_MARK - data[0]] = t
    if len(found) != len(arrays):  # a mark lost to a repeated key, or one that is not an input's data
        return json.loads(head)
    for i, arr in enumerate(arrays):
        found[i]["data"] = arr
    return req


def integers(text: bytes) -> np.ndarray | None:
    """The non-negative integers of an array's text between its brackets, or None where that text is not
    exactly a JSON list of them (digits, commas and JSON's white space; no empty element, no white space
    inside a number, no leading zero) or a number needs more than 18 digits."""
    compact = text.translate(None, b" \t\n\r")
    if (compact.translate(None, b"0123456789,") or not compact or compact[:1] == b"," or compact[-1:] == b","
            or b",," in compact):
        return None
    commas = compact.count(b",")
    digit = (np.frombuffer(text, np.uint8) - np.uint8(48)) < 10  # (comparisons: fancy indexing took 5x longer)
    if int(np.count_nonzero(digit[1:] > digit[:-1])) + bool(digit[0]) != commas + 1:
        return None  # white space inside a number ("1 2")
    c = np.frombuffer(compact, np.uint8)  # digits and commas only, so a digit is what is not a comma
    if c[0] == 48 and c.size > 1 and c[1] != 44 or ((c[:-2] == 44) & (c[1:-1] == 48) & (c[2:] != 44)).any():
        return None  # a leading zero
    values = np.fromstring(compact, np.int64, sep=",")
    if values.size != commas + 1 or values.max() >= 10 ** 18:
        return None
    return values


def input_of(engine: Engine, call: Call, req: dict, binary: bytes) -> np.ndarray | list[bytes]:
    """The JSON request's one input (see ``tensor_input``), with the binary tensor extension's part."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise not_one_input()
    t = inputs[0]
    tensor = Tensor(t.get("name"), t.get("datatype"), t.get("shape"), data=t.get("data"))
    size = binary_data_size(t)
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):  # (an empty tensor is refused by its shape)
            raise APIError(400, "bad_binary", f"binary_data_size {short(size)} does not fit the "
                                                 f"{len(binary)} bytes sent")
        tensor.raw = memoryview(binary)[:size]
    return tensor_input(engine, call, tensor)


def outputs_of(req: dict, num_classes: int) -> list[tuple[str, int | None]]:
    """The outputs asked for, each with its ``classification`` (how many top classes as texts, or None)."""
    wanted = req.get("outputs")
    if wanted is None:
        return [(o, None) for o in onnxmeta.OUTPUTS]
    if not isinstance(wanted, list):
        raise APIError(400, "bad_output", f"'outputs' must be a list, got {short(wanted)}")
    names = output_names([o.get("name") if isinstance(o, dict) else o for o in wanted])
    return list(zip(names, [classification(parameters(o).get("classification"), num_classes) for o in wanted]
                    or [None] * len(names)))


def parameters(part) -> dict:
    """A request's or an output's ``parameters`` object ({} without one)."""
    params = part.get("parameters") if isinstance(part, dict) else None
    if params is not None and not isinstance(params, dict):
        raise APIError(400, "bad_parameters", f"'parameters' must be an object, got {short(params)}")
    return params or {}


#: An answer of more numbers than this is serialised in a thread, not on the event loop that serves the others
#: (about a microsecond a number: 256 images of a 1,000-class model, 512,000 numbers, took 0.58 s).
INLINE_ANSWER_VALUES = 4096


async def infer(engine: Engine, call: Call, body: bytes, header_length: str | None) -> JSONResponse:
    """The answer: each output asked for once (``output_names``), so at most the N x K numbers of each of the
    model's two outputs, whatever the request says; a large one is serialised off the event loop."""
    model = call.model
    req, binary = await parse(engine.config, body, header_length)
    if "id" in req and not isinstance(req["id"], str):
        raise APIError(400, "bad_request", f"'id' must be a string, got {short(req['id'])}")
    # Triton's request parameters, as gRPC reads them (and tritonclient sends them): over the query's
    params = parameters(req)
    priority = priority_value(params.get("priority"))
    if priority is not None:
        call.ticket.priority = priority
    tighten(call.ticket, timeout_seconds(params.get("timeout")))
    pixels = input_of(engine, call, req, binary)
    wanted = outputs_of(req, model.spec.num_classes)  # refused before the model runs
    parts = await outputs(engine, call, pixels)

    def output(name: str, k: int | None) -> dict:
        part = parts[name]
        top = top_of(part, k)
        if top is not None:  # Triton's classification extension
            return {"name": name, "datatype": "BYTES", "shape": list(top.shape),
                    "data": classified(part, top, model.spec.labels)}
        return {"name": name, "datatype": "FP32", "shape": list(part.shape), "data": part.ravel().tolist()}

    def render() -> JSONResponse:
        resp = {"model_name": model.name, "model_version": model.version,
                "outputs": [output(o, k) for o, k in wanted]}
        if "id" in req:  # the protocol's id: the request's own, echoed
            resp["id"] = req["id"]
        elif call.request is not None:  # else the one its X-Request-ID header carries
            resp["id"] = call.request.id
        return JSONResponse(resp)

    if sum(parts[o].size for o, _ in wanted) > INLINE_ANSWER_VALUES:
        return await anyio.to_thread.run_sync(render)
    return render()


def binary_data_size(t: dict):
    """An Open Inference Protocol input's ``binary_data_size`` (None without the binary extension)."""
    return parameters(t).get("binary_data_size")


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
            "name": {"type": "string", "enum": list(onnxmeta.OUTPUTS)},
            "parameters": {"type": "object", "properties": {"classification": {
                "type": "integer", "minimum": 0, "description": "answer the top N classes as BYTES texts "
                "'value:index:label' (Triton's classification extension)"}}}}}},
        "parameters": {"type": "object", "properties": {
            "priority": {"type": "string", "enum": ["interactive", "bulk"], "description": "as the query's "
                         "priority (Triton's integers too: 1 interactive, 2 bulk); this one counts"},
            "timeout": {"type": "integer", "minimum": 0, "description": "deadline in microseconds from arrival, "
                        "where sooner than the query's timeout_ms"}}}}},
    # a request the default model (28 x 28 grey) answers: a blank image, its probabilities
    "example": {"inputs": [{"name": onnxmeta.INPUT, "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
                "outputs": [{"name": onnxmeta.PROBABILITIES}]}}}}}
TAGS = ["open inference protocol (KServe v2)"]
router = APIRouter(tags=TAGS)


@router.get("/v2", summary="Server metadata")
async def server_metadata():
    return {"name": "cnnserve", "version": __version__, "extensions": list(EXTENSIONS),
            "runtime": runtime_info()}


@router.get("/v2/health/live", summary="Server liveness")
async def live():
    return {"live": True}


@router.get("/v2/health/ready", summary="Server readiness: every model loaded and warmed")
async def ready(engine: EngineDep):
    ok = engine.ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}", summary="Model metadata: inputs and outputs with shapes and datatypes")
@router.get("/v2/models/{name}/versions/{version}", summary="Metadata of one loaded version")
async def get_model_metadata(name: str, engine: EngineDep, version: str | None = None):
    return model_metadata(engine, name, version)


@router.get("/v2/models/{name}/ready", summary="Model readiness")
@router.get("/v2/models/{name}/versions/{version}/ready", summary="Readiness of one loaded version")
async def model_ready(name: str, engine: EngineDep, version: str | None = None):
    name, ok = v2_model_ready(engine, name, version)
    return {"name": name, "ready": ok}


@router.post("/v2/models/{name}/infer", openapi_extra=V2_BODY,
             summary="Inference on a uint8 N x C x H x W tensor named 'pixels', or encoded images named 'image'")
async def infer_route(request: Request, p: Annotated[RequestParams, Query()], name: str, engine: EngineDep):
    # The running service answers through ``CnnServeAPI.fast`` with this same handler; FastAPI's route
    # documents it and serves an app whose fast path is off (tests/test_v2_fast.py compares the two). Two
    # routes, not one with an optional version: FastAPI reads a parameter missing from the path from the
    # query, and ?version= then chose the version here but not on the fast path (the protocol has it in
    # the path only)
    return await infer_request(request, engine, p, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=V2_BODY,
             summary="Inference on one loaded version (as /v2/models/{name}/infer)")
async def infer_version_route(request: Request, p: Annotated[RequestParams, Query()], name: str, version: str,
                              engine: EngineDep):
    return await infer_request(request, engine, p, name, version)


async def infer_request(request: Request, engine: Engine, p: RequestParams, name: str,
                        version: str | None) -> JSONResponse:
    """An infer request, from its checked query parameters and its path's model name and version."""
    t0 = time.perf_counter()
    status = "200"
    try:
        call = engine.call(name, version, timeout_ms=p.timeout_ms, priority=p.priority, start=t0)
        body = await read_body(request, engine.config.max_request_bytes, engine.config.body_timeout_s)
        if call.request is not None:
            call.request.mark("read")
        call.ticket.gone = watch_disconnect(request)
        return await infer(engine, call, body, request.headers.get("inference-header-content-length"))
    except APIError as err:
        status = str(err.status)
        raise
    except Exception:  # answered as a 500 by the app's handler
        status = "500"
        raise
    finally:  # the infer call in the same histogram as gRPC's ModelInfer (status: HTTP's number there)
        if engine.metrics and hasattr(engine.metrics, "requests"):
            requests = engine.metrics.requests
            child = _REQUESTS.get((requests, status))
            if child is None:  # a labelled child once per status: labels() takes a lock and builds a tuple
                child = _REQUESTS[requests, status] = requests.labels("http", "ModelInfer", status)
            child.observe(time.perf_counter() - t0)


_REQUESTS: dict = {}  # (histogram, status): its child


#: The two infer routes' paths as Starlette matches them (``{name}``: one segment of the percent-decoded path,
#: ``$`` as its compiled route has it), for the fast path.
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


def infer_target(route_path: str) -> tuple[str, str | None] | None:
    """(name, version) where ``route_path`` (the path less the root path) is an infer route's, else None."""
    m = INFER_PATH.match(route_path)
    return None if m is None else (m["name"], m["version"])
