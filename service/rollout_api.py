"""The routes of a rollout on live traffic (``rollout.py``, docs/rollout.md): a client's label for an answer, and
the control requests that start a canary or a shadow, promote a candidate and roll back.

``POST /v2/models/{name}/feedback``: a client's label for an answer it got, joined on the answer's request id
(``X-Request-ID``) in the server's rollout file (``rollout.py``), whichever worker answered.

The body is ``{"id": REQUEST_ID, "label": CLASS}`` (``label``: a class name of the model, or its index;
``"index": i`` for the i-th image of a batch request). 200 names the version that answered and whether it was right;
404 when the id is not among the model's last ``feedback_ring`` answers (the ring is the server's: a replica keeps
its own, so feedback must reach the replica that answered); 400 for a label that is not a class of the model, or an
id no answer can carry.
"""

from __future__ import annotations

import asyncio
import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .engine import Engine
from .errors import APIError, short
from .modelstate import stored_file
from .incoming import engine_of
from .registry import LoadFailed
from .repository import _json_body, answer, control_request, json_body, settle
from .telemetry import sane_id

router = APIRouter(tags=["rollout"])

BODY = _json_body({"id": {"type": "string", "description": "the answer's request id (its X-Request-ID)"},
                   "label": {"description": "the true class: a class name of the model, or its index"},
                   "index": {"type": "integer", "description": "the image's index in a batch request (default 0)"}},
                  "the answer's id and its true class")


def class_index(label, labels: list[str], model: str) -> int:
    """The class ``label`` names (a class name of the model, or an index); 400 naming the allowed form."""
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    shown = ", ".join(repr(c) for c in labels[:10]) + (", ..." if len(labels) > 10 else "")
    raise APIError(400, "bad_label", f"label must be a class name of model {model!r} ({shown}) or an index from 0 to "
                                     f"{len(labels) - 1}, got {short(label)}")


@router.post("/v2/models/{name}/feedback", openapi_extra=BODY,
             summary="Label an answer (by its request id) for the online accuracy of the version that answered")
async def feedback(request: Request, name: str):
    engine = engine_of(request)
    rollout = engine.rollout
    if rollout is None:
        raise APIError(409, "no_rollout", "this engine runs without the server's shared state: no feedback")
    req = await json_body(request)
    rid, index = req.get("id"), req.get("index", 0)
    # only an id an answer can carry (telemetry.sane_id): any other string (a lone surrogate, which SQLite cannot
    # encode, included) names no answer
    if not isinstance(rid, str) or sane_id(rid) != rid:
        raise APIError(400, "bad_id", f"'id' must be the request id of an answer (its X-Request-ID), got {short(rid)}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < engine.config.max_images_per_request:
        raise APIError(400, "bad_index", f"'index' must be an image's index in its request, got {short(index)}")
    served = engine.registry.served.get(name)
    if not served:
        raise APIError(404, "unknown_model", f"no model named {short(name)}; serving: "
                       f"{', '.join(engine.registry.served)}")
    labels = list(served[-1].model.spec.labels)
    label = class_index(req.get("label"), labels, name)

    found = await anyio.to_thread.run_sync(_answer, rollout, name, rid, index)
    # another worker may have answered it and not flushed yet: it does every model_sync_s
    deadline = time.monotonic() + 2 * engine.config.model_sync_s + 0.5
    while found is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        found = await anyio.to_thread.run_sync(rollout.store.answer, name, rid, index)
    if found is None:
        raise APIError(404, "unknown_answer", f"no answer {short(rid)} (image {index}) among the last "
                       f"{rollout.store.ring} answers of model {name!r} this server keeps (feedback_ring)")
    version, top1 = found
    version_labels = next((list(s.model.spec.labels) for s in served if s.model.version == version), labels)
    if version_labels != labels:  # the version that answered has classes of its own
        label = class_index(req.get("label"), version_labels, f"{name}:{version}")
    await anyio.to_thread.run_sync(rollout.store.label, name, rid, index, version, top1, label)
    return JSONResponse({"id": rid, "index": index, "model": name, "version": version,
                         "predicted": version_labels[top1] if top1 < len(version_labels) else top1,
                         "label": version_labels[label], "correct": top1 == label})


def _answer(rollout, name: str, rid: str, index: int):
    rollout.flush()  # this worker's answers first: the likely one
    return rollout.store.answer(name, rid, index)


def figures(engine, name: str) -> dict | None:
    """The rollout figures of ``name`` for ``/models/NAME/monitor`` (``Store.figures`` with class names), or None
    without a rollout."""
    rollout = engine.rollout
    if rollout is None:
        return None
    f = rollout.store.figures(name)
    served = engine.registry.served.get(name)
    labels = list(served[-1].model.spec.labels) if served else []
    for v in f["versions"].values():
        for c in v["confusion"]:
            for k in ("label", "predicted"):
                if c[k] < len(labels):
                    c[k] = labels[c[k]]
    return {**f, "routes": rollout.routes.get(name, {})}


# -- rollout on live traffic: canary, shadow, promote, rollback (rollout.py, docs/rollout.md) ----------------------

CANARY_BODY = _json_body({"parameters": {"type": "object", "properties": {"percent": {
    "type": "number", "description": "the share (0-100) of requests naming no version sent to NAME:VERSION; 0 ends"}}}},
    "the share")
SHADOW_BODY = _json_body({"parameters": {"type": "object", "properties": {"rate": {
    "type": "number", "description": "the share (0-1) of the primary's requests run again on NAME:VERSION; 0 ends"}}}},
    "the rate")
PROMOTE_BODY = _json_body({"parameters": {"type": "object", "properties": {
    "min_agreement": {"type": "number", "description": "the shadow's top-1 agreement at least (default 0.98)"},
    "min_labelled": {"type": "integer", "description": "the candidate's labelled answers at least (default 200)"},
    "min_accuracy_gain": {"type": "number", "description": "its accuracy at least the primary's plus this (0)"}}}},
    "optional thresholds")


def _number(params: dict, key: str, low: float, high: float, default: float | None = None) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, "bad_parameters", f"'{key}' must be a number from {low:g} to {high:g}, got {short(value)}")
    return float(value)


