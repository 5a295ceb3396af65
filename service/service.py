"""The BentoML service: exported ONNX models from the model store, over HTTP and gRPC.

From the repository root (``bentofile.yaml`` names this service)::

    bentoml serve                                   # the default model, port 3000
    bentoml serve --arg "models=lenet5-digits:latest resnet18-shapes:latest" --arg providers=cpu

Arguments (``--arg key=value`` for ``bentoml serve`` and ``bentoml build``; a value must
not contain commas, so several model tags are separated by spaces): see ``cnnserve.core.config.Settings``.
The HTTP API lives in ``api.py``, ``kserve.py`` and ``repository.py``, gRPC in ``grpc_server.py``, the request
logic in ``engine.py`` and the model versions in ``registry.py``.
"""

from __future__ import annotations

import gc
import logging

import bentoml

from cnnserve import __version__, modules_with_two_names
from cnnserve.core.config import Settings
from cnnserve.core.onnxmeta import MODEL_FILE
from cnnserve.core.runtime import ModelLoadError, load_model
from cnnserve.core.store import NotStored, stored_model

from . import logs, startup, telemetry
from .api import create_app
from .apikeys import APIKeys, KeysFileError
from .engine import Engine
from .http_server import DRAIN, ConnectionCloseWhileDraining, FastPaths, JSONRefusals, OpenAPIInfo, openapi_info
from .registry import LoadFailed
from .memory import return_freed_memory, trim_memory
from .metrics import ROUTES, metrics
from .modelstate import ServedState, stored_file
from .patches import apply_patches, running_versions
from .workers import WorkerSync

log = logging.getLogger("cnnserve.service")
# BentoML sets the root logger to WARNING: cnnserve's own lines (models served, drain, refused
# heads, disconnects, which fixes applied) are INFO and operators need them.
logging.getLogger("cnnserve").setLevel(logging.INFO)

# Before anything makes a metric: the server's own folder (its Prometheus files; BentoML's is shared and wiped).
RUN = startup.begin()
ARGS = bentoml.use_arguments(Settings)
TAGS = ARGS.tags
if ARGS.log_format == "json":  # from here on (the server's first process and each worker) every line is JSON
    logs.json_logging()
# At import: uvicorn binds its signal handlers and reads its protocol table before the service instance exists.
apply_patches(ARGS)
log.info("running on %s", ", ".join(f"{k} {v}" for k, v in running_versions().items()))

app = create_app()  # its engine comes with the worker's service instance (CnnServe.__init__)
app.fast_path = ARGS.fast_paths
# each request's id, access line and trace (telemetry.py): one per worker, its tracer made at its first traced request
TELEMETRY = telemetry.Telemetry.of(ARGS, ROUTES)
if ARGS.api_keys_file:  # a file that cannot be used stops `bentoml serve` at once, with one line naming it
    try:
        app.api_keys = APIKeys(ARGS.api_keys_file)
    except KeysFileError as e:
        raise bentoml.exceptions.BentoMLException(str(e)) from None
ROUTES.add_app(app)  # the route templates that metric labels may name (metrics.py)


class CnnServe:
    """Loads every configured model, warms it, and reports ready only then."""

    def __init__(self) -> None:
        if ARGS.log_format == "json":  # BentoML configured the worker's logging after the module loaded
            logs.json_logging()
        TELEMETRY.start()  # with tracing on, the exporter's imports and thread now, not in the first traced request
        tag = "the engine"
        try:
            models = []
            for tag, name, version, path in self._start_set():
                models.append(load_model(path, name=name, version=version, providers=ARGS.providers,
                                         threads=ARGS.intra_op_threads, spin=ARGS.spin, precision=ARGS.precision,
                                         batch_sizes=(1, ARGS.max_batch_size), device=ARGS.device))
            self.engine = Engine(models, ARGS, metrics(), draining=lambda: DRAIN.active)
            # the operator's default, served or not, from this worker's first request on (a respawned worker's)
            registry = self.engine.registry
            registry.default = (SERVED.read() or {}).get("default") or registry.default
            app.state.engine = self.engine
            app.state.sync = WorkerSync(self.engine, SERVED, ARGS)
            app.state.sync.start()
        except Exception as e:  # noqa: BLE001 - whatever it is, every new worker would meet it again
            reason = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
            startup.cannot_start(RUN, f"{tag}: {reason}")
        for m in models:
            log.info("serving %s:%s in %s on %s", m.name, m.version, m.info.precision, ", ".join(m.providers))
        for names in modules_with_two_names():  # each runs twice, with two copies of its state
            log.warning("one file imported as %s: serve cnnserve.service.service:CnnServe", " and ".join(names))
        return_freed_memory()
        # Everything loaded so far (BentoML, FastAPI, onnxruntime, ~140k objects) lives as long as the
        # process: freeze it out of the garbage collector. Measured on LeNet-5 at 64 clients: full
        # collections went from 70-110 ms to about 5 ms, and p99 latency from ~150 to ~80 ms.
        gc.collect()
        gc.freeze()

    def _start_set(self) -> list[tuple[str, str, str, str]]:
        """What this worker loads: the served set its siblings share when there is one (a worker restarted
        after a crash, or after models were loaded at runtime), its newest version of each model; else
        the start-up set (``--arg models=``). A model since deleted from the store is left out."""
        desired = SERVED.read()
        if desired and desired.get("models"):
            order = sorted(desired["models"], key=lambda n: n != desired.get("default"))
            found = []
            for name in order:
                version = desired["models"][name][-1]
                try:
                    found.append((f"{name}:{version}", name, *stored_file(name, version)))
                except LoadFailed as e:
                    log.warning("served set: %s", e)
            if found:
                return found
        found = []
        for i, tag in enumerate(TAGS):
            stored = getattr(self, f"model_{i}")  # BentoModel resolves to the stored model here
            found.append((tag, stored.tag.name, stored.tag.version or "", stored.path_of(MODEL_FILE)))
        return found

    async def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The Open Inference Protocol over gRPC on this worker's event loop and engine (grpc_server.py)."""
        self.grpc = None
        if ARGS.grpc_port:
            from .grpc_server import GrpcServer
            from .grpc_service import InferenceService

            InferenceService.telemetry = TELEMETRY  # ModelInfer's ids, access lines and traces
            try:
                self.grpc = GrpcServer(self.engine, ARGS.grpc_port, sync=getattr(app.state, "sync", None),
                                       api_keys=app.api_keys, tls=TLS)
                await self.grpc.start()
            except Exception as e:  # noqa: BLE001 - a port in use: every worker would meet it
                startup.cannot_start(RUN, f"gRPC on port {ARGS.grpc_port}: {type(e).__name__}: {e}")
        # what the gRPC server imported and built (grpc, protobuf, the descriptors) lives as long too
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        TELEMETRY.shutdown()  # the spans still held are sent


