"""The HTTP API: classification, model metadata, and the Open Inference Protocol (KServe v2).

A FastAPI app mounted on the BentoML service (``service.py``); BentoML adds /readyz,
/livez, /metrics and merges these routes into its OpenAPI document (/docs.json).
Handlers are thin: each reads the request within its size limit and calls the Engine.
Errors are JSON ``{"error": message, "code": reason}`` with a 4xx status (503 with
Retry-After under overload), never a 500 for anything a client sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from .engine import APIError, Engine, decimal
from .memory import trim_memory
from .patches import runtime_info

log = logging.getLogger("cnnserve.api")

IMAGE_FIELD, IMAGES_FIELD = "image", "images"
RAW_TYPES = ("image/", "application/octet-stream")

CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD], "properties": {
        IMAGE_FIELD: {"type": "string", "format": "binary", "description": "the image file"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "raw image bytes"},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGES_FIELD], "properties": {
        IMAGES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}
V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": ["pixels"]}, "datatype": {"type": "string", "enum": ["UINT8"]},
            "shape": {"type": "array", "items": {"type": "integer"}, "example": [1, 1, 28, 28]},
            "data": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "enum": ["logits", "probabilities"]}}}}}}}}}}
TOP_K = Query(None, description="how many classes to return (default 5, at most the number of classes)")
MODEL = Query(None, description="model name (default: the first served model)")
TIMEOUT_MS = Query(None, description="deadline in milliseconds from arrival (default: the server's timeout_ms); "
                                     "a request still waiting for the model then gets 504 and is not run")
PRIORITY = Query(None, description="interactive (default; bulk for /classify/explain) or bulk: bulk requests "
                                   "fill batches after interactive ones, a slice at a time, and may take at "
                                   "most half of the queue")


async def read_body(request: Request, limit: int, idle_timeout: float) -> bytes:
    """The whole body, refusing with 413 as soon as it passes ``limit`` (Content-Length or streamed),
    with 408 when no byte arrives for ``idle_timeout`` seconds (a Content-Length never completed),
    and with 499 when the client goes away mid-body (logged in one line)."""
    declared = request.headers.get("content-length")
    length = decimal(declared)
    if declared is not None and length is None:  # (httptools refuses these before they get here)
        raise APIError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a byte count")
    if length is not None and length > limit:
        raise APIError(413, "too_large", f"the request is {length:,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    problem = None
    try:
        async with asyncio.timeout(idle_timeout) as timer:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, "too_large", f"the request passed the limit of {limit:,} bytes")
                chunks.append(chunk)
                timer.reschedule(loop.time() + idle_timeout)
    except TimeoutError:
        problem = (408, "body_timeout", f"no part of the request body arrived for {idle_timeout:g} s "
                                        f"({size:,} of {declared or 'unknown'} bytes received)",
                   {"Connection": "close"})
    except ClientDisconnect:
        problem = (499, "client_closed", f"the client closed the connection after {size:,} bytes of the body")
    if len(chunks) > 4:  # a body of many pieces: give their heap pages back once it is answered
        _trim_later(loop)
    if problem:
        raise APIError(*problem)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_trim = {"pending": False}


def _trim_later(loop, delay: float = 0.5) -> None:
    """One ``malloc_trim`` ``delay`` seconds from now (however many large bodies arrive meanwhile)."""
    if not _trim["pending"]:
        _trim["pending"] = True

        def run() -> None:
            _trim["pending"] = False
            trim_memory()

        loop.call_later(delay, run)


async def _once(data: bytes):
    yield data


async def image_files(request: Request, body: bytes, field: str, limit: int,
                      max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the uploads in ``body``: multipart ``field``, or for ``image`` a raw image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        problem = None
        try:
            form = await MultiPartParser(request.headers, _once(body), max_files=max_files + 1, max_fields=64,
                                         max_part_size=limit).parse()
        except (MultiPartException, ValueError, KeyError) as e:  # malformed multipart, too many parts
            problem = f"the multipart form could not be parsed: {e}"
        if problem:
            raise APIError(400, "bad_form", problem)
        try:
            uploads = [v for v in form.getlist(field) if hasattr(v, "read")]
            if not uploads:
                raise APIError(400, "missing_field", f"no file in form field {field!r}; fields sent: "
                                                     f"{sorted(form.keys()) or 'none'}")
            return [(u.filename or "", await u.read()) for u in uploads]
        finally:
            await form.close()
    if field == IMAGE_FIELD and any(ctype.startswith(t) for t in RAW_TYPES):
        return [("", body)]
    allowed = "multipart/form-data" + (", image/* or application/octet-stream" if field == IMAGE_FIELD else "")
    raise APIError(415, "unsupported_media_type", f"Content-Type {ctype or 'none'!r} is not accepted; send {allowed}")


def watch_disconnect(request: Request) -> asyncio.Future:
    """A future that is done once the client disconnects (or the answer is sent): the batcher skips
    a request whose client has gone. Call after the body is read."""
    return asyncio.ensure_future(request.receive())


def server_timing(timings: dict) -> str:
    """A W3C Server-Timing header value: ``decode;dur=0.412, resize;dur=0.031, ...`` (milliseconds)."""
    return ", ".join(f"{stage};dur={seconds * 1000:.3f}" for stage, seconds in timings.items())


class ClassifyParams:
    """The query parameters of ``POST /classify``, parsed by hand on the fast path (FastAPI's
    declarations, ``TOP_K`` and the others, document the same ones in the OpenAPI document)."""

    __slots__ = ("top_k", "model", "timeout_ms", "priority")
    TYPES = {"top_k": int, "model": str, "timeout_ms": float, "priority": str}

    def __init__(self, top_k=None, model=None, timeout_ms=None, priority=None) -> None:
        self.top_k, self.model, self.timeout_ms, self.priority = top_k, model, timeout_ms, priority

    @classmethod
    def parse(cls, query_string: bytes) -> "ClassifyParams":
        """From a raw query string; a value of the wrong type is a 400 ``bad_parameter`` naming it,
        as FastAPI's validation would answer (the last of repeated values counts, as in FastAPI)."""
        params = cls()
        if not query_string:
            return params
        for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            kind = cls.TYPES.get(key)
            if kind is None:
                continue  # unknown parameters are ignored, as FastAPI ignores them
            try:
                setattr(params, key, kind(value))
            except ValueError:
                what = "integer" if kind is int else "number"
                raise APIError(400, "bad_parameter", f"invalid request: query.{key}: Input should be a valid "
                                                     f"{what}, got {value[:40]!r}") from None
        return params


