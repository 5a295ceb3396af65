"""The HTTP API: classification, explanations and model metadata (the Open Inference Protocol's routes are
in ``kserve.py``, the protocol itself in ``v2.py``).

A FastAPI app mounted on the BentoML service (``service.py``); BentoML adds /readyz, /livez, /metrics and
merges these routes into its OpenAPI document (/docs.json). Routes are thin: each checks its parameters
into a ``Call`` (``Engine.call``), reads the request within its size limit and hands both to the engine
(the ``EngineDep`` dependency: what ``service.py`` put in ``app.state.engine``). Query parameters are the
pydantic models of ``incoming.py``; the routes of each module are a FastAPI ``APIRouter``. Errors are JSON
``{"error": message, "code": reason}`` with a 4xx status (503 with Retry-After under overload), never a 500
for anything a client sends.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from cnnserve.core.confidence import NotFinite

from . import apikeys, kserve, repository, rollout_api, telemetry, triton
from .engine import Engine
from .errors import ANSWERED, APIError, model_output_not_finite, routing_error
from .explain import explain_image, heatmap_png
from .incoming import (IMAGE_FIELD, IMAGES_FIELD, ClassifyParams, EngineDep, ExplainParams, RequestParams, engine_of,
                       image_files, read_body, refusal, watch_disconnect)
from .patches import runtime_info
from .registry import request_scope

log = logging.getLogger("cnnserve.api")

CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD], "properties": {
        IMAGE_FIELD: {"type": "string", "format": "binary", "description": "the image file"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "raw image bytes"},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGES_FIELD], "properties": {
        IMAGES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

router = APIRouter()


def internal_error(app, request: Request, e: Exception) -> JSONResponse:
    """A JSON 500 at once for an error nothing expected (a bug, a library's failure), logged here with its
    traceback, once: the exception is marked, so ``CnnServeAPI`` does not pass it on for the server to log
    again. Its words stay in the log; the client learns its type only."""
    log.error("%s %s failed (request %s): %s: %s", request.method, request.url.path, telemetry.current_id(),
              type(e).__name__, e, exc_info=e)
    setattr(e, ANSWERED, True)
    return error_response(app, APIError(500, "internal", f"the server failed on this request ({type(e).__name__}); "
                                                         "the error is in its log"))


def not_finite(app, request: Request, e: NotFinite) -> JSONResponse:
    """The model answered NaN or infinity: a 500 naming the model the request asked for."""
    engine = engine_of(request)
    name = request.query_params.get("model") or (engine.registry.default if engine else "?")
    log.error("model %r answered NaN or infinity for %s %s (rows %s)", name, request.method, request.url.path,
              e.rows[:10])
    # (its rows are those the model ran: for an explanation, the image and its occluded copies)
    return error_response(app, model_output_not_finite(name, request.query_params.get("version")))


def error_response(app, e: APIError) -> JSONResponse:
    # The traceback's frames hold the request, its body and decoded images: drop them now rather
    # than when the garbage collector next finds the cycle (a rejected image must hold no memory).
    e.__traceback__ = e.__context__ = None
    engine = getattr(app.state, "engine", None)
    if engine is not None and engine.metrics:  # the one place where refusals are counted, by reason
        engine.metrics.rejected.labels(e.code, "http").inc()
    if e.code == "client_closed":
        log.info("client disconnected: %s", e.message)
    record = telemetry.current()
    if record is None:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    record.code = e.code  # for its access line and trace
    return JSONResponse(e.body(record.id), status_code=e.status, headers=e.headers)


def server_timing(timings: dict) -> str:
    """A W3C Server-Timing header value: ``decode;dur=0.412, resize;dur=0.031, ...`` (milliseconds)."""
    return ", ".join(f"{stage};dur={seconds * 1000:.3f}" for stage, seconds in timings.items())


async def read(request: Request) -> bytes:
    config = engine_of(request).config
    return await read_body(request, config.max_request_bytes, config.body_timeout_s)


async def one_image(request: Request, engine: Engine, p: ClassifyParams, t0: float, priority: str | None = None):
    """A one-image request's ``Call``, its image and its timings so far (``read``); a bad model, top_k, deadline
    or priority is refused before the upload is read."""
    call = engine.call(p.model, p.version, p.top_k, p.timeout_ms, priority or p.priority, p.calibrated, t0)
    files = await image_files(request, await read(request), IMAGE_FIELD, engine.config.max_request_bytes, 1)
    call.ticket.gone = watch_disconnect(request)
    return call, files[0][1], {"read": time.perf_counter() - t0}


def timed(response, engine: Engine, model: str, timings: dict, t0: float, last: str, t: float, method=None):
    """``response`` with its Server-Timing header, the stages observed; ``last`` (the stage that
    serialises the answer) gets the time since ``t``."""
    timings[last] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    response.headers["Server-Timing"] = server_timing(timings)
    record = telemetry.current()
    if record is not None:
        record.timings = timings
    engine.observe(model, timings, method)
    return response


async def classify_request(request: Request, p: ClassifyParams) -> JSONResponse:
    t0 = time.perf_counter()
    engine = engine_of(request)
    call, data, timings = await one_image(request, engine, p, t0)
    result = await engine.classify(call, data, timings)
    t = time.perf_counter()
    # serialised here, so that its time is measured
    return timed(JSONResponse(result), engine, result["model"], timings, t0, "respond", t)


@router.post("/classify", tags=["classification"], openapi_extra=CLASSIFY_BODY,
             summary="Classify one image (multipart field 'image', or the raw image as the body)")
async def classify(request: Request, p: Annotated[ClassifyParams, Query()]):
    # The running service answers through ``CnnServeAPI.fast`` with this same handler; FastAPI's
    # route documents it and serves an app whose fast path is off (the test compares the two).
    return await classify_request(request, p)


@router.post("/classify/batch", tags=["classification"], openapi_extra=BATCH_BODY,
             summary="Classify many images (multipart field 'images', repeated); per-image results in order")
async def classify_batch(request: Request, p: Annotated[ClassifyParams, Query()], engine: EngineDep):
    call = engine.call(p.model, p.version, p.top_k, p.timeout_ms, p.priority, p.calibrated, time.perf_counter())
    files = await image_files(request, await read(request), IMAGES_FIELD, engine.config.max_request_bytes,
                              engine.config.max_images_per_request)
    if call.request is not None:
        call.request.mark("read")
    call.ticket.gone = watch_disconnect(request)
    return await engine.classify_many(call, files)


@router.post("/classify/explain", tags=["explanation"], openapi_extra=CLASSIFY_BODY,
             summary="Where the model looks: an occlusion or CAM sensitivity map for one image "
                     "(as JSON, or with format=png a heatmap over the image)")
async def explain(request: Request, p: Annotated[ExplainParams, Query()], engine: EngineDep):
    t0 = time.perf_counter()
    if p.format not in ("json", "png"):
        raise APIError(400, "bad_format", f"format must be json or png, got {p.format!r}")
    # bulk unless asked otherwise: an explanation is hundreds of images' work (service/batching.py)
    call, data, timings = await one_image(request, engine, p, t0, priority=p.priority or "bulk")
    result, pixels, heat = await explain_image(engine, call, data, p.method, p.target, p.patch, p.stride, timings)
    if not np.isfinite(heat).all():  # CAM's feature maps can hold NaN where the logits do not
        raise NotFinite([0])
    t = time.perf_counter()

    def render() -> Response:
        if p.format == "png":
            return Response(heatmap_png(pixels, heat, label=result["target"]["label"],
                                        probability=result["probability"], method=p.method),
                            media_type="image/png", headers={
                                "X-Target-Index": str(result["target"]["index"]),
                                "X-Probability": f"{result['probability']:.6f}"})
        return JSONResponse(result)

    # a 224-px map is 50,000 numbers (or a PNG to encode): tens of ms, off the event loop
    response = await anyio.to_thread.run_sync(render) if heat.size > 4096 else render()
    return timed(response, engine, result["model"], timings, t0, "explain", t, p.method)


@router.get("/models/{name}/samples", tags=["models"],
            summary="Held-out sample images the export embedded (one per class, at most ten), as data URLs")
async def model_samples(name: str, engine: EngineDep):
    m = engine.model(name)
    return {"model": m.name, "samples": m.samples}


@router.get("/demo", include_in_schema=False)
async def demo_redirect():
    return RedirectResponse("demo/")  # relative: works behind a path prefix


@router.get("/models", tags=["models"], summary="The served models: spec, labels, version, providers in use")
async def list_models(engine: EngineDep):
    return {**engine.describe(), "runtime": runtime_info()}


@router.get("/models/{name}/monitor", tags=["models"],
            summary="Drift: the recent answers' class mix against the test split's (PSI), OOD rate, mean top-1")
async def model_monitor(name: str, engine: EngineDep):
    model = engine.model(name)
    if engine.monitor is None:
        raise APIError(404, "monitor_off", "the drift monitor is off in this server (drift_monitor=false)")
    rollout = await anyio.to_thread.run_sync(rollout_api.figures, engine, model.name)  # labels, shadow (rollout.md)
    # the version this request holds: one view, whatever is swapped meanwhile
    return {**engine.monitor.snapshot(model), "rollout": rollout}


@router.get("/models/{name}", tags=["models"], summary="One model's metadata")
async def get_model(name: str, engine: EngineDep):
    return engine.model(name).describe()


class CnnServeAPI(FastAPI):
    """FastAPI with fast paths: ``POST /classify`` and the Open Inference Protocol's ``POST .../infer`` go from
    the ASGI call straight to their handlers.

    Profiled under load (bench/results/2026-11-23-vm-request-cost.md), FastAPI's routing, its
    middleware stack and the dependency solving of four query parameters took about a fifth of a
    worker's time for a request whose own work is a small PNG. The fast path validates the same
    parameter model (``incoming.py``) and runs the same handler (``classify_request``); the v2 infer
    route's dependencies took a fifth of its CPU (bench/results/2026-12-07-vm-peers-profile.md) and its
    fast path runs ``kserve.infer_request``. Every other route, and the OpenAPI document, is FastAPI's."""

    fast_path = True
    #: ``apikeys.APIKeys`` where the server has a keys file (``api_keys_file``): the inference routes need a key
    api_keys = None

    async def __call__(self, scope, receive, send, handler=None) -> None:
        """``handler``: the request's fast-path handler where the caller found it (``http_server.FastPaths``)."""
        # (a request's id, access line and trace are the server's middleware's: telemetry.RequestTelemetry)
        if self.api_keys is not None and scope["type"] == "http" and self.protected(scope):
            refusal = self.unauthorized(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        with request_scope():  # the models a request looks up stay loaded until it is answered (registry.py)
            handler = handler or self.fast_handler(scope)
            if handler is not None:
                return await self.fast(scope, receive, send, handler)
            try:
                return await super().__call__(scope, receive, send)
            except Exception as e:
                # Starlette answers an unexpected error with the handler below, then raises it again for the
                # server to log: it is logged already, with its traceback
                if not getattr(e, ANSWERED, False):
                    raise

    def fast_handler(self, scope):
        """The handler of a request this app answers on its fast path (``http_server.FastPaths`` sends those
        here past BentoML's router), else None."""
        if self.fast_path and scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"][len(scope.get("root_path", "")):]
            if path == "/classify":
                return self.classify_handler
            target = kserve.infer_target(path)  # the Open Inference Protocol's infer (kserve.py)
            if target is not None:
                return self.infer_handler(*target)
        return None

    @staticmethod
    def protected(scope) -> bool:
        """Whether the path is an inference route's as the router matches it: with or without the root path, and
        less the one final newline (``%0A``) that a route's ``$`` lets through (it once bypassed the key)."""
        path = scope["path"].removesuffix("\n")
        return apikeys.protected(path) or apikeys.protected(path[len(scope.get("root_path", "")):])

    def unauthorized(self, scope) -> JSONResponse | None:
        """401 for a request to an inference route without a key the keys file holds; None (counted under the
        key's name) for one with."""
        headers = dict(scope.get("headers", ()))
        sent = apikeys.presented(headers.get(b"authorization", b"").decode("latin-1"),
                                 headers.get(b"x-api-key", b"").decode("latin-1"))
        name = self.api_keys.identify(sent)
        engine = getattr(self.state, "engine", None)
        metrics = getattr(engine, "metrics", None)
        if name is None:
            return error_response(self, APIError(
                401, "unauthorized", "this endpoint needs an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
                + (" (the key sent is not one this server holds)" if sent else ""), {"WWW-Authenticate": "Bearer"}))
        if metrics and hasattr(metrics, "api_key_requests"):
            metrics.api_key_requests.labels(name, "http").inc()
        record = telemetry.current()
        if record is not None:
            record.api_key = name  # for the access line
        return None

    @staticmethod
    async def classify_handler(request: Request) -> Response:
        return await classify_request(request, ClassifyParams.from_query(request.scope["query_string"]))

    @staticmethod
    def infer_handler(name: str, version: str | None):
        async def handler(request: Request) -> Response:
            p = RequestParams.from_query(request.scope["query_string"])  # as FastAPI checks it: before the engine
            return await kserve.infer_request(request, engine_of(request), p, name, version)
        return handler

    async def fast(self, scope, receive, send, handler) -> None:
        """``handler``'s answer, the same as FastAPI's route gives, errors included: an ``APIError`` as its JSON,
        anything else a JSON 500 at once (it once went unanswered until BentoML's 60 s timeout)."""
        scope["app"] = self  # as Starlette sets it, for request.app
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except APIError as e:
            response = error_response(self, e)
        except NotFinite as e:
            response = not_finite(self, request, e)
        except Exception as e:  # noqa: BLE001 - answered, and logged once with its traceback
            response = internal_error(self, request, e)
        await response(scope, receive, send)


def create_app(engine: Engine | None = None) -> CnnServeAPI:
    """The API; ``service.py`` sets ``app.state.engine`` once its worker has loaded the models (or pass one)."""
    app = CnnServeAPI(title="cnnserve", version="1", description=__doc__.split("\n\n")[0])
    app.state.engine = engine
    app.state.sync = None  # the worker's share in the served set (service.py; workers.py)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(request.app, e)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request, e: RequestValidationError):
        return error_response(request.app, refusal(e.errors()))

    @app.exception_handler(NotFinite)
    async def model_not_finite(request, e: NotFinite):
        return not_finite(request.app, request, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        """Starlette's own refusals (a path no route has, a method the path does not take, a static file that
        is not there) in the service's JSON shape: tritonclient reads ``error``, and could not parse
        FastAPI's ``{"detail": ...}`` or Starlette's plain text."""
        return error_response(request.app, routing_error(request.method, request.url.path, e.status_code,
                                                         e.detail, e.headers))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return internal_error(request.app, request, e)

    # Triton's extensions first: /v2/models/stats before kserve's /v2/models/{name}
    for routes in (router, triton.router, kserve.router, repository.router, rollout_api.router):
        app.include_router(routes)
    # The demo page: static HTML, CSS and JavaScript in the package, over the public API only.
    app.mount("/demo/", StaticFiles(directory=Path(__file__).with_name("demo"), html=True), name="demo")
    return app