def _rollout_of(sync) -> None:
    if sync is None:
        raise APIError(409, "no_rollout", "this engine runs without the server's shared state: no rollout")


@router.post("/v2/repository/models/{name}/canary", openapi_extra=CANARY_BODY,
             summary="Send a share of the requests that name no version to NAME:VERSION, loaded beside the served one")
async def canary(request: Request, name: str):
    name, version, params, engine, sync = await control_request(request, name)
    return answer(await route_model(engine, sync, name, version, "canary", _number(params, "percent", 0, 100)))


@router.post("/v2/repository/models/{name}/shadow", openapi_extra=SHADOW_BODY,
             summary="Run a sample of the served version's requests again on NAME:VERSION and compare (no client sees "
                     "its answers)")
async def shadow(request: Request, name: str):
    name, version, params, engine, sync = await control_request(request, name)
    return answer(await route_model(engine, sync, name, version, "shadow", _number(params, "rate", 0, 1)))


async def route_model(engine: Engine, sync, name: str, version: str, kind: str, value: float) -> list[dict] | None:
    """A canary or shadow of ``name:version``: loaded here first (a failure answered at once), recorded in the set
    every worker shares, then ``settle``'s answer."""
    _rollout_of(sync)
    if value and not version:
        raise APIError(400, "bad_tag", f"name the candidate: {short(name)}:VERSION")

    def do() -> tuple[int, dict, str]:
        resolved = version
        if value:
            resolved, path = stored_file(name, version)
            served = engine.registry.loaded().get(name, [])
            if served and served[-1] != resolved:  # the served version itself is refused by record_route
                engine.registry.load(name, resolved, path, newest=False)
        return (*sync.record_route(name, kind, resolved, value), resolved)

    try:
        generation, before, resolved = await anyio.to_thread.run_sync(do)
    except LoadFailed as err:
        raise APIError(err.status, f"{kind}_failed", str(err)) from None
    return await settle(engine, sync, generation, name, f"{name}:{resolved}" if value else None, before)


@router.post("/v2/repository/models/{name}/promote", openapi_extra=PROMOTE_BODY,
             summary="Make the candidate (NAME:VERSION, or the one of the canary or shadow) the served version, only "
                     "if its measured figures pass the thresholds; 409 says which failed")
async def promote(request: Request, name: str):
    from .rollout import candidate_figures, promotion_failures

    name, version, params, engine, sync = await control_request(request, name)
    _rollout_of(sync)
    thresholds = (_number(params, "min_agreement", 0, 1, 0.98), int(_number(params, "min_labelled", 0, 1e9, 200)),
                  _number(params, "min_accuracy_gain", -1, 1, 0.0))
    desired = sync.state.read() or {}
    have = desired.get("models", {}).get(name)
    route = desired.get("routes", {}).get(name, {})
    if not version:
        version = next((route[k]["version"] for k in ("canary", "shadow") if route.get(k)), "")
    if not have or not version or version == have[-1] or version not in have:
        raise APIError(409, "promote_failed", f"{short(name)}{':' + short(version) if version else ''} is not a "
                       "candidate loaded beside the served version: start a canary or shadow of it first")

    def measure() -> dict:
        sync.rollout.flush()  # this worker's answers; the others flush theirs every model_sync_s
        return candidate_figures(sync.rollout.store.figures(name), have[-1], version)

    figures = await anyio.to_thread.run_sync(measure)
    failed = promotion_failures(figures, *thresholds)
    if failed:
        return JSONResponse({"error": f"{name}:{version} not promoted: " + "; ".join(failed), "code": "promote_refused",
                             "failed": failed, "figures": figures}, status_code=409)
    try:
        generation, before = await anyio.to_thread.run_sync(sync.record_promote, name, version)
    except LoadFailed as err:
        raise APIError(err.status, "promote_failed", str(err)) from None
    pending = await settle(engine, sync, generation, name, f"{name}:{version}", before)
    if pending is not None:
        return answer(pending)
    return JSONResponse({"promoted": version, "previous": have[-1], "figures": figures})


@router.post("/v2/repository/models/{name}/rollback",
             summary="Back to the version served before the last promote (kept loaded), or end a canary and shadow")
async def rollback(request: Request, name: str):
    name, _, _, engine, sync = await control_request(request, name)
    _rollout_of(sync)
    try:
        generation, before, served = await anyio.to_thread.run_sync(sync.record_rollback, name)
    except LoadFailed as err:
        raise APIError(err.status, "rollback_failed", str(err)) from None
    pending = await settle(engine, sync, generation, name, f"{name}:{served}", before)
    return answer(pending) if pending is not None else JSONResponse({"serving": served})
