"""The serving core: models, their batchers, and the request logic; no HTTP, no BentoML.

``service.py`` wraps an ``Engine`` in a BentoML service and ``api.py`` maps HTTP to
its methods. Every refusal is an ``APIError`` carrying its HTTP status, a short code
and a message that names the problem, so nothing a client sends becomes a 500.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import anyio
import numpy as np

from cnnserve import onnxmeta

from .batching import MicroBatcher, Overloaded
from .preprocess import ImageError, Limits, open_image, preprocess
from .runtime import Model

log = logging.getLogger("cnnserve.engine")


# Where one /classify request's time goes, in order (seconds; the Server-Timing header and the
# cnnserve_request_stage_seconds histogram carry them). ``total`` is the handler's time from entry
# to a serialised response; what a client sees beyond it is HTTP parsing, the framework and the network.
STAGES = {
    "read": "receiving the request body and parsing the form",
    "decode": "Pillow decoding the image (JPEG draft mode included)",
    "resize": "mode conversion, resize and array layout",
    "thread": "handing the image to a worker thread and back",
    "queue": "waiting for the model (the batch before this one, and batching)",
    "inference": "the onnxruntime run of the batch that carried the image",
    "respond": "top-k, the JSON body and its serialisation",
    "total": "all of the above, from handler entry to a serialised response",
}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": self.message, "code": self.code}


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64
    max_wait_ms: float = 0.0
    max_queue: int = 1024  # images waiting per model before 503
    max_images_per_request: int = 256
    inline_decode_pixels: int = 128 * 128  # images up to this size decode on the event loop
    default_top_k: int = 5
    limits: Limits = Limits()


class Engine:
    def __init__(self, models: list[Model], config: EngineConfig = EngineConfig(), metrics=None):
        if not models:
            raise ValueError("no models to serve")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {names}")
        self.config, self.metrics = config, metrics
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.batchers = {m.name: self._batcher(m) for m in models}
        self.started = time.time()
        self._stage_metrics: dict = {}  # (model, stage) -> histogram child, looked up once

    def _batcher(self, model: Model) -> MicroBatcher:
        outputs = list(onnxmeta.OUTPUTS)

        def run(pixels: np.ndarray) -> np.ndarray:  # logits and probabilities side by side
            return np.concatenate(model.run(pixels, outputs), axis=1)

        def observe(n: int, seconds: float) -> None:
            if self.metrics:
                self.metrics.batch_size.labels(model.name).observe(n)
                self.metrics.inference.labels(model.name).observe(seconds)

        return MicroBatcher(run, self.config.max_batch_size, self.config.max_wait_ms, self.config.max_queue,
                            observe, model.name)

    @property
    def ready(self) -> bool:
        return all(m.warmup_ms > 0 for m in self.models.values())

    # -- lookups and validation --------------------------------------------------------------

    def model(self, name: str | None = None, version: str | None = None) -> Model:
        name = name or self.default
        model = self.models.get(name)
        if model is None:
            raise APIError(404, "unknown_model", f"no model named {name!r}; serving: {', '.join(self.models)}")
        if version not in (None, "", model.version):
            raise APIError(404, "unknown_version", f"model {name!r} has version {model.version!r}, not {version!r}")
        return model

    def top_k(self, model: Model, k: int | None) -> int:
        """The number of classes to return: the default is clamped to the model's classes, an explicit
        value out of range is refused."""
        n = model.spec.num_classes
        if k is None:
            return min(self.config.default_top_k, n)
        if not 1 <= k <= n:
            raise APIError(400, "bad_top_k", f"top_k must be between 1 and {n} for model {model.name!r}, got {k}")
        return k

    # -- images --------------------------------------------------------------------------------

    async def decode(self, model: Model, data: bytes, timings: dict | None = None) -> np.ndarray:
        """Bytes to the model's uint8 input; a bad image fails here, alone. The header is read on the
        event loop; an image of at most ``inline_decode_pixels`` is decoded there too (faster than a
        thread hand-off), a larger one in a worker thread. ``timings`` gets ``decode``, ``resize`` and
        ``thread`` (the hand-off to the thread and back)."""
        t = time.perf_counter()
        try:
            img = open_image(data, self.config.limits)
            opened = time.perf_counter() - t
            w, h = img.size
            if w * h <= self.config.inline_decode_pixels:
                pixels = preprocess(img, model.spec, self.config.limits, timings)
            else:
                pixels = await anyio.to_thread.run_sync(preprocess, img, model.spec, self.config.limits, timings)
        except ImageError as e:
            raise APIError(e.status, e.code, str(e)) from None
        if timings is not None:
            timings["decode"] += opened
            timings["thread"] = time.perf_counter() - t - timings["decode"] - timings["resize"]
        return pixels

    async def run(self, model: Model, pixels: np.ndarray, timings: dict | None = None) -> np.ndarray:
        """Logits and probabilities (N x 2K) through the model's batcher; overload becomes 503.
        ``timings`` gets ``queue`` (waiting for a batch) and ``inference`` (the batch's run)."""
        try:
            return await self.batchers[model.name].submit(pixels, timings)
        except Overloaded as e:
            raise APIError(503, "overloaded", str(e), {"Retry-After": str(e.retry_after)}) from None

    async def classify(self, data: bytes, name: str | None = None, top_k: int | None = None,
                       timings: dict | None = None) -> dict:
        """One image's top-k. ``timings``, if given, gets the seconds of each stage (``STAGES``)."""
        model = self.model(name)
        k = self.top_k(model, top_k)
        pixels = await self.decode(model, data, timings)
        out = await self.run(model, pixels[None], timings)
        t = time.perf_counter()
        probs = out[:, model.spec.num_classes:]
        result = {"model": model.name, "version": model.version, "predictions": model.top_k(probs, k)[0]}
        if timings is not None:
            timings["respond"] = time.perf_counter() - t
        return result

    def observe(self, model: str, timings: dict) -> None:
        """One request's stage timings into the ``cnnserve_request_stage_seconds`` histogram."""
        if self.metrics:
            for stage, seconds in timings.items():
                child = self._stage_metrics.get((model, stage))
                if child is None:
                    child = self._stage_metrics[model, stage] = self.metrics.stage.labels(model, stage)
                child.observe(seconds)

    async def classify_many(self, files: list[tuple[str, bytes]], name: str | None = None,
                            top_k: int | None = None) -> dict:
        """Per-image results in order; a bad image gets its own error entry, the others still run."""
        model = self.model(name)
        k = self.top_k(model, top_k)
        if not files:
            raise APIError(400, "no_images", "send one or more images in the form field 'images'")
        if len(files) > self.config.max_images_per_request:
            raise APIError(413, "too_many_images", f"{len(files)} images in one request; the limit is "
                                                      f"{self.config.max_images_per_request}")

        decoded: list = [None] * len(files)

        async def decode_one(i: int, data: bytes) -> None:
            try:
                decoded[i] = await self.decode(model, data)
            except APIError as e:
                decoded[i] = e

        async with anyio.create_task_group() as tg:  # images decode in parallel worker threads
            for i, (_, data) in enumerate(files):
                tg.start_soon(decode_one, i, data)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, APIError)]
        preds = []
        if good:
            out = await self.run(model, np.stack([decoded[i] for i in good]))
            preds = model.top_k(out[:, model.spec.num_classes:], k)
        by_index = dict(zip(good, preds))
        results = []
        for i, (filename, _) in enumerate(files):
            if i in by_index:
                results.append({"index": i, "filename": filename, "predictions": by_index[i]})
            else:
                err = decoded[i]
                results.append({"index": i, "filename": filename,
                                "error": {"status": err.status, "code": err.code, "message": err.message}})
        return {"model": model.name, "version": model.version, "results": results}

    def describe(self) -> dict:
        return {"default": self.default, "models": [m.describe() for m in self.models.values()]}

    # -- Open Inference Protocol (KServe v2) ---------------------------------------------------

    def v2_model_metadata(self, name: str, version: str | None = None) -> dict:
        m = self.model(name, version)
        d = m.describe()
        return {"name": m.name, "versions": [m.version] if m.version else [], "platform": "onnxruntime_onnx",
                "inputs": [d["input"]], "outputs": d["outputs"]}

    def parse_v2(self, body: bytes, header_length: str | None) -> tuple[dict, bytes]:
        """The JSON part of an infer request and, with the binary tensor extension, the binary part."""
        if header_length is not None:
            try:
                n = int(header_length)
                assert 0 <= n <= len(body)
            except (ValueError, AssertionError):
                raise APIError(400, "bad_request", f"Inference-Header-Content-Length {header_length!r} "
                                                      f"does not fit a body of {len(body)} bytes") from None
            head, binary = body[:n], body[n:]
        else:
            head, binary = body, b""
        try:
            req = json.loads(head or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, "bad_json", f"the request is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise APIError(400, "bad_request", "the request must be a JSON object with 'inputs'")
        return req, binary

    def v2_tensor(self, model: Model, req: dict, binary: bytes) -> np.ndarray:
        inputs = req.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise APIError(400, "bad_request", f"'inputs' must hold exactly one tensor named {onnxmeta.INPUT!r}")
        t = inputs[0]
        c, h, w = model.spec.input_shape
        if t.get("name") != onnxmeta.INPUT:
            raise APIError(400, "bad_input_name", f"input must be named {onnxmeta.INPUT!r}, got {t.get('name')!r}")
        if t.get("datatype") != "UINT8":
            raise APIError(400, "bad_datatype", f"input datatype must be UINT8, got {t.get('datatype')!r}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) for s in shape)
                or shape[1:] != [c, h, w] or shape[0] < 1):
            raise APIError(400, "bad_shape", f"input shape must be [N, {c}, {h}, {w}] with N >= 1, got {shape}")
        if shape[0] > self.config.max_images_per_request:
            raise APIError(413, "too_many_images", f"{shape[0]} images in one request; the limit is "
                                                      f"{self.config.max_images_per_request}")
        count = shape[0] * c * h * w
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count or len(binary) < size:
                raise APIError(400, "bad_binary", f"binary_data_size {size} does not match shape {shape} "
                                                     f"({count} bytes) or the {len(binary)} bytes sent")
            return np.frombuffer(binary[:size], np.uint8).reshape(shape)
        data = t.get("data")
        if data is None:
            raise APIError(400, "bad_request", "input has neither 'data' nor binary_data_size")
        try:
            arr = np.asarray(data)
        except ValueError:
            raise APIError(400, "bad_data", "input data is ragged (rows of different lengths)") from None
        if arr.size != count or arr.dtype.kind not in "iu":
            raise APIError(400, "bad_data", f"input data must be {count} integers for shape {shape}, "
                                               f"got {arr.size} values of type {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise APIError(400, "bad_data", "UINT8 data must lie in 0..255")
        return arr.astype(np.uint8).reshape(shape)

    async def v2_infer(self, name: str, version: str | None, body: bytes, header_length: str | None) -> dict:
        model = self.model(name, version)
        req, binary = self.parse_v2(body, header_length)
        pixels = self.v2_tensor(model, req, binary)
        wanted = [o.get("name") if isinstance(o, dict) else o for o in (req.get("outputs") or [])] or \
            list(onnxmeta.OUTPUTS)
        unknown = [o for o in wanted if o not in onnxmeta.OUTPUTS]
        if unknown:
            raise APIError(400, "bad_output", f"unknown outputs {unknown}; this model has {list(onnxmeta.OUTPUTS)}")
        out = await self.run(model, pixels)
        k = model.spec.num_classes
        parts = {"logits": out[:, :k], "probabilities": out[:, k:]}
        resp = {"model_name": model.name, "model_version": model.version,
                "outputs": [{"name": o, "datatype": "FP32", "shape": list(parts[o].shape),
                             "data": parts[o].ravel().tolist()} for o in wanted]}
        if "id" in req:
            resp["id"] = req["id"]
        return resp

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
