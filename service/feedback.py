"""``POST /v2/models/{name}/feedback``: a client's label for an answer it got, joined on the answer's request id
(``X-Request-ID``) in the server's rollout file (``rollout.py``), whichever worker answered.

The body is ``{"id": REQUEST_ID, "label": CLASS}`` (``label``: a class name of the model, or its index;
``"index": i`` for the i-th image of a batch request). 200 names the version that answered and whether it was right;
404 when the id is not among the model's last ``feedback_ring`` answers (the ring is the server's: a replica keeps
its own, so feedback must reach the replica that answered); 400 for a label that is not a class of the model.
"""

from __future__ import annotations

import asyncio
import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError, short
from .params import engine_of
from .repository import json_body, _json_body

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
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:  # the longest id an answer carries (telemetry.py)
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
