"""The model repository extension of the Open Inference Protocol (as Triton speaks it), over HTTP:
``POST /v2/repository/index`` (every model in the store that could be served, and its state),
``POST /v2/repository/models/{name}/load`` and ``.../unload``. ``tritonclient.http``'s
``get_model_repository_index``, ``load_model`` and ``unload_model`` work unchanged.

**Safe by default.** Load and unload are refused (403) unless the server runs with
``--arg model_control=true``, and then need ``Authorization: Bearer TOKEN``, the token read from the
environment variable ``control_token_env`` names or the file ``control_token_file`` (read at each
request, so it can be rotated). The index, readiness and metadata stay open.

A load (``NAME``, ``NAME:VERSION``, or ``{"parameters": {"version": V}}``; ``"default": true`` makes it the
model requests without a name go to) is done in the worker that got the request first, so a failure is
answered with its reason while the old version keeps serving; then the served set that every worker shares
is changed (``modelstate.py``) and the answer waits for every worker to report it (200), answers a worker's
refusal with its status after undoing the change (``WorkerSync.roll_back``), or says 202 after
``control_wait_s`` (the index then tells when all are READY). An unload is decided against the shared set
(``WorkerSync.record_unload``: never the last model), then applied by every worker.

Names and versions are BentoML's tags, checked before the store is asked (400 ``bad_tag``) and spelled as
the store spells them (lowercase), so ``LENET5-DIGITS`` is ``lenet5-digits``, not a second model. The index
reads the store once per change of its folders (``stored_versions``), not per call: it is open to anyone.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import threading
import time
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .engine import Engine
from .errors import APIError, json_depth, short
from .incoming import engine_of, read_body
from .modelstate import stored_file
from .registry import LoadFailed

TAGS = ["model repository (Open Inference Protocol extension)"]
router = APIRouter(tags=TAGS)
MAX_BODY = 64 * 1024


def _json_body(properties: dict, description: str) -> dict:
    """The OpenAPI body of a route whose handler reads its JSON itself (``json_body``): FastAPI cannot see it, so
    without this the document, and the clients and fuzzers that read it, would not know the route takes one."""
    return {"requestBody": {"required": False, "description": description, "content": {"application/json": {
        "schema": {"type": "object", "properties": properties}}}}}


_VERSION = {"type": "string", "description": "a stored version (else NAME:VERSION in the path, or the newest)"}
INDEX_BODY = _json_body({"ready": {"type": "boolean", "description": "true: only the versions every worker serves"}},
                        "optional; an empty body lists every stored version")
LOAD_BODY = _json_body({"parameters": {"type": "object", "properties": {
    "version": _VERSION,
    "default": {"type": "boolean", "description": "also make it the model requests without one go to"}}}}, "optional")
UNLOAD_BODY = _json_body({"parameters": {"type": "object", "properties": {"version": _VERSION}}},
                         "optional; without a version every version is unloaded")


def control_token(config) -> str | None:
    if config.control_token_file:
        try:
            with open(config.control_token_file) as f:
                return f.read().strip() or None
        except OSError:
            return None
    return os.environ.get(config.control_token_env) or None


def authorize(request: Request) -> None:
    """403 unless model control is on and the request carries its bearer token."""
    check_token(engine_of(request).config, request.headers.get("authorization", ""))


def check_token(config, sent: str) -> None:
    """403 unless model control is on and ``sent`` (an ``Authorization`` header, or gRPC's metadata of that name)
    is ``Bearer TOKEN`` with the server's token, compared in constant time."""
    if not config.model_control:
        raise APIError(403, "control_disabled", "loading and unloading models is off on this server "
                                                "(start it with --arg model_control=true and a token)")
    token = control_token(config)
    if token is None:
        raise APIError(403, "no_control_token", f"model_control is on but no token is set: put one in the "
                       f"environment variable {config.control_token_env} or the file control_token_file names")
    if not hmac.compare_digest(sent.encode("latin-1", "replace"), f"Bearer {token}".encode()):
        raise APIError(403, "forbidden", "this endpoint needs 'Authorization: Bearer TOKEN' with the server's "
                                         "model control token")


async def json_body(request: Request) -> dict:
    body = await read_body(request, MAX_BODY, engine_of(request).config.body_timeout_s)
    config = engine_of(request).config
    if json_depth(body) > config.max_json_depth:
        raise APIError(400, "bad_json", f"the JSON nests deeper than {config.max_json_depth} levels")
    problem = None
    try:
        req = json.loads(body or b"{}")
    except (ValueError, RecursionError) as e:
        problem = f"the request is not valid JSON: {str(e)[:200]}"
    if problem:
        raise APIError(400, "bad_json", problem)
    if not isinstance(req, dict):
        raise APIError(400, "bad_request", f"the request must be a JSON object, got {short(req)}")
    params = req.get("parameters", {})
    if not isinstance(params, dict):
        raise APIError(400, "bad_parameters", f"'parameters' must be an object, got {short(params)}")
    return req


#: A name or version BentoML's store can hold (``bentoml._internal.tag``), once lowercased as the store does.
TAG, TAG_MAX = re.compile(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?"), 63


def split_tag(name: str, params: dict) -> tuple[str, str]:
    """The model's name and version (``NAME:VERSION`` or the ``version`` parameter; empty: its newest), as the
    store spells them; 400 for anything that is not a tag."""
    name, colon, version = name.partition(":")
    given = params.get("version")
    if given is not None and not isinstance(given, str):
        raise APIError(400, "bad_parameters", f"'version' must be a string, got {short(given)}")
    if colon and not version:
        raise APIError(400, "bad_tag", f"{short(name + ':')} names no version after the colon")
    if version and given and version.lower() != given.lower():
        raise APIError(400, "bad_tag", f"the tag names version {short(version)} and the parameters "
                                       f"{short(given)}: name one")
    name, version = name.lower(), (version or given or "").lower()
    for what, value in (("name", name), ("version", version)):
        if (value or what == "name") and (len(value) > TAG_MAX or not TAG.fullmatch(value)):
            raise APIError(400, "bad_tag", f"model {what} {short(value)} is not a tag of BentoML's store: lowercase "
                           f"letters, digits, '-', '.' and '_', at most {TAG_MAX} characters, beginning and ending "
                           "with a letter or digit")
    return name, version


async def control_request(request: Request, name: str) -> tuple[str, str, dict, Engine, object]:
    """A load or unload request, authorized and read: the model's name and version (``NAME:VERSION`` or the
    ``version`` parameter), its parameters, the engine and this worker's share in the served set
    (``WorkerSync`` or None)."""
    authorize(request)
    req = await json_body(request)
    params = req.get("parameters", {})
    name, version = split_tag(name, params)
    return name, version, params, engine_of(request), request.app.state.sync


#: The store's listing, read again when one of its folders changed (a version stored or deleted) or after
#: ``STORE_TTL_S`` (a store whose folders cannot be watched); one reader at a time.
STORE_TTL_S = 30.0
_store = {"stamp": None, "at": float("-inf"), "rows": []}
_store_lock = threading.Lock()


def _store_stamp():
    """What changes when a version is stored or deleted: the mtimes of the store's folder and of each model's."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "models"
    try:
        with os.scandir(home) as entries:
            return home.stat().st_mtime_ns, tuple(sorted((e.name, e.stat().st_mtime_ns) for e in entries
                                                         if e.is_dir(follow_symlinks=False)))
    except OSError:
        return None


def stored_versions() -> list[tuple[str, str]]:
    """Every cnnserve model version in the store, as (name, version), oldest first per name."""
    import bentoml

    with _store_lock:
        stamp, now = _store_stamp(), time.monotonic()
        if stamp is None or stamp != _store["stamp"] or now - _store["at"] > STORE_TTL_S:
            listed = sorted((s for s in bentoml.models.list() if s.info.module == "cnnserve"),
                            key=lambda s: (s.tag.name, s.info.creation_time))
            _store.update(stamp=stamp, at=now, rows=[(s.tag.name, s.tag.version) for s in listed])
        return list(_store["rows"])


def index(engine: Engine, sync) -> list[dict]:
    """Every stored cnnserve model version, with its state over all of this server's live workers."""
    reports = sync.state.reports() if sync else []
    if not reports:  # a lone engine (no shared state): what this process serves
        m = engine.registry
        with m.lock:
            reports = [{"models": m.loaded(), "loading": sorted(m.loading),
                        "unloading": sorted(s.key for s in m.retiring), "failed": dict(m.failed)}]
    desired = (sync.state.read() if sync else None) or {"models": {}}
    rows = []
    for name, version in stored_versions():
        key = f"{name}:{version}"
        have = sum(version in r.get("models", {}).get(name, ()) for r in reports)
        failed = next((r["failed"][key] for r in reports if key in r.get("failed", {})), "")
        if have == len(reports):
            state, reason = "READY", ""
        elif any(key in r.get("unloading", ()) for r in reports):
            state, reason = "UNLOADING", "requests in flight finish on it"
        elif version in desired["models"].get(name, ()) or any(key in r.get("loading", ()) for r in reports):
            state, reason = ("UNAVAILABLE", failed) if failed else ("LOADING", f"{have} of {len(reports)} workers")
        else:
            state, reason = "UNAVAILABLE", failed or "unloaded"
        rows.append({"name": name, "version": version, "state": state, "reason": reason})
    return rows


@router.post("/v2/repository/index", summary="The models in the store and their states",
             openapi_extra=INDEX_BODY)
async def repository_index(request: Request):
    req = await json_body(request)
    rows = await anyio.to_thread.run_sync(index, engine_of(request), request.app.state.sync)
    if req.get("ready") is True:
        rows = [r for r in rows if r["state"] == "READY"]
    return JSONResponse(rows)


async def settle(engine: Engine, sync, generation: int, name: str, key: str | None = None,
                 before: dict | None = None) -> list[dict] | None:
    """None once every worker serves ``generation``; a worker's refusal of ``key`` raised with its status once
    the load is undone (``before``: the set it replaced); else the model's rows of the index (still pending)."""
    if sync is None:
        return None
    done, refused = await sync.wait_for(generation, engine.config.workers, engine.config.control_wait_s, key)
    if done:
        return None
    if refused is not None:
        status, reason = refused
        if before is not None:
            await anyio.to_thread.run_sync(sync.roll_back, name, before, generation)
        raise APIError(status if 400 <= status < 600 else 400, "load_failed",
                       f"{reason}; the load was undone, the workers go back to what they served before")
    rows = await anyio.to_thread.run_sync(index, engine, sync)
    return [r for r in rows if r["name"] == name]


def answer(pending: list[dict] | None) -> JSONResponse:
    """200 when every worker applied the change, else 202 with the model's rows of the index."""
    return JSONResponse({}) if pending is None else JSONResponse({"pending": pending}, status_code=202)


@router.post("/v2/repository/models/{name}/load", openapi_extra=LOAD_BODY,
             summary="Load a stored model (NAME, NAME:VERSION; default: its newest) beside the served one, then "
                     "switch; {\"parameters\": {\"default\": true}} also makes it the model requests without a name "
                     "go to")
async def load(request: Request, name: str):
    name, version, params, engine, sync = await control_request(request, name)
    return answer(await load_model(engine, sync, name, version, params.get("default", False)))


async def load_model(engine: Engine, sync, name: str, version: str, default=False) -> list[dict] | None:
    """A load, as both protocols ask for it (``split_tag``'s name and version): ``settle``'s answer."""
    keep = max(1, engine.config.keep_versions)
    if not isinstance(default, bool):
        raise APIError(400, "bad_parameters", f"'default' must be true or false, got {short(default)}")

    def do() -> tuple[int, dict | None, str]:
        resolved, path = stored_file(name, version)
        _, evicted = engine.registry.load(name, resolved, path)
        if sync is None:
            if default:
                engine.registry.default = name
            return 0, None, resolved
        generation, before = sync.record_load(name, resolved, evicted, keep, default)
        return generation, before, resolved

    try:
        generation, before, resolved = await anyio.to_thread.run_sync(do)
    except LoadFailed as err:
        if sync is not None:  # the reason, for the index whichever worker answers it
            await anyio.to_thread.run_sync(sync.report)
        raise APIError(err.status, "load_failed", str(err)) from None
    return await settle(engine, sync, generation, name, f"{name}:{resolved}", before)


@router.post("/v2/repository/models/{name}/unload",
             openapi_extra=UNLOAD_BODY,
             summary="Stop serving a model (every version, or NAME:VERSION); its requests in flight finish first")
async def unload(request: Request, name: str):
    name, version, _, engine, sync = await control_request(request, name)
    return answer(await unload_model(engine, sync, name, version))


async def unload_model(engine: Engine, sync, name: str, version: str) -> list[dict] | None:
    """An unload, as both protocols ask for it: ``settle``'s answer."""
    def do() -> int:
        if sync is None:
            engine.registry.unload(name, version or None)
            return 0
        generation = sync.record_unload(name, version)  # decided once, for every worker
        try:
            engine.registry.unload(name, version or None)  # here at once; the others in their sync step
        except LoadFailed:
            pass  # this worker has not caught up with the set yet: its sync step applies it
        return generation

    try:
        generation = await anyio.to_thread.run_sync(do)
    except LoadFailed as err:
        raise APIError(err.status, "unload_failed", str(err)) from None
    return await settle(engine, sync, generation, name)
