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

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The model every entry point uses when none is named: what `./run.sh up` trains, exports and
#: stores, what `bentoml serve` serves, what `cnnserve score` and `cnnserve container` take.
DEFAULT_MODEL = "lenet5-digits:latest"
#: What `cnnserve up` and `cnnserve train` train when nothing is named (DEFAULT_MODEL is their export).
DEFAULT_ARCH, DEFAULT_DATA = "lenet5", "digits"
#: The precisions a model may be served in: auto (the fastest verified variant here) or one of them.
PRECISIONS = ("auto", "fp32", "fp16", "int8")


def cores() -> int:
    """The cores this process may run on, asked when needed (a container's CPU set or an affinity mask
    can be smaller than the machine, and can change between import and use)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1

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


def bucket_sizes(text: str, max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes batches are padded up to: ``text`` (space-separated) or, when empty, the powers of two
    below ``max_batch_size`` and that size itself; the largest must hold a whole batch."""
    if text.strip():
        try:
            sizes = sorted({int(v) for v in text.split()})
        except ValueError:
            raise ValueError(f"batch_buckets {text!r}: not whole numbers separated by spaces") from None
        if sizes[0] < 1 or sizes[-1] < max_batch_size:
            raise ValueError(f"batch_buckets {text!r}: sizes must be at least 1, the largest at least "
                             f"max_batch_size ({max_batch_size})")
        return tuple(sizes)
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return (*sizes, max_batch_size)


@dataclass(frozen=True)
class DeviceOptions:
    """How a model's session uses its device (a view of ``Settings``; ``cnnserve.core.binding`` applies it).

    On CUDA: ``device_id`` (one worker per GPU on a multi-GPU host, each with its own id), ``conv_search``
    (cuDNN's convolution algorithm search), ``mem_limit_bytes`` (the CUDA memory arena's limit; 0: none),
    ``io_binding`` (auto: on with CUDA; inputs copied to the device once, outputs bound there), and
    ``cuda_graphs`` (each batch padded up to one of ``buckets`` and replayed as a CUDA graph captured for
    that size: fixed shapes and fixed buffers, one run at a time). On CPU only ``io_binding=on`` does
    anything (binding to host memory); CUDA graphs asked for there are refused in words in ``/models``
    (``precision_choice.runner``), never an error."""

    device_id: int = 0
    conv_search: str = "HEURISTIC"
    mem_limit_bytes: int = 0
    io_binding: str = "auto"
    cuda_graphs: bool = False
    buckets: tuple[int, ...] = bucket_sizes("", 64)  # as Settings' defaults make them


