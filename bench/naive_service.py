"""BASELINE, NOT CNNSERVE: the naive BentoML service that `cnnserve bench` compares against.

This is the service a user would copy from BentoML's ONNX guide: an
``onnxruntime.InferenceSession`` in ``__init__``, and a batchable API that takes
``list[PIL.Image.Image]`` and leaves BentoML's adaptive batching at its defaults
(max_batch_size 100, max_latency_ms 60000), one worker. Pre-processing is the plain
per-image PIL call such examples use. It serves the same exported model as cnnserve,
so the comparison measures the serving path only. It has none of cnnserve's input
checks, limits or metrics: keep it out of production.

    bentoml serve bench.naive_service:NaiveOnnx --arg model=lenet5-digits:latest

Clients send multipart form data with the image in the field ``images``.
"""

from __future__ import annotations

import json

import bentoml
import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import BaseModel

from cnnserve.core.onnxmeta import INPUT, MODEL_FILE, PROBABILITIES


class NaiveArgs(BaseModel):
    model: str = "lenet5-digits:latest"


ARGS = bentoml.use_arguments(NaiveArgs)


@bentoml.service(name="naive-onnx")
class NaiveOnnx:
    bento_model = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        self.session = ort.InferenceSession(self.bento_model.path_of(MODEL_FILE), providers=["CPUExecutionProvider"])
        _, self.channels, self.height, self.width = self.session.get_inputs()[0].shape
        self.labels = json.loads(self.session.get_modelmeta().custom_metadata_map["cnnserve.labels"])

    @bentoml.api(batchable=True)
    def classify(self, images: list[Image.Image]) -> list[dict]:
        mode = "L" if self.channels == 1 else "RGB"
        batch = []
        for img in images:
            a = np.asarray(img.convert(mode).resize((self.width, self.height)), dtype=np.uint8)
            batch.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        probs = self.session.run([PROBABILITIES], {INPUT: np.stack(batch)})[0]
        return [{"label": self.labels[int(p.argmax())], "probability": float(p.max())} for p in probs]
