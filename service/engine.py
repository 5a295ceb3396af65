"""The data plane: decoding, runs, classification and explanations, for every protocol; no protocol, no
BentoML, and no models of its own (the registry's, ``registry.py``).

The front ends (``api.py`` for HTTP, ``kserve.py`` for the Open Inference Protocol, ``grpc_service.py`` for
gRPC) turn a request into a ``Call`` (``Engine.call``: the one check of its parameters and the one lookup of
its model), hand it with the request's images or pixels to ``classify``, ``classify_many`` or ``run`` (a
``Prediction``), or to ``explain.explain_image``, and turn the result back into their protocol. Every refusal
is an ``APIError`` (``errors.py``), so nothing a client sends becomes a 500.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import anyio
import numpy as np

from cnnserve.core import onnxmeta
from cnnserve.core.confidence import assess, not_finite_rows, ood_scores
from cnnserve.core.config import DEFAULTS, Settings
from cnnserve.core.preprocess import ImageError, open_image, preprocess
from cnnserve.core.runtime import Model

from .answers import Monitor, Statistics
from .batching import PRIORITIES, ClientGone, DeadlineExceeded, MicroBatcher, Overloaded
from .capture import Capture
from .decoding import DecodeFailed, DecodePool
from .errors import REQUEST_CODES, APIError, model_output_not_finite
from .registry import ModelRegistry, Served
from .telemetry import RequestRecord, current as current_request

@dataclass
class Ticket:
    """What the batcher needs to know about one request: when its answer stops being useful
    (``deadline``, ``time.perf_counter()`` seconds), whether it is ``interactive`` or ``bulk``, and
    a future that is done once its client has gone (``gone``, set once the body is read)."""

    deadline: float | None = None
    priority: str = "interactive"
    gone: asyncio.Future | None = None
    #: when the request arrived (``time.perf_counter()``): its statistics count from there (``answers.Statistics``)
    start: float | None = None


@dataclass
class Call:
    """One request as every front end hands it to the data plane, checked once (``Engine.call``): the version it
    holds until it is answered, how many classes to answer with, whether calibrated, its deadline and priority."""

    served: Served
    top_k: int
    ticket: Ticket
    calibrated: bool = True
    #: the request's telemetry (telemetry.py): its id, and its stages' times where it is traced or logged as JSON
    request: RequestRecord | None = None

    @property
    def model(self) -> Model:
        return self.served.model

    @property
    def request_id(self) -> str | None:
        return self.request.id if self.request is not None else None


@dataclass
class Prediction:
    """What the model answered for N images: logits and probabilities (N x K each, float32) and each row's
    out-of-distribution score, with the version that answered."""

    model: Model
    logits: np.ndarray
    probabilities: np.ndarray
    ood: np.ndarray

    def assess(self, calibrated: bool = True, finite: bool = True) -> tuple[np.ndarray, list[dict]]:
        """The probabilities to answer with and each row's OOD fields (``confidence.assess``)."""
        return assess(self.model.info, self.logits, self.probabilities, calibrated, self.ood, finite)


