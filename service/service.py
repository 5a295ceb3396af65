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

from .api import create_app
from .bentoml_fixes import patch_timeout_middleware
from .engine import Engine, EngineConfig
from .metrics import metrics
from .preprocess import DEFAULT_FORMATS, Limits
from .runtime import load_model

log = logging.getLogger("cnnserve.service")


class ServiceArgs(BaseModel):
    models: str = "lenet5-digits:latest"  # model store tags, space-separated; the first is the default
    providers: str = "auto"  # auto (CUDA, then CPU), cuda (fail without it), cpu
    workers: int = 1  # server processes, each with its own sessions and batcher
    threads: int = 0  # onnxruntime intra-op threads per model; 0: onnxruntime's default (all cores)
    spin: bool = False  # onnxruntime threads busy-wait between runs (takes CPU from decoding and HTTP)
    max_batch_size: int = 64  # images per onnxruntime run
    max_wait_ms: float = 0.0  # hold a batch open this long to fill it (0: run as soon as the model is free)
    max_queue: int = 1024  # images waiting per model before answering 503 with Retry-After
    max_request_mb: float = 20.0  # request body limit (413)
    max_image_pixels: int = 50_000_000  # decompression-bomb limit (413)
    max_images_per_request: int = 256
    formats: str = " ".join(sorted(DEFAULT_FORMATS))  # accepted image formats (415 otherwise)
    inline_decode_pixels: int = 128 * 128  # images up to this size decode on the event loop, larger in threads


patch_timeout_middleware()  # BentoML's per-request timers otherwise keep every request alive for 60 s
ARGS = bentoml.use_arguments(ServiceArgs)
TAGS = ARGS.models.split()
MAX_BYTES = int(ARGS.max_request_mb * 1024 * 1024)

app = create_app(lambda: bentoml.get_current_service().engine, MAX_BYTES)


class CnnServe:
    """Loads every configured model, warms it, and reports ready only then."""

    def __init__(self) -> None:
        models = []
        for i, tag in enumerate(TAGS):
            stored = getattr(self, f"model_{i}")  # BentoModel resolves to the stored model here
            models.append(load_model(stored.path_of("model.onnx"), name=stored.tag.name,
                                     version=stored.tag.version or "", providers=ARGS.providers,
                                     threads=ARGS.threads or None, spin=ARGS.spin))
        config = EngineConfig(
            max_batch_size=ARGS.max_batch_size, max_wait_ms=ARGS.max_wait_ms, max_queue=ARGS.max_queue,
            max_images_per_request=ARGS.max_images_per_request, inline_decode_pixels=ARGS.inline_decode_pixels,
            limits=Limits(max_bytes=MAX_BYTES, max_pixels=ARGS.max_image_pixels,
                          formats=frozenset(ARGS.formats.upper().split())))
        self.engine = Engine(models, config, metrics())
        for m in models:
            log.info("serving %s:%s on %s", m.name, m.version, ", ".join(m.providers))
        # Everything loaded so far (BentoML, FastAPI, onnxruntime, ~140k objects) lives as long as the
        # process: freeze it out of the garbage collector. Measured on LeNet-5 at 64 clients: full
        # collections went from 70-110 ms to about 5 ms, and p99 latency from ~150 to ~80 ms.
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
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