def _require_stored(tag: str) -> None:
    """Fail serve and build with the missing model's name and how to make it (not a bare NotFound), and in
    the server's first process with what its workers could never load (``startup.preflight``)."""
    try:
        stored = stored_model(tag)
    except NotStored as e:
        raise bentoml.exceptions.NotFound(str(e)) from None
    if RUN.first:
        try:
            startup.preflight(stored.path_of(MODEL_FILE), ARGS)
        except ModelLoadError as e:
            raise bentoml.exceptions.BentoMLException(f"model {tag!r} cannot be served: {e}") from None


# BentoML packs into a bento the models it finds at class scope: one attribute per configured tag.
if not TAGS:
    raise bentoml.exceptions.InvalidArgument("--arg models= names no model to serve")
if RUN.first and (taken := startup.check_grpc_port(ARGS.grpc_port)):
    raise bentoml.exceptions.BentoMLException(taken)
for _i, _tag in enumerate(TAGS):
    _require_stored(_tag)
    setattr(CnnServe, f"model_{_i}", bentoml.models.BentoModel(_tag))
# The served set that the workers share (service/modelstate.py): the start-up set, until models are loaded
# or unloaded at runtime; a restarted worker loads what its siblings serve.
SERVED = ServedState(RUN.folder)
if RUN.first:
    SERVED.reset([(t.name, t.version or "") for t in (stored_model(tag).tag for tag in TAGS)])
if RUN.first:  # what the checks loaded goes back to the system: this process only supervises the workers
    gc.collect()
    trim_memory()

# TLS for HTTP (uvicorn's, through BentoML's ssl configuration) and gRPC (grpc_server.py) from one pair of files
TLS = startup.tls_files(ARGS)
if isinstance(TLS, str):
    raise bentoml.exceptions.BentoMLException(TLS)

CnnServe = bentoml.asgi_app(app, path="/")(
    bentoml.service(name="cnnserve", workers=ARGS.workers, traffic={"timeout": 60},
                    **({"ssl": {"enabled": True, "certfile": TLS[0], "keyfile": TLS[1]}} if TLS else {}),
                    logging={"access": {"enabled": False}}, metrics={"enabled": ARGS.bentoml_metrics},
                    # BentoML always installs its OpenTelemetry middleware; an exclusion of every URL is the
                    # setting that makes it pass requests straight through (cnnserve's traces: telemetry.py)
                    tracing={"excluded_urls": [".*"]})(
        CnnServe))
# The first added is the outermost of these: every answer below it carries the request's id
CnnServe.add_asgi_middleware(telemetry.RequestTelemetry, telemetry=TELEMETRY)
CnnServe.add_asgi_middleware(ConnectionCloseWhileDraining)
# /classify and v2 infer straight to the API, past BentoML's router (http_server.py)
CnnServe.add_asgi_middleware(FastPaths, api=app)
# /docs.json names cnnserve and its version, not "None" and BentoML's read-me (http_server.py)
CnnServe.add_asgi_middleware(OpenAPIInfo, info=openapi_info(__version__, TAGS))
# BentoML's router answers an unknown path with plain text: every 404 and 405 in the service's JSON (http_server.py)
CnnServe.add_asgi_middleware(JSONRefusals)
