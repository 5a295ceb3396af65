"""Seldon's MLServer serving ``model.onnx`` with onnxruntime through a custom runtime (an ``MLModel``, as
MLServer's custom-runtime guide writes one), with its adaptive batching (``max_batch_size``, ``max_batch_time``
in model-settings.json) and its inference pool (``parallel_workers``). A BYTES input named ``image`` (base64
encoded images) is decoded with Pillow. MLServer's REST server reads JSON tensors only (no binary tensor
extension). Runs in the peer's environment:

    mlserver-venv/bin/python mlserver_serve.py --onnx model.onnx --name NAME --port P --settings '{...}'

which writes the settings files into a folder of their own and runs ``mlserver start`` on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mlserver import MLModel  # noqa: E402
from mlserver.codecs import NumpyCodec  # noqa: E402
from mlserver.types import InferenceRequest, InferenceResponse  # noqa: E402


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        from peer_model import Classifier

        extra = self.settings.parameters.extra or {}
        self.model = Classifier(self.settings.parameters.uri, extra.get("threads", 0), extra.get("spin", True))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        from peer_model import IMAGE, OUTPUT

        t = payload.inputs[0]
        if t.name == IMAGE:
            items = t.data.root if hasattr(t.data, "root") else t.data
            x = self.model.images(items)
        else:
            x = NumpyCodec.decode_input(t)
        probs = self.model.run(x)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(OUTPUT, probs)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--settings", default="{}")
    args = ap.parse_args()
    s = json.loads(args.settings)
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": args.port, "grpc_port": args.grpc_port, "metrics_port": args.metrics_port,
        "parallel_workers": s.get("parallel_workers", 1), "debug": False,
        "metrics_dir": str(folder / ".metrics"), "environments_dir": str(folder / ".envs")}))
    model = {"name": args.name, "implementation": "mlserver_serve.OnnxRuntime",
             "parameters": {"uri": args.onnx, "extra": {"threads": s.get("threads", 0), "spin": s.get("spin", True)}}}
    if s.get("max_batch_size"):
        model.update(max_batch_size=s["max_batch_size"], max_batch_time=s.get("max_batch_time", 0.0))
    (folder / "model-settings.json").write_text(json.dumps(model))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    os.chdir(folder)
    # its command's entry point, run by this interpreter (the console script's first line names the folder the
    # environment was made in, which may have moved)
    os.execv(sys.executable, [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.argv[0] = "
                              "'mlserver'; main()", "start", str(folder)])


if __name__ == "__main__":
    main()
