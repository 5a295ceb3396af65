"""The BentoML service: exported ONNX models from the model store, over HTTP.

From the repository root (``bentofile.yaml`` names this service)::

    bentoml serve                                   # the default model, port 3000
    bentoml serve --arg "models=lenet5-digits:latest resnet18-shapes:latest" --arg providers=cpu

Arguments (``--arg key=value`` for ``bentoml serve`` and ``bentoml build``; a value must
not contain commas, so several model tags are separated by spaces): see ``ServiceArgs``.
The HTTP API lives in ``api.py``, the request logic in ``engine.py``.
"""

from __future__ import annotations

import gc
import logging
import os

import bentoml
from pydantic import BaseModel

from cnnserve.spec import DEFAULT_MODEL

from .api import create_app
from .bentoml_fixes import patch_timeout_middleware
from .engine import Engine, EngineConfig
from .http_server import ConnectionCloseWhileDraining, install_drain, install_head_limits
from .metrics import metrics
from .preprocess import DEFAULT_FORMATS, Limits, return_freed_memory
from .runtime import load_model

log = logging.getLogger("cnnserve.service")
# BentoML sets the root logger to WARNING: cnnserve's own lines (models served, drain, refused
# heads, disconnects, which fixes applied) are INFO and operators need them.
logging.getLogger("cnnserve").setLevel(logging.INFO)
CORES = os.cpu_count() or 1


class ServiceArgs(BaseModel):
    models: str = DEFAULT_MODEL  # model store tags, space-separated; the first is the default
    providers: str = "auto"  # auto (CUDA, then CPU), cuda (fail without it), cpu
    # Server processes, each with its own sessions and batcher. Two where there are the cores, so a
    # worker that dies (OOM kill, kill -9) is not an outage: the other answers while it restarts.
    workers: int = 2 if CORES >= 2 else 1
    threads: int = 0  # onnxruntime intra-op threads per model; 0: the cores shared among the workers
    spin: bool = False  # onnxruntime threads busy-wait between runs (takes CPU from decoding and HTTP)
    max_batch_size: int = 64  # images per onnxruntime run
    max_wait_ms: float = 0.0  # hold a batch open this long to fill it (0: run as soon as the model is free)
    max_queue: int = 1024  # images waiting per model before answering 503 with Retry-After
    timeout_ms: float = 30_000  # a request's default deadline from arrival; still queued then: 504, not run
    max_request_mb: float = 20.0  # request body limit (413)
    body_timeout_s: float = 10.0  # longest pause while a request body arrives (408)
    max_header_kb: int = 64  # request head limit (431)
    header_timeout_s: float = 10.0  # longest a request head may take to arrive (408)
    max_image_pixels: int = 50_000_000  # decompression-bomb limit (413)
    max_decoded_mb: float = 128.0  # memory of one decoded image, by mode and bit depth (413)
    max_aspect_ratio: float = 32.0  # longer side over shorter side (400)
    max_chunks: int = 10_000  # PNG chunks, JPEG segments before the first scan, TIFF strips or tiles (400)
    max_images_per_request: int = 256
    max_json_mb: float = 4.0  # the JSON part of an Open Inference Protocol request (413)
    formats: str = " ".join(sorted(DEFAULT_FORMATS))  # accepted image formats (415 otherwise)
    inline_decode_pixels: int = 128 * 128  # images up to this size and ...
    inline_decode_bytes: int = 16 * 1024  # ... this many bytes decode on the event loop, larger ones in threads
    decode_threads: int = 0  # images decoded at once in threads (0: the number of cores)
    drain_s: float = 3.0  # on SIGTERM: answer with Connection: close and readyz 503 this long, then stop
    grace_s: float = 25.0  # then wait at most this long for requests in flight


patch_timeout_middleware()  # BentoML's per-request timers otherwise keep every request alive for 60 s
ARGS = bentoml.use_arguments(ServiceArgs)
TAGS = ARGS.models.split()
MAX_BYTES = int(ARGS.max_request_mb * 1024 * 1024)
install_head_limits(ARGS.max_header_kb * 1024, ARGS.header_timeout_s)
# At import: uvicorn binds its signal handlers before the service instance exists.
install_drain(ARGS.drain_s, ARGS.grace_s)

app = create_app(lambda: bentoml.get_current_service().engine, MAX_BYTES, ARGS.body_timeout_s)


class CnnServe:
    """Loads every configured model, warms it, and reports ready only then."""

    def __init__(self) -> None:
        threads = ARGS.threads or max(1, CORES // max(1, ARGS.workers))
        models = []
        for i, tag in enumerate(TAGS):
            stored = getattr(self, f"model_{i}")  # BentoModel resolves to the stored model here
            models.append(load_model(stored.path_of("model.onnx"), name=stored.tag.name,
                                     version=stored.tag.version or "", providers=ARGS.providers,
                                     threads=threads, spin=ARGS.spin))
        config = EngineConfig(
            max_batch_size=ARGS.max_batch_size, max_wait_ms=ARGS.max_wait_ms, max_queue=ARGS.max_queue,
            max_images_per_request=ARGS.max_images_per_request, inline_decode_pixels=ARGS.inline_decode_pixels,
            inline_decode_bytes=ARGS.inline_decode_bytes, decode_threads=ARGS.decode_threads,
            timeout_ms=ARGS.timeout_ms, max_json_bytes=int(ARGS.max_json_mb * 1024 * 1024),
            limits=Limits(max_bytes=MAX_BYTES, max_pixels=ARGS.max_image_pixels,
                          max_decoded_bytes=int(ARGS.max_decoded_mb * 1024 * 1024),
                          max_aspect_ratio=ARGS.max_aspect_ratio, max_chunks=ARGS.max_chunks,
                          formats=frozenset(ARGS.formats.upper().split())))
        self.engine = Engine(models, config, metrics())
        for m in models:
            log.info("serving %s:%s on %s", m.name, m.version, ", ".join(m.providers))
        return_freed_memory()
        # Everything loaded so far (BentoML, FastAPI, onnxruntime, ~140k objects) lives as long as the
        # process: freeze it out of the garbage collector. Measured on LeNet-5 at 64 clients: full
        # collections went from 70-110 ms to about 5 ms, and p99 latency from ~150 to ~80 ms.
        gc.collect()
        gc.freeze()

    async def __is_ready__(self) -> bool:
        return self.engine.ready


def _require_stored(tag: str) -> None:
    """Fail serve and build with the missing model's name and how to make it (not a bare NotFound)."""
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise bentoml.exceptions.NotFound(
            f"model {tag!r} is not in BentoML's model store (BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')})."
            " Make the default model with "
            "`./run.sh up`, or store an export with `cnnserve export RUN/model.pt --store` "
            "(`bentoml models list` shows what is there)") from None


# BentoML packs into a bento the models it finds at class scope: one attribute per configured tag.
if not TAGS:
    raise bentoml.exceptions.InvalidArgument("--arg models= names no model to serve")
for _i, _tag in enumerate(TAGS):
    _require_stored(_tag)
    setattr(CnnServe, f"model_{_i}", bentoml.models.BentoModel(_tag))

CnnServe = bentoml.asgi_app(app, path="/")(
    bentoml.service(name="cnnserve", workers=ARGS.workers, traffic={"timeout": 60}, logging={"access": {"enabled": False}})(
        CnnServe))
CnnServe.add_asgi_middleware(ConnectionCloseWhileDraining)
