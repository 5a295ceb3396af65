"""The model repository extension of the Open Inference Protocol (as Triton speaks it), over HTTP:
``POST /v2/repository/index`` (every model in the store that could be served, and its state),
``POST /v2/repository/models/{name}/load`` and ``.../unload``. ``tritonclient.http``'s
``get_model_repository_index``, ``load_model`` and ``unload_model`` work unchanged.

**Safe by default.** Load and unload are refused (403) unless the server runs with
``--arg model_control=true``, and then need ``Authorization: Bearer TOKEN``, the token read from the
environment variable ``control_token_env`` names or the file ``control_token_file`` (read at each
request, so it can be rotated). The index, readiness and metadata stay open.

A load (``NAME``, ``NAME:VERSION``, or ``{"parameters": {"version": V}}``) is done in the worker that
got the request first, so a failure is answered with its reason while the old version keeps serving;
then the served set that every worker shares is changed (``modelstate.py``) and the answer waits for
every worker to report it (200), or says 202 after ``control_wait_s`` (the index then tells when all are
READY).
"""

from __future__ import annotations

import hmac
import json
import os

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from .bodies import read_body
from .engine import Engine
from .errors import APIError, json_depth, short
from .manager import LoadFailed
from .modelstate import stored_file
from .params import declare_route

TAGS = ["model repository (Open Inference Protocol extension)"]
ROUTES: list = []
route = declare_route(ROUTES)
MAX_BODY = 64 * 1024


def _engine(request: Request) -> Engine:
    return request.app.state.engine


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
    config = _engine(request).config
    if not config.model_control:
        raise APIError(403, "control_disabled", "loading and unloading models is off on this server "
                                                "(start it with --arg model_control=true and a token)")
    token = control_token(config)
    if token is None:
        raise APIError(403, "no_control_token", f"model_control is on but no token is set: put one in the "
                       f"environment variable {config.control_token_env} or the file control_token_file names")
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode("latin-1", "replace"), f"Bearer {token}".encode()):
        raise APIError(403, "forbidden", "this endpoint needs 'Authorization: Bearer TOKEN' with the server's "
                                         "model control token")


async def json_body(request: Request) -> dict:
    body = await read_body(request, MAX_BODY, _engine(request).config.body_timeout_s)
    config = _engine(request).config
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


def split_tag(name: str, params: dict) -> tuple[str, str]:
    name, _, version = name.partition(":")
    version = version or params.get("version") or ""
    if not isinstance(version, str):
        raise APIError(400, "bad_parameters", f"'version' must be a string, got {short(version)}")
    return name, version


async def control_request(request: Request, name: str) -> tuple[str, str, Engine, object]:
    """A load or unload request, authorized and read: the model's name and version (``NAME:VERSION`` or the
    ``version`` parameter), the engine and this worker's share in the served set (``WorkerSync`` or None)."""
    authorize(request)
    req = await json_body(request)
    name, version = split_tag(name, req.get("parameters", {}))
    return name, version, _engine(request), request.app.state.sync


def index(engine: Engine, sync) -> list[dict]:
    """Every stored cnnserve model version, with its state over all of this server's live workers."""
    import bentoml

    reports = sync.state.reports() if sync else []
    if not reports:  # a lone engine (no shared state): what this process serves
        m = engine.manager
        with m.lock:
            reports = [{"models": m.loaded(), "loading": sorted(m.loading),
                        "unloading": sorted(s.key for s in m.retiring), "failed": dict(m.failed)}]
    desired = (sync.state.read() if sync else None) or {"models": {}}
    rows = []
    for stored in sorted(bentoml.models.list(), key=lambda s: (s.tag.name, s.info.creation_time)):
        if stored.info.module != "cnnserve":
            continue
        name, version = stored.tag.name, stored.tag.version
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


@route("POST", "/v2/repository/index", tags=TAGS, summary="The models in the store and their states")
async def repository_index(request: Request):
    req = await json_body(request)
    rows = await anyio.to_thread.run_sync(index, _engine(request), request.app.state.sync)
    if req.get("ready") is True:
        rows = [r for r in rows if r["state"] == "READY"]
    return JSONResponse(rows)


async def settle(request: Request, generation: int, name: str) -> JSONResponse:
    """200 once every worker serves ``generation``, else 202 with the model's rows of the index."""
    e, sync = _engine(request), request.app.state.sync
    if sync is None or await sync.wait_for(generation, e.config.workers, e.config.control_wait_s):
        return JSONResponse({})
    rows = await anyio.to_thread.run_sync(index, e, sync)
    return JSONResponse({"pending": [r for r in rows if r["name"] == name]}, status_code=202)


@route("POST", "/v2/repository/models/{name}/load", tags=TAGS,
       summary="Load a stored model (NAME, NAME:VERSION; default: its newest) beside the served one, then switch")
async def load(request: Request, name: str):
    name, version, e, sync = await control_request(request, name)
    keep = max(1, e.config.keep_versions)

    def do() -> int:
        resolved, path = stored_file(name, version)
        _, evicted = e.manager.load(name, resolved, path)
        if sync is None:
            return 0
        return sync.record_load(name, resolved, evicted, keep)

    try:
        generation = await anyio.to_thread.run_sync(do)
    except LoadFailed as err:
        if sync is not None:  # the reason, for the index whichever worker answers it
            await anyio.to_thread.run_sync(sync.report)
        raise APIError(err.status, "load_failed", str(err)) from None
    return await settle(request, generation, name)


@route("POST", "/v2/repository/models/{name}/unload", tags=TAGS,
       summary="Stop serving a model (every version, or NAME:VERSION); its requests in flight finish first")
async def unload(request: Request, name: str):
    name, version, e, sync = await control_request(request, name)

    def do() -> int:
        e.manager.unload(name, version or None)
        if sync is None:
            return 0
        return sync.record_unload(name, version)

    try:
        generation = await anyio.to_thread.run_sync(do)
    except LoadFailed as err:
        raise APIError(err.status, "unload_failed", str(err)) from None
    return await settle(request, generation, name)
