"""What a client sends over HTTP, read within bounds.

- **The query parameters**, declared once as pydantic models: FastAPI validates them for its routes and
  documents them in the OpenAPI document, and the ``/classify`` fast path validates the same model from the raw
  query string, so both answer a bad value with the same 400 and the same words. What a value means for a model
  (``top_k`` at most its classes, a known ``priority``) is the engine's check (``Engine.call``).
- **The body** under a size limit and an idle timeout, the uploads of a multipart form or a raw image body, and
  a future for the client's going away.

``EngineDep`` is the routes' one dependency: the worker's engine.
"""

from __future__ import annotations

import asyncio
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from .engine import Engine
from .errors import APIError, decimal
from .memory import trim_memory

IMAGE_FIELD, IMAGES_FIELD = "image", "images"
RAW_TYPES = ("image/", "application/octet-stream")


class RequestParams(BaseModel):
    """Every request that runs the model: the Open Inference Protocol's infer, and the base of the others."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    timeout_ms: float | None = Field(None, description="deadline in milliseconds from arrival (default: the "
                                     "server's timeout_ms); a request still waiting for the model then gets 504 "
                                     "and is not run")
    priority: str | None = Field(None, description="interactive (default; bulk for /classify/explain) or bulk: bulk "
                                 "requests fill batches after interactive ones, a slice at a time, and may take at "
                                 "most half of the queue")

    @classmethod
    def from_query(cls, query_string: bytes):
        """From a raw query string (the fast path): the last of repeated values counts, unknown keys are
        ignored, a bad value is the ``bad_parameter`` refusal FastAPI's validation gives (``refusal``)."""
        values = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)) if query_string else {}
        try:
            return cls.model_validate({k: v for k, v in values.items() if k in cls.model_fields})
        except ValidationError as e:
            raise refusal(e.errors(), prefix=("query",)) from None


class ClassifyParams(RequestParams):
    """``/classify`` and ``/classify/batch``."""

    top_k: int | None = Field(None, description="how many classes to return (default 5, at most the number of classes)")
    model: str | None = Field(None, description="model name (default: the first served model)")
    version: str | None = Field(None, description="a loaded version of the model (default: its newest)")
    calibrated: bool = Field(True, description="false: the raw softmax of the logits instead of the "
                             "temperature-scaled probabilities the export fitted (ood_score is the same)")


class ExplainParams(ClassifyParams):
    """``/classify/explain``: what to explain and how."""

    method: str = Field("occlusion", description="occlusion or cam")
    target: int | None = Field(None, description="class index to explain (default: the top one)")
    patch: int | None = Field(None, description="occlusion: square side in model-input pixels "
                                                "(default about a seventh of the input)")
    stride: int | None = Field(None, description="occlusion: step in model-input pixels (default half the patch)")
    format: str = Field("json", description="json (the map as numbers) or png (a heatmap)")


def refusal(errors, prefix: tuple = ()) -> APIError:
    """pydantic's or FastAPI's validation errors as one 400 naming each parameter and what was wrong."""
    where = "; ".join(f"{'.'.join(map(str, (*prefix, *err['loc'])))}: {err['msg']}" for err in errors)
    return APIError(400, "bad_parameter", f"invalid request: {where}")


def engine_of(request: Request) -> Engine:
    """The worker's engine (``service.py`` sets it once its models are loaded)."""
    return request.app.state.engine


async def _engine(request: Request) -> Engine:
    # async: FastAPI runs a plain function's dependency in a worker thread, a hop per request that took a tenth of
    # a v2 request's CPU in the peers section's profile (bench/peers/profile.py)
    return engine_of(request)


#: The one dependency of the routes that need the engine.
EngineDep = Annotated[Engine, Depends(_engine)]


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
    last = loop.time()
    try:
        async with asyncio.timeout_at(last + idle_timeout) as timer:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, "too_large", f"the request passed the limit of {limit:,} bytes")
                chunks.append(chunk)
                # the idle timer moved on at most every 50 ms: a move per chunk (and for the stream's empty
                # last one) took 1.7% of a LeNet-5 worker's samples, most bodies being one chunk at once
                now = loop.time()
                if chunk and now - last > 0.05:
                    timer.reschedule(now + idle_timeout)
                    last = now
    except TimeoutError:
        problem = (408, "body_timeout", f"no part of the request body arrived for {idle_timeout:g} s "
                                        f"({size:,} of {declared or 'unknown'} bytes received)",
                   {"Connection": "close"})
    except ClientDisconnect:
        problem = (499, "client_closed", f"the client closed the connection after {size:,} bytes of the body")
    if len(chunks) > 4:  # a body of many pieces: give their heap pages back once it is answered
        _TrimLater.schedule(loop)
    if problem:
        raise APIError(*problem)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _TrimLater:
    """At most one ``malloc_trim`` pending at a time, however many large bodies arrive meanwhile."""

    pending = False

    @classmethod
    def schedule(cls, loop, delay: float = 0.5) -> None:
        if cls.pending:
            return
        cls.pending = True

        def run() -> None:
            cls.pending = False
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