# Setting types: a value outside them is refused when the server starts (`bentoml serve` prints one line
# naming the argument and exits 1), never met by a worker, which BentoML would restart forever.
Count = Annotated[int, Field(ge=1)]
Natural = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Settings(BaseModel):
    """The service's arguments (``--arg key=value``; a value must not contain commas, so lists
    are separated by spaces). Unknown keys are ignored, as BentoML's own argument models do."""

    model_config = ConfigDict(frozen=True)

    models: str = DEFAULT_MODEL  # model store tags, space-separated; the first is the default
    providers: Literal["auto", "cuda", "cpu"] = "auto"  # auto (CUDA, then CPU), cuda (fail without it), cpu
    # Which verified variant of each model to run: auto times those that suit the provider (fp16 and fp32
    # on CUDA, int8 and fp32 on CPU) in warm-up at batch sizes 1 and max_batch_size and serves the fastest;
    # fp32, fp16 or int8 forces one (refused at start if the model has no such variant).
    precision: Literal[PRECISIONS] = "auto"
    # Server processes, each with its own sessions and batcher. Two where there are the cores, so a
    # worker that dies (OOM kill, kill -9) is not an outage: the other answers while it restarts.
    workers: Count = Field(default_factory=lambda: 2 if cores() >= 2 else 1)
    threads: Natural = 0  # onnxruntime intra-op threads per model; 0: the cores shared among the workers
    spin: bool = False  # onnxruntime threads busy-wait between runs (takes CPU from decoding and HTTP)
    max_batch_size: Count = 64  # images per onnxruntime run
    max_wait_ms: NonNegative = 0.0  # hold a batch open this long to fill it (0: run as soon as the model is free)
    max_queue: Count = 1024  # images waiting per model before answering 503 with Retry-After
    timeout_ms: NonNegative = 30_000  # a request's default deadline from arrival; still queued then: 504, not run
    max_request_mb: Positive = 20.0  # request body limit (413)
    body_timeout_s: Positive = 10.0  # longest pause while a request body arrives (408)
    max_header_kb: Count = 64  # request head limit (431)
    header_timeout_s: Positive = 10.0  # longest a request head may take to arrive (408)
    max_image_pixels: Count = 50_000_000  # decompression-bomb limit (413)
    max_decoded_mb: Positive = 128.0  # memory of one decoded image, by mode and bit depth (413)
    max_aspect_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 32.0  # longer side over shorter side (400)
    max_chunks: Count = 10_000  # PNG chunks, JPEG segments before the first scan, TIFF strips or tiles (400)
    max_images_per_request: Count = 256
    max_json_mb: Positive = 4.0  # the JSON part of an Open Inference Protocol request (413)
    max_json_depth: Count = 32  # brackets and braces nested in it (400)
    formats: str = "BMP GIF JPEG PNG TIFF WEBP"  # accepted image formats (415 otherwise)
    inline_decode_pixels: Natural = 128 * 128  # images up to this size and ...
    inline_decode_bytes: Natural = 16 * 1024  # ... this many bytes decode on the event loop, others in processes
    # Larger images decode in processes of their own (service/decoding.py), this many per worker (0: the number
    # of cores), each image within a CPU budget: past it the process is killed and the image refused (413)
    decode_processes: Natural = 0
    decode_cpu_ms: Positive = 2000.0
    top_k: Count = 5  # labels in an answer when the request does not say
    # occluded copies one /classify/explain request may run (400 beyond): the copies go through the
    # model's batcher with other traffic, so this bounds what one explanation takes from the others
    max_occlusions: Count = 256
    # The longest a batch carrying bulk work (explanations, priority=bulk) may run: each such batch takes at
    # most as many bulk images as the model runs in this time, by its measured time per image (at least
    # one), so an interactive request waits for at most one such slice (service/batching.py)
    bulk_slice_ms: Positive = 50.0
    # OpenTelemetry traces (service/telemetry.py, docs/observability.md): the share of requests traced, each with
    # its decode, queue, inference and respond spans, sent over OTLP/HTTP to tracing_endpoint (a traces URL; empty:
    # the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318); 0: no
    # tracer at all. A request whose traceparent says sampled is traced whatever the share.
    tracing_sample: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    tracing_endpoint: str = ""
    # tracing=true: every request traced (tracing_sample=1 unless that is set). BentoML's own per-request spans
    # stay off whatever it says (they cost a fifth of a small model's request CPU: docs/benchmarks.md)
    tracing: bool = False
    bentoml_metrics: bool = True
    drain_s: NonNegative = 3.0  # on SIGTERM: answer with Connection: close and readyz 503 this long, then stop
    grace_s: NonNegative = 25.0  # then wait at most this long for requests in flight
    # The Open Inference Protocol over gRPC in every worker (service/grpc_server.py; both workers bind it with
    # SO_REUSEPORT); 0: no gRPC. Its messages are limited to max_request_mb.
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 3001
    # gRPC's bounds (docs/grpc.md): calls one worker serves at once (more are refused RESOURCE_EXHAUSTED before
    # their message is read: at most this many messages of max_request_mb are held), calls at once on one
    # connection (HTTP/2's MAX_CONCURRENT_STREAMS: a client queues the rest itself), keepalive pings every
    # grpc_keepalive_s on a connection with calls (unanswered as long again: closed), every connection asked to go
    # after grpc_connection_age_s (its calls then get the longer of grace_s and timeout_ms), and the largest answer
    # (413 answer_too_large, before it is built; 0: 256 KB per image of max_images_per_request, 64 MB by default)
    grpc_max_calls: Count = 64
    grpc_max_streams: Count = 16
    grpc_keepalive_s: Positive = 20.0
    grpc_connection_age_s: Positive = 120.0
    grpc_max_answer_mb: NonNegative = 0.0
    # Models at runtime (service/repository.py, service/manager.py): the repository extension's load and
    # unload answer 403 unless model_control is true, and then need the bearer token from the environment
    # variable control_token_env names or the file control_token_file (read at each request)
    model_control: bool = False
    control_token_env: str = "CNNSERVE_CONTROL_TOKEN"
    control_token_file: str = ""
    # API keys for the inference endpoints (service/apikeys.py): a file of `NAME sha256:HEX` lines that
    # `cnnserve api-key NAME --file PATH` writes; empty: no keys needed
    api_keys_file: str = ""
    # /classify and v2 infer answered past FastAPI's router and dependency solving (service/api.py's fast path: the
    # same handlers and refusals, a fifth less CPU a request); false sends them through the router like every route
    fast_paths: bool = True
    # one log line per request, HTTP and gRPC's ModelInfer (service/telemetry.py): method, path, status, ms, the API
    # key's name and the request's id as text; with log_format=json every field as JSON (id, client, route, model,
    # version, stage times, batch size, error code). Unset: on with log_format=json, off with text
    access_log: bool | None = None
    # every line the server logs as text (BentoML's format) or as JSON, one object a line (Elastic Common Schema)
    log_format: Literal["text", "json"] = "text"
    # TLS for HTTP and gRPC alike: a PEM certificate (chain) and its unencrypted PEM key; empty: plain text
    tls_certfile: str = ""
    tls_keyfile: str = ""
    keep_versions: Count = 1  # the newest N loaded versions of a model stay loaded and reachable by version
    max_model_memory_mb: NonNegative = 0.0  # loaded versions' memory budget (0: none); LRU idle ones evicted
    model_sync_s: Positive = 0.5  # how often each worker looks at the served set the workers share
    # A runtime load first checks the model and warms it up in a process of its own, killed past load_timeout_s
    # seconds and capped at load_memory_mb of address space (a batch of max_batch_size inputs must fit it too:
    # cnnserve.core.servable.trial), so a model that never finishes or asks for gigabytes is refused while the
    # worker keeps serving
    load_timeout_s: Positive = 30.0
    load_memory_mb: Positive = 4096.0
    control_wait_s: Positive = 120.0  # a load or unload answers 200 once every worker serves it, else 202
    # follow the store: models served as NAME:latest (or NAME) are re-resolved every follow_s seconds and a newer
    # stored version is loaded by the same path as a load request (0: off)
    follow_s: NonNegative = 0.0
    # Rollout (service/rollout.py, docs/rollout.md): the answers of each model kept to join clients' labels on (and
    # the labels and shadow comparisons kept), the images a shadow candidate may hold queued before a shadow
    # run is dropped, and the share of a busy worker's time shadow runs may take (an idle one's they take freely)
    feedback_ring: Count = 10000
    shadow_queue: Count = 16
    shadow_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.05
    # Traffic capture (service/capture.py, docs/rollout.md): a share of the answered /classify and /classify/batch
    # images written to capture_dir with their answers, off the request path ("": off); the folder's files stay
    # within capture_max_mb (oldest first); a worker queues at most capture_queue samples, then drops and counts
    capture_dir: str = ""
    capture_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.01
    capture_max_mb: Positive = 1024.0
    capture_queue: Count = 256
    # Drift (service/answers.py): every batch's answers counted off the request path into /metrics and
    # /models/NAME/monitor; false: neither (the per-answer ood_score and in_distribution stay)
    drift_monitor: bool = True
    # The GPU (cnnserve.core.binding, docs/gpu.md); none of these matter on CPU but io_binding=on. device_id: which
    # GPU (one worker per GPU: serve each with its own id); cudnn_conv_algo_search: EXHAUSTIVE finds the fastest
    # convolutions at a cost per new batch size, HEURISTIC (default) picks at once; gpu_mem_limit_mb: the CUDA
    # arena's cap (0: none); io_binding: auto binds on CUDA; cuda_graphs: pad every batch up to one of batch_buckets
    # (space-separated; empty: powers of two up to max_batch_size) and replay a CUDA graph captured per size;
    # runs_in_flight: batches one model runs at once (2 on a GPU lets one batch's copies overlap another's compute)
    device_id: Natural = 0
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = "HEURISTIC"
    gpu_mem_limit_mb: NonNegative = 0.0
    io_binding: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: bool = False
    batch_buckets: str = ""
    runs_in_flight: Annotated[int, Field(ge=1, le=8)] = 1

    @model_validator(mode="after")
    def _buckets_hold_a_batch(self):
        bucket_sizes(self.batch_buckets, self.max_batch_size)  # a ValueError names the setting
        return self

    @property
    def tags(self) -> list[str]:
        return self.models.split()

    @property
    def trace_ratio(self) -> float:
        """The share of requests traced: ``tracing_sample``, or all of them with ``tracing=true``."""
        return self.tracing_sample or (1.0 if self.tracing else 0.0)

    @property
    def access_lines(self) -> bool:
        """Whether each request gets a line: ``access_log``, or by default with JSON logs only."""
        return self.access_log if self.access_log is not None else self.log_format == "json"

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MB)

    @property
    def grpc_max_answer_bytes(self) -> int:
        return int(self.grpc_max_answer_mb * MB) if self.grpc_max_answer_mb else self.max_images_per_request * 256 * KB

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * MB)

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb * KB

    @property
    def decoders(self) -> int:
        """Decoding processes per worker: at least two, so that one costly image never holds a worker's
        decoding alone."""
        return self.decode_processes or max(2, cores() // max(1, self.workers))

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, cores() // max(1, self.workers))

    @cached_property
    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_request_bytes, max_pixels=self.max_image_pixels,
                      max_decoded_bytes=int(self.max_decoded_mb * MB), max_aspect_ratio=self.max_aspect_ratio,
                      max_chunks=self.max_chunks, formats=frozenset(self.formats.upper().split()))

    @cached_property
    def device(self) -> DeviceOptions:
        return DeviceOptions(device_id=self.device_id, conv_search=self.cudnn_conv_algo_search,
                             mem_limit_bytes=int(self.gpu_mem_limit_mb * MB), io_binding=self.io_binding,
                             cuda_graphs=self.cuda_graphs,
                             buckets=bucket_sizes(self.batch_buckets, self.max_batch_size))


DEFAULTS = Settings()
