"""Ray Serve serving ``model.onnx`` with onnxruntime, as Ray Serve's guides write a model deployment: a
deployment with a FastAPI ingress answering the Open Inference Protocol's infer route (JSON tensors, the binary
tensor extension, BYTES ``image`` inputs), whose requests meet in ``@serve.batch`` (``max_batch_size``,
``batch_wait_timeout_s``) before one onnxruntime run; ``num_replicas`` copies of it behind Ray's HTTP proxy.
Ray Serve does not speak the protocol itself: the parsing is ``peer_model.parse_v2``, what a user would write.
Runs in the peer's environment, a one-node Ray of its own:

    rayserve-venv/bin/python rayserve_serve.py --onnx model.onnx --name NAME --port P --settings '{...}'
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations (Request) at definition
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--settings", default="{}")
    args = ap.parse_args()
    s = json.loads(args.settings)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])  # for the replicas

    import numpy as np
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from ray import serve

    app = FastAPI()
    batch_options = {k: s[k] for k in ("max_batch_size", "batch_wait_timeout_s") if k in s}

    @serve.deployment(num_replicas=s.get("num_replicas", 1), ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=s.get("max_ongoing_requests", 100))
    @serve.ingress(app)
    class Classifier:
        def __init__(self, path: str, threads: int, spin: bool):
            from peer_model import Classifier as Model

            self.model = Model(path, threads, spin)

        @serve.batch(**batch_options)
        async def run(self, xs: list) -> list:
            sizes = [len(x) for x in xs]
            probs = self.model.run(np.concatenate(xs))
            return np.split(probs, np.cumsum(sizes)[:-1])

        @app.post("/v2/models/{name}/infer")
        async def infer(self, name: str, request: Request) -> Response:
            from peer_model import answer_v2, parse_v2

            x = parse_v2(self.model, await request.body(), request.headers.get("inference-header-content-length"))
            return Response(answer_v2(name, await self.run(x)), media_type="application/json")

        @app.get("/v2/models/{name}/ready")
        async def ready(self, name: str) -> dict:
            return {"ready": True}

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.environ["PYTHONPATH"]}}, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Classifier.bind(args.onnx, s.get("threads", 0), s.get("spin", True)), name=args.name, route_prefix="/")
    print("ray serve ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