class Engine:
    """The data plane: a request's images decoded, run through its model's batcher, and answered, whatever the
    protocol. The models are the registry's (``registry.py``)."""

    def __init__(self, models: list[Model], config: Settings = DEFAULTS, metrics=None, draining=lambda: False):
        if not models:  # before the decoding processes are started for nothing
            raise ValueError("no models to serve")
        self.config, self.metrics = config, metrics
        self.draining = draining  # true once a drain has begun (the server's SIGTERM): not ready
        c, h, w = max((m.spec.input_shape for m in models), key=lambda shape: shape[0] * shape[1] * shape[2])
        self.decoders = DecodePool(config.decoders, config.limits, config.decode_cpu_ms / 1000,
                                   config.max_queue, c * h * w)
        self._stage_metrics: dict = {}  # (model, stage, method) -> histogram child, looked up once
        self.stats = Statistics()  # Triton's statistics extension: what each version did (answers.py, triton.py)
        self.monitor = None  # drift, drained off the request path: set before the first batcher can run
        self.rollout = None  # answers, canary and shadow (rollout.py): the worker's sync sets it (workers.py)
        self.registry = ModelRegistry(models, config, self._batcher, self.decoders.grow, metrics)
        if config.drift_monitor:
            self.monitor = Monitor(self.registry.newest, [m.name for m in models], metrics)
        # a share of the answered images and their answers, written by a thread of its own (capture.py)
        self.capture = (Capture(config.capture_dir, config.capture_rate, config.capture_max_mb, config.capture_queue)
                        if config.capture_dir else None)

    def _batcher(self, model: Model) -> MicroBatcher:
        outputs = list(onnxmeta.OUTPUTS)

        def run(pixels: np.ndarray) -> list[np.ndarray]:
            """Logits, probabilities and each row's OOD score: scored once per batch, here in the inference
            thread, not once per request on the event loop."""
            logits, probs = model.run(pixels, outputs)
            scores = ood_scores(model.info.ood, logits, model.info.temperature)
            if self.monitor:
                self.monitor.record(model, logits, probs, scores)  # every protocol's answers reach the monitor
            return [logits, probs, scores]

        def observe(n: int, seconds: float) -> None:
            if self.metrics:
                self.metrics.batch_size.labels(model.name).observe(n)
                self.metrics.inference.labels(model.name).observe(seconds)

        def executed(n: int, stacking: float, seconds: float, splitting: float) -> None:
            self.stats.execution(model, n, stacking, seconds, splitting)

        depth = self.metrics.queued.labels(model.name).set if self.metrics else None
        return MicroBatcher(run, self.config.max_batch_size, self.config.max_queue, self.config.max_wait_ms,
                            observe, model.name, depth, bulk_slice_ms=self.config.bulk_slice_ms,
                            seconds_per_image=model.seconds_per_image, in_flight=self.config.runs_in_flight,
                            on_execution=executed)

    @property
    def ready(self) -> bool:
        return not self.draining() and all(s.model.warmup_ms > 0 for s in self.registry.current())

    # -- one validation of what a request asks for ---------------------------------------------------

    def model(self, name: str | None = None, version: str | None = None) -> Model:
        """The served model (its newest version, or ``version``; without a name the operator's default), held until
        the request ends (``registry.py``): for the routes that describe a model rather than run it."""
        return self.registry.lookup(name, version).model

    def call(self, name: str | None = None, version: str | None = None, top_k: int | None = None,
             timeout_ms: float | None = None, priority: str | None = None, calibrated: bool = True,
             start: float | None = None) -> Call:
        """A request's parameters, whatever protocol carried them, checked in one place before its body is read:
        the model (looked up once, held until the request ends), ``top_k`` (the default clamped to the model's
        classes, an explicit value out of range refused), the deadline and the priority; 4xx ``APIError``s."""
        record = current_request()
        if self.rollout is not None and not version:  # a canary's share of the requests that name no version
            version = self.rollout.canary(name, record.id if record is not None else None)
        served = self.registry.lookup(name, version)
        n = served.model.spec.num_classes
        if top_k is None:
            k = min(self.config.top_k, n)
        elif not 1 <= top_k <= n:
            raise APIError(400, "bad_top_k", f"top_k must be between 1 and {n} for model {served.model.name!r}, "
                                             f"got {top_k}")
        else:
            k = top_k
        if timeout_ms is not None and not 0 < timeout_ms <= 3_600_000:
            raise APIError(400, "bad_timeout", f"timeout_ms must be above 0 and at most 3600000, got {timeout_ms:g}")
        if priority not in (None, *PRIORITIES):
            raise APIError(400, "bad_priority", f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        ms = timeout_ms if timeout_ms is not None else self.config.timeout_ms
        start = start or time.perf_counter()
        ticket = Ticket(start + ms / 1000 if ms else None, priority or "interactive", start=start)
        call = Call(served, k, ticket, calibrated, record)
        if call.request is not None:
            call.request.call = call  # its access line and trace name the model and version
        return call

    # -- images --------------------------------------------------------------------------------

    async def decode(self, model: Model, data: bytes, timings: dict | None = None,
                     ticket: Ticket | None = None) -> np.ndarray:
        """Bytes to the model's uint8 input; a bad image fails here, alone. Only work proven cheap
        runs on the event loop: an image of at most ``inline_decode_bytes`` bytes (so its chunks
        are few) and ``inline_decode_pixels`` pixels. Anything else is decoded in a decoding process
        within the CPU budget ``decode_cpu_ms``, in turn with other requests' images, interactive first,
        by the ticket's deadline (``service/decoding.py``). ``timings`` gets ``decode``, ``resize`` and
        ``thread`` (the wait for a decoding process and the hand-off)."""
        t = time.perf_counter()
        ticket = ticket or Ticket()
        limits = self.config.limits
        problem = None
        try:
            if len(data) <= self.config.inline_decode_bytes:
                img = open_image(data, limits)
                opened = time.perf_counter() - t
                w, h = img.size
                if w * h <= self.config.inline_decode_pixels:
                    pixels = preprocess(img, model.spec, limits, timings)
                    if timings is not None:
                        timings["decode"] += opened
                        timings["thread"] = 0.0
                    return pixels
                img.close()
            return await self.decoders.decode(data, model.spec, deadline=ticket.deadline, priority=ticket.priority,
                                              gone=ticket.gone, group=ticket, timings=timings)
        except ImageError as e:
            problem = (e.status, e.code, str(e))
        except DecodeFailed as e:
            problem = (e.status, e.code, e.message, e.headers)
        raise APIError(*problem)  # raised outside the handler, so no frame holding the upload stays referenced

    def check_count(self, n: int) -> None:
        """413 for more images in one request than ``max_images_per_request``."""
        if n > self.config.max_images_per_request:
            raise APIError(413, "too_many_images", f"{n} images in one request; the limit is "
                                                      f"{self.config.max_images_per_request}")

    async def decode_all(self, model: Model, images: list[bytes], ticket: Ticket | None = None) -> list:
        """Each image's pixels, or the ``APIError`` it earned (a bad image fails alone); the images take
        turns with other requests' in the decoding processes. What concerns the request rather than an
        image (its deadline passed, the server is full, the client left) fails the request."""
        ticket = ticket or Ticket()
        decoded: list = [None] * len(images)

        async def decode_one(i: int, data: bytes) -> None:
            try:
                decoded[i] = await self.decode(model, data, ticket=ticket)
            except APIError as e:
                decoded[i] = e

        async with anyio.create_task_group() as tg:
            for i, data in enumerate(images):
                tg.start_soon(decode_one, i, data)
        whole = next((d for d in decoded if isinstance(d, APIError) and d.code in REQUEST_CODES), None)
        if whole is not None:
            raise whole
        return decoded

    async def run(self, call: Call, pixels: np.ndarray, timings: dict | None = None, job=None):
        """The request's pixels through its version's batcher, in as many batches as N needs: a ``Prediction``, or
        with ``job`` (an explanation's) what the job gives; overload becomes 503, a passed deadline 504.
        ``timings`` gets ``queue`` (waiting for the first batch) and ``inference`` (the runs that carried
        these images)."""
        ticket, model = call.ticket, call.model
        problem = None
        t = time.perf_counter()
        start = ticket.start or t
        parts = timings if timings is not None else {}
        try:
            out = await call.served.batcher.submit(pixels, parts, deadline=ticket.deadline,
                                                   priority=ticket.priority, gone=ticket.gone, job=job,
                                                   marks=call.request.marks if call.request is not None else None)
            now = time.perf_counter()
            queue, infer = parts.get("queue", 0.0), parts.get("inference", 0.0)
            self.stats.request(model, len(pixels), True, now - start, t - start, queue, infer,
                               max(0.0, now - t - queue - infer))
            if self.rollout is not None and job is None:  # recorded for feedback; a sample shadowed
                self.rollout.answered(call, pixels, out)
            return out if job is not None else Prediction(model, *out)
        except Overloaded as e:
            problem = (503, "overloaded", str(e), {"Retry-After": str(e.retry_after)})
        except DeadlineExceeded:
            problem = (504, "deadline_exceeded", "the request's deadline (timeout_ms) passed before the model "
                                                 "could run it; it was not run")
        except ClientGone:
            problem = (499, "client_closed", "the client closed the connection while the request waited for "
                                             "the model; it was not run")
        self.stats.request(model, len(pixels), False, time.perf_counter() - start)
        raise APIError(*problem)

    async def classify(self, call: Call, data: bytes, timings: dict | None = None) -> dict:
        """One image's top-k. ``timings``, if given, gets the seconds of each stage (``metrics.STAGES``)."""
        model = call.model
        pixels = await self.decode(model, data, timings, call.ticket)
        p = await self.run(call, pixels[None], timings)
        t = time.perf_counter()
        probs, rows = p.assess(call.calibrated)
        result = {"model": model.name, "version": model.version, "predictions": model.top_k(probs, call.top_k)[0],
                  **rows[0]}
        if timings is not None:
            timings["respond"] = time.perf_counter() - t
        if self.capture is not None:
            self.capture.offer(call.request_id, model.name, model.version, data, "", result,
                               (time.perf_counter() - call.ticket.start) * 1000)
        return result

    def observe(self, model: str, timings: dict, method: str | None = None) -> None:
        """One request's stage timings into the ``cnnserve_request_stage_seconds`` histogram, or for an
        explanation (``method``) into ``cnnserve_explain_stage_seconds``."""
        if self.metrics:
            for stage, seconds in timings.items():
                key = (model, stage, method)
                child = self._stage_metrics.get(key)
                if child is None:
                    child = self._stage_metrics[key] = (self.metrics.stage.labels(model, stage) if method is None
                                                        else self.metrics.explain.labels(model, method, stage))
                child.observe(seconds)

    async def classify_many(self, call: Call, files: list[tuple[str, bytes]]) -> dict:
        """Per-image results in order; a bad image gets its own error entry, the others still run."""
        model = call.model
        if not files:
            raise APIError(400, "no_images", "send one or more images in the form field 'images'")
        self.check_count(len(files))

        decoded = await self.decode_all(model, [data for _, data in files], call.ticket)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, APIError)]
        preds = []
        if good:
            p = await self.run(call, np.stack([decoded[i] for i in good]))
            probs, rows = p.assess(call.calibrated, finite=False)
            # an image the model answered NaN or infinity for fails alone, as a bad image does
            bad = set(not_finite_rows(p.logits, p.probabilities, p.ood))
            for j in bad:
                decoded[good[j]] = model_output_not_finite(model.name, model.version, [good[j]])
            keep = [j for j in range(len(good)) if j not in bad]
            preds = [{"predictions": top, **rows[j]} for j, top in zip(keep, model.top_k(probs[keep], call.top_k))]
            good = [good[j] for j in keep]
        by_index = dict(zip(good, preds))
        if self.capture is not None:  # each image of the batch is a sample of its own (its id: the request's, -i)
            ms, rid = (time.perf_counter() - call.ticket.start) * 1000, call.request_id
            for i, pred in by_index.items():
                self.capture.offer(rid and f"{rid}-{i}", model.name, model.version, files[i][1], "", pred, ms)
        results = []
        for i, (filename, _) in enumerate(files):
            if i in by_index:
                results.append({"index": i, "filename": filename, **by_index[i]})
            else:
                err = decoded[i]
                results.append({"index": i, "filename": filename,
                                "error": {"status": err.status, "code": err.code, "message": err.message}})
        return {"model": model.name, "version": model.version, "results": results}

    def describe(self) -> dict:
        return {"default": self.registry.default, "loaded": self.registry.loaded(), "models": [
            {**s.model.describe(), "batching": s.batcher.describe()} for s in self.registry.current()]}

    def close(self) -> None:
        if self.monitor:
            self.monitor.close()
        if self.capture is not None:
            self.capture.close()
        self.registry.close()
        self.decoders.close()
