"""Every setting of serving and scoring, each with its one default.

``Settings`` is the one configuration type. ``bentoml serve --arg key=value`` fills it
(it is the service's argument model), the serving engine reads it, and ``Limits`` (what
an image may be) is a view of it, as are the command line's defaults for batch scoring.
Sizes a person types are in MB and kB here; the views turn them into bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from pydantic import BaseModel, ConfigDict

#: The model every entry point uses when none is named: what `./run.sh up` trains, exports and
#: stores, what `bentoml serve` serves, what `cnnserve score` and `cnnserve container` take.
DEFAULT_MODEL = "lenet5-digits:latest"
CORES = os.cpu_count() or 1
MB, KB = 1024 * 1024, 1024


@dataclass(frozen=True)
class Limits:
    """What an image may be, checked before its pixels are allocated (a view of ``Settings``).

    ``max_bytes``: the encoded size (413). ``max_pixels``: width x height from the header (413;
    a decompression bomb is refused before any pixel is decoded). ``max_decoded_bytes``: the memory
    the decoded image takes, by mode and bit depth, after JPEG draft scaling (413).
    ``max_aspect_ratio``: the longer side over the shorter (400). ``max_chunks``: PNG chunks, JPEG
    segments before the first scan, TIFF strips or tiles; each costs Python-level work in Pillow,
    so a tiny picture padded with a million of them would take seconds (400). A format not in
    ``formats``: 415; a pixel mode that cannot be converted (LAB): 415. Whatever the image, the
    resize never allocates more than the model's input (the crop is taken from the source)."""

    max_bytes: int
    max_pixels: int
    max_decoded_bytes: int
    max_aspect_ratio: float
    max_chunks: int
    formats: frozenset[str]


class Settings(BaseModel):
    """The service's arguments (``--arg key=value``; a value must not contain commas, so lists
    are separated by spaces). Unknown keys are ignored, as BentoML's own argument models do."""

    model_config = ConfigDict(frozen=True)

    models: str = DEFAULT_MODEL  # model store tags, space-separated; the first is the default
    providers: str = "auto"  # auto (CUDA, then CPU), cuda (fail without it), cpu
    # Which verified variant of each model to run: auto times those that suit the provider (fp16 and fp32
    # on CUDA, int8 and fp32 on CPU) in warm-up at batch sizes 1 and max_batch_size and serves the fastest;
    # fp32, fp16 or int8 forces one (refused at start if the model has no such variant).
    precision: str = "auto"
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
    max_json_depth: int = 32  # brackets and braces nested in it (400)
    formats: str = "BMP GIF JPEG PNG TIFF WEBP"  # accepted image formats (415 otherwise)
    inline_decode_pixels: int = 128 * 128  # images up to this size and ...
    inline_decode_bytes: int = 16 * 1024  # ... this many bytes decode on the event loop, larger ones in threads
    decode_threads: int = 0  # images decoded at once in threads (0: the number of cores)
    top_k: int = 5  # labels in an answer when the request does not say
    # occluded copies one /classify/explain request may run (400 beyond): the copies go through the
    # model's batcher with other traffic, so this bounds what one explanation takes from the others
    max_occlusions: int = 256
    # BentoML's per-request OpenTelemetry spans: on in BentoML, off here unless asked for (they go to no
    # exporter unless BentoML's tracing is configured, and cost a fifth of a small model's request CPU:
    # docs/benchmarks.md). BentoML's request metrics (bentoml_service_request_*) stay on by default.
    tracing: bool = False
    bentoml_metrics: bool = True
    drain_s: float = 3.0  # on SIGTERM: answer with Connection: close and readyz 503 this long, then stop
    grace_s: float = 25.0  # then wait at most this long for requests in flight

    @property
    def tags(self) -> list[str]:
        return self.models.split()

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MB)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * MB)

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb * KB

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, CORES // max(1, self.workers))

    @cached_property
    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_request_bytes, max_pixels=self.max_image_pixels,
                      max_decoded_bytes=int(self.max_decoded_mb * MB), max_aspect_ratio=self.max_aspect_ratio,
                      max_chunks=self.max_chunks, formats=frozenset(self.formats.upper().split()))


DEFAULTS = Settings()