class CnnServeAPI(FastAPI):
    """FastAPI with one fast path: ``POST /classify`` goes from the ASGI call straight to its handler.

    Profiled under load (bench/results/2026-11-23-vm-request-cost.md), FastAPI's routing, its
    middleware stack and the dependency solving of four query parameters took about a fifth of a
    worker's time for a request whose own work is a small PNG. The fast path parses the same
    parameters with the same errors and runs the same handler (``classify_request``); every other
    route, and the OpenAPI document (which still declares ``/classify``), is FastAPI's."""

    fast_classify: Callable | None = None

    async def __call__(self, scope, receive, send) -> None:
        if (self.fast_classify is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"][len(scope.get("root_path", "")):] == "/classify"):
            return await self.fast_classify(scope, receive, send)
        return await super().__call__(scope, receive, send)


def create_app(engine: Callable[[], Engine], max_request_bytes: int, body_timeout_s: float = 10.0) -> FastAPI:
    """The API over the Engine that ``engine()`` returns (the running BentoML service's)."""
    app = CnnServeAPI(title="cnnserve", version="1", description=__doc__.split("\n\n")[0])

    def error_response(e: APIError) -> JSONResponse:
        # The traceback's frames hold the request, its body and decoded images: drop them now rather
        # than when the garbage collector next finds the cycle (a rejected image must hold no memory).
        e.__traceback__ = e.__context__ = None
        metrics = engine().metrics
        if metrics:  # the one place where refusals are counted, by reason
            metrics.rejected.labels(e.code).inc()
        if e.code == "client_closed":
            log.info("client disconnected: %s", e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return error_response(APIError(400, "bad_parameter", f"invalid request: {where}"))

    def eng() -> Engine:
        return engine()

    async def read(request: Request) -> bytes:
        return await read_body(request, max_request_bytes, body_timeout_s)

    async def one_image(request: Request, e: Engine, p: ClassifyParams, t0: float):
        """The image of a one-image request, its ticket and its timings so far (``read``); a bad model,
        top_k, deadline or priority is refused before the upload is read."""
        e.top_k(e.model(p.model), p.top_k)
        ticket = e.ticket(p.timeout_ms, p.priority, t0)
        files = await image_files(request, await read(request), IMAGE_FIELD, max_request_bytes, 1)
        ticket.gone = watch_disconnect(request)
        return files[0][1], ticket, {"read": time.perf_counter() - t0}

    def timed(response, e: Engine, model: str, timings: dict, t0: float, last: str, t: float, method=None):
        """``response`` with its Server-Timing header, the stages observed; ``last`` (the stage that
        serialises the answer) gets the time since ``t``."""
        timings[last] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        response.headers["Server-Timing"] = server_timing(timings)
        e.observe(model, timings, method)
        return response

    async def classify_request(request: Request, p: ClassifyParams) -> JSONResponse:
        t0 = time.perf_counter()
        e = eng()
        data, ticket, timings = await one_image(request, e, p, t0)
        result = await e.classify(data, p.model, p.top_k, timings, ticket)
        t = time.perf_counter()
        # serialised here, so that its time is measured
        return timed(JSONResponse(result), e, result["model"], timings, t0, "respond", t)

    async def fast_classify(scope, receive, send) -> None:
        request = Request(scope, receive)
        try:
            response = await classify_request(request, ClassifyParams.parse(scope["query_string"]))
        except APIError as e:
            response = error_response(e)
        await response(scope, receive, send)

    app.fast_classify = fast_classify

    @app.post("/classify", tags=["classification"], openapi_extra=CLASSIFY_BODY,
              summary="Classify one image (multipart field 'image', or the raw image as the body)")
    async def classify(request: Request, top_k: int | None = TOP_K, model: str | None = MODEL,
                       timeout_ms: float | None = TIMEOUT_MS, priority: str | None = PRIORITY):
        # Declared for the OpenAPI document and for an app used without the fast path; served by
        # ``fast_classify`` in the running service.
        return await classify_request(request, ClassifyParams(top_k, model, timeout_ms, priority))

    @app.post("/classify/batch", tags=["classification"], openapi_extra=BATCH_BODY,
              summary="Classify many images (multipart field 'images', repeated); per-image results in order")
    async def classify_batch(request: Request, top_k: int | None = TOP_K, model: str | None = MODEL,
                             timeout_ms: float | None = TIMEOUT_MS, priority: str | None = PRIORITY):
        t0 = time.perf_counter()
        e = eng()
        ticket = e.ticket(timeout_ms, priority, t0)
        files = await image_files(request, await read(request), IMAGES_FIELD, max_request_bytes,
                                  e.config.max_images_per_request)
        ticket.gone = watch_disconnect(request)
        return await e.classify_many(files, model, top_k, ticket)

    @app.post("/classify/explain", tags=["explanation"], openapi_extra=CLASSIFY_BODY,
              summary="Where the model looks: an occlusion or CAM sensitivity map for one image "
                      "(as JSON, or with format=png a heatmap over the image)")
    async def explain(request: Request, method: str = Query("occlusion", description="occlusion or cam"),
                      target: int | None = Query(None, description="class index to explain (default: the top one)"),
                      patch: int | None = Query(None, description="occlusion: square side in model-input pixels "
                                                                  "(default about a seventh of the input)"),
                      stride: int | None = Query(None, description="occlusion: step in model-input pixels "
                                                                   "(default half the patch)"),
                      format: str = Query("json", description="json (the map as numbers) or png (a heatmap)"),
                      top_k: int | None = TOP_K, model: str | None = MODEL,
                      timeout_ms: float | None = TIMEOUT_MS, priority: str | None = PRIORITY):
        t0 = time.perf_counter()
        e = eng()
        if format not in ("json", "png"):
            raise APIError(400, "bad_format", f"format must be json or png, got {format!r}")
        # bulk unless asked otherwise: an explanation is hundreds of images' work (service/batching.py)
        data, ticket, timings = await one_image(request, e, ClassifyParams(top_k, model, timeout_ms,
                                                                           priority or "bulk"), t0)
        result, pixels, heat = await e.explain(data, model, method, target, patch, stride, top_k, ticket, timings)
        t = time.perf_counter()
        def render() -> Response:
            if format == "png":
                from .explain import heatmap_png

                return Response(heatmap_png(pixels, heat, label=result["target"]["label"],
                                            probability=result["probability"], method=method),
                                media_type="image/png", headers={
                                    "X-Target-Index": str(result["target"]["index"]),
                                    "X-Probability": f"{result['probability']:.6f}"})
            return JSONResponse(result)

        # a 224-px map is 50,000 numbers (or a PNG to encode): tens of ms, off the event loop
        response = await anyio.to_thread.run_sync(render) if heat.size > 4096 else render()
        return timed(response, e, result["model"], timings, t0, "explain", t, method)

    @app.get("/models/{name}/samples", tags=["models"],
             summary="Held-out sample images the export embedded (one per class, at most ten), as data URLs")
    async def model_samples(name: str):
        m = eng().model(name)
        return {"model": m.name, "samples": m.samples}

    @app.get("/demo", include_in_schema=False)
    async def demo_redirect():
        return RedirectResponse("demo/")  # relative: works behind a path prefix

    # The demo page: static HTML, CSS and JavaScript in the package, over the public API only.
    app.mount("/demo/", StaticFiles(directory=Path(__file__).with_name("demo"), html=True), name="demo")

    @app.get("/models", tags=["models"], summary="The served models: spec, labels, version, providers in use")
    async def list_models():
        return {**eng().describe(), "runtime": runtime_info()}

    @app.get("/models/{name}", tags=["models"], summary="One model's metadata")
    async def get_model(name: str):
        return eng().model(name).describe()

    # -- Open Inference Protocol (KServe v2), JSON with the binary tensor extension on input ----
    v2 = ["open inference protocol (KServe v2)"]

    @app.get("/v2", tags=v2, summary="Server metadata")
    async def v2_server():
        from cnnserve import __version__

        return {"name": "cnnserve", "version": __version__, "extensions": ["binary_tensor_data"],
                "runtime": runtime_info()}

    @app.get("/v2/health/live", tags=v2, summary="Server liveness")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=v2, summary="Server readiness: every model loaded and warmed")
    async def v2_ready():
        ready = eng().ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2/models/{name}", tags=v2, summary="Model metadata: inputs and outputs with shapes and datatypes")
    @app.get("/v2/models/{name}/versions/{version}", tags=v2, include_in_schema=False)
    async def v2_model(name: str, version: str | None = None):
        return eng().v2_model_metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=v2, summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=v2, include_in_schema=False)
    async def v2_model_ready(name: str, version: str | None = None):
        m = eng().model(name, version)
        return {"name": m.name, "ready": m.warmup_ms > 0}

    @app.post("/v2/models/{name}/infer", tags=v2, openapi_extra=V2_BODY,
              summary="Inference on a uint8 N x C x H x W tensor named 'pixels'")
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=v2, include_in_schema=False)
    async def v2_infer(request: Request, name: str, version: str | None = None,
                       timeout_ms: float | None = TIMEOUT_MS, priority: str | None = PRIORITY):
        t0 = time.perf_counter()
        e = eng()
        e.model(name, version)
        ticket = e.ticket(timeout_ms, priority, t0)
        body = await read(request)
        ticket.gone = watch_disconnect(request)
        return await e.v2_infer(name, version, body, request.headers.get("inference-header-content-length"),
                                ticket)

    return app
