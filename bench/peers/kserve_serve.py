"""KServe's Python model server (``kserve.Model`` + ``ModelServer``, REST v1/v2) serving ``model.onnx`` with
onnxruntime, as KServe's custom-model guide writes one: ``predict`` takes the v2 ``InferRequest`` (JSON or the
binary tensor extension, parsed by KServe) and answers an ``InferResponse``. A BYTES input named ``image``
(base64 encoded images) is decoded with Pillow. KServe's Python server has no batcher of its own (KServe batches
in its agent sidecar, a Kubernetes component): each request runs alone. Runs in the peer's environment:

    kserve-venv/bin/python kserve_serve.py --onnx model.onnx --name NAME --port P --settings '{"workers": 1}'
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ap = argparse.ArgumentParser()
ap.add_argument("--onnx", required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--settings", default="{}")
args, _ = ap.parse_known_args()
s = json.loads(args.settings)
# ModelServer reads its defaults from the command line when kserve is imported: give it its own
sys.argv = [sys.argv[0], "--http_port", str(args.port), "--enable_grpc", "false", "--workers", str(s.get("workers", 1)),
            "--enable_latency_logging", str(s.get("latency_logging", True)).lower(), *sys.argv[1:]]

import kserve  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402

from peer_model import IMAGE, OUTPUT, Classifier  # noqa: E402


class OnnxModel(kserve.Model):
    """At module level, and without its session when pickled: with ``workers`` > 1 KServe sends the model to
    each worker process, which makes its own session on first use."""

    def __init__(self, name: str):
        super().__init__(name)
        self.model = None
        self.load()

    def load(self) -> bool:
        self.model = Classifier(args.onnx, s.get("threads", 0), s.get("spin", True))
        self.ready = True
        return True

    def __getstate__(self):
        return {**self.__dict__, "model": None}

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        if self.model is None:
            self.load()
        t = payload.inputs[0]
        x = self.model.images(t.as_numpy().ravel()) if t.name == IMAGE else t.as_numpy()
        probs = self.model.run(x)
        out = InferOutput(name=OUTPUT, shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs, binary_data=False)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[out])


if __name__ == "__main__":
    kserve.ModelServer().start([OnnxModel(args.name)])
