"""The query parameters of the HTTP routes, declared once as pydantic models: FastAPI validates them for its
routes and documents them in the OpenAPI document, and the ``/classify`` fast path validates the same model
from the raw query string, so both answer a bad value with the same 400 and the same words. What a value
means for a model (``top_k`` at most its classes, a known ``priority``) is the engine's check (``Engine.call``).
``EngineDep`` is the routes' one dependency: the worker's engine.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import Engine
from .errors import APIError


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
