"""Triton Inference Server through PyTriton (``nvidia-pytriton``: the real ``tritonserver`` with its HTTP front
end and dynamic batcher) serving ``model.onnx`` with onnxruntime: a Python inference function bound as a Triton
model (``@batch``), ``ModelConfig(max_batch_size, batcher=DynamicBatcher(max_queue_delay_microseconds))``, and
``instances`` copies of the function (Triton's model instances). Triton parses the Open Inference Protocol itself
(JSON tensors and the binary tensor extension). Encoded images are not taken (no decoding model here).

PyTriton 0.7.0 runs on Python 3.12 here, with numpy 1.26.4 (pins.py says why), in its own environment:

    triton-venv/bin/python triton_serve.py --onnx model.onnx --name NAME --port P --settings '{...}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


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

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from peer_model import INPUT, OUTPUT, Classifier

    def instance():
        model = Classifier(args.onnx, s.get("threads", 0), s.get("spin", True))

        @batch
        def infer(**inputs):
            return {OUTPUT: model.run(inputs[INPUT])}

        return infer, model

    funcs = [instance() for _ in range(s.get("instances", 1))]
    m = funcs[0][1]
    config = ModelConfig(max_batch_size=s.get("max_batch_size", 4),
                         batcher=DynamicBatcher(max_queue_delay_microseconds=s.get("max_queue_delay_us", 0)))
    triton_config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                                 grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0)
    with Triton(config=triton_config) as triton:
        triton.bind(model_name=args.name, infer_func=[f for f, _ in funcs],
                    inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=(m.channels, m.height, m.width))],
                    outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(m.classes,))],
                    config=config, strict=False)
        print("triton ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
