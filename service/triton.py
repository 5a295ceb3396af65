"""Triton's model configuration and statistics extensions, filled from what the service really does, in
Triton's shapes, so that tools that read a model before they load it (``tritonclient``'s ``get_model_config``
and ``get_inference_statistics``, perf_analyzer, model_analyzer) work unchanged.

- **Configuration** (``GET /v2/models/NAME[/versions/V]/config``, gRPC ``ModelConfig``): the model's input and
  outputs (the dims without the batch axis), ``max_batch_size``, the dynamic batcher as this server runs it
  (``max_wait_ms`` as ``max_queue_delay_microseconds``, ``max_queue``, ``timeout_ms``, two priority levels:
  interactive and bulk), the instance group (CPU or the GPU it runs on, ``runs_in_flight`` as the count) and the
  version policy (``keep_versions`` newest).
- **Statistics** (``GET /v2/models[/NAME[/versions/V]]/stats``, gRPC ``ModelStatistics``): per loaded version,
  every request that reached the model (any protocol) as ``success`` or ``fail`` with its time from arrival to
  its results, split into ``compute_input`` (arrival to the model's queue: reading, parsing, decoding),
  ``queue`` (waiting for a batch), ``compute_infer`` (the onnxruntime run that carried it) and ``compute_output``
  (its rows handed back); ``inference_count`` (images) and ``execution_count`` (batches); and per batch size the
  batches run, their input (stacking the requests' images), run and output (splitting the rows) times. Serialising
  the answer is each protocol's and is not counted (Triton counts it in ``success``).

**Every worker's figures.** A server's workers each count their own; each writes its figures to the server's
folder (``stats/PID.json``) at most every ``model_sync_s`` seconds, from the thread that follows the served set,
and an answer sums every worker's (a worker killed since keeps its last figures: its requests were served). So a
client's requests show within about ``model_sync_s`` seconds, whichever worker answered them.
"""

from __future__ import annotations

import json
import os

from fastapi import APIRouter, Request

from cnnserve.core import onnxmeta
from cnnserve.core.runtime import CPU

from .answers import BATCH_PARTS, REQUEST_PARTS, Statistics
from .engine import Engine
from .incoming import EngineDep

TAGS = ["open inference protocol: Triton's model configuration and statistics extensions"]
router = APIRouter(tags=TAGS)

def _duration(pair) -> dict:
    return {"count": pair[0], "ns": pair[1]}


def model_stats(engine: Engine, sync, name: str | None = None, version: str | None = None) -> dict:
    """Triton's ``$stats_model_response`` for every loaded version, every version of ``name``, or one, summed over
    the workers of ``sync``'s server (``workers.WorkerSync``; None: this process alone)."""
    loaded = engine.registry.loaded()
    if name:
        m = engine.model(name, version)  # 404 in the service's words for what is not served
        wanted = [(m.name, v) for v in loaded.get(m.name, [m.version]) if not version or v == m.version]
    else:
        wanted = [(n, v) for n, versions in loaded.items() for v in versions]
    figures = engine.stats.merged(sync.state.folder if sync is not None else None)
    out = []
    for n, v in wanted:
        s = figures.get(f"{n}:{v}") or Statistics._fresh(n, v)
        out.append({"name": n, "version": v, "last_inference": s["last_inference"],
                    "inference_count": s["inference_count"], "execution_count": s["execution_count"],
                    "inference_stats": {p: _duration(s["inference_stats"][p]) for p in REQUEST_PARTS},
                    "batch_stats": [{"batch_size": int(size), **{p: _duration(parts[p]) for p in BATCH_PARTS}}
                                    for size, parts in sorted(s["batch_stats"].items(), key=lambda i: int(i[0]))],
                    "memory_usage": []})
    return {"model_stats": out}


def model_config(engine: Engine, name: str, version: str | None = None) -> dict:
    """Triton's model configuration (``model_config.proto`` as JSON, its field names) of a served version."""
    m = engine.model(name, version)
    c = engine.config
    k = m.spec.num_classes
    on_gpu = m.providers[0] != CPU
    return {
        "name": m.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": max(1, c.keep_versions)}},
        "max_batch_size": c.max_batch_size,
        "input": [{"name": onnxmeta.INPUT, "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW",
                   "dims": list(m.spec.input_shape)}],
        "output": [{"name": o, "data_type": "TYPE_FP32", "dims": [k]} for o in onnxmeta.OUTPUTS],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(c.max_wait_ms * 1000),
            "priority_levels": 2, "default_priority_level": 1,  # 1 interactive, 2 bulk (the ``priority`` parameter)
            "default_queue_policy": {"timeout_action": "REJECT",
                                     "default_timeout_microseconds": int(c.timeout_ms * 1000),
                                     "allow_timeout_override": True, "max_queue_size": c.max_queue}},
        "instance_group": [{"name": m.name, "kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": c.runs_in_flight,
                            **({"gpus": [c.device_id]} if on_gpu else {})}],
        "default_model_filename": os.path.basename(m.choice.get("file", onnxmeta.MODEL_FILE)),
        "parameters": {"cnnserve_version": {"string_value": m.version},
                       "precision": {"string_value": m.info.precision},
                       "labels": {"string_value": json.dumps(list(m.spec.labels))}},
    }


@router.get("/v2/models/stats", summary="Statistics of every loaded model version (Triton's extension)")
@router.get("/v2/models/{name}/stats", summary="Statistics of every loaded version of a model")
@router.get("/v2/models/{name}/versions/{version}/stats", summary="Statistics of one loaded version")
async def stats_route(request: Request, engine: EngineDep, name: str | None = None, version: str | None = None):
    return model_stats(engine, getattr(request.app.state, "sync", None), name, version)


@router.get("/v2/models/{name}/config", summary="The model's configuration, as Triton gives it")
@router.get("/v2/models/{name}/versions/{version}/config", summary="One version's configuration")
async def config_route(name: str, engine: EngineDep, version: str | None = None):
    return model_config(engine, name, version)
