"""cnnserve's own Prometheus metrics, served by BentoML at /metrics beside its own.

Created on first use inside the running worker (never at import): BentoML sets
PROMETHEUS_MULTIPROC_DIR at worker start, and metrics created before that would never
reach /metrics. Created once per process.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    seconds = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    return SimpleNamespace(
        batch_size=Histogram("cnnserve_batch_size", "Images per onnxruntime run (batch formed)", ["model"],
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        inference=Histogram("cnnserve_inference_seconds", "Time of one onnxruntime run", ["model"], buckets=seconds),
        stage=Histogram("cnnserve_request_stage_seconds", "Time of one /classify request in each stage "
                        "(service.engine.STAGES)", ["model", "stage"], buckets=seconds),
        explain=Histogram("cnnserve_explain_stage_seconds", "Time of one /classify/explain request in each stage "
                          "(read, decode, resize, queue, inference, explain: the map and its PNG, total)",
                          ["model", "method", "stage"], buckets=seconds),
        rejected=Counter("cnnserve_rejected_requests", "Requests refused, by reason", ["reason"]),
        # the autoscaling metric (deploy/kubernetes): summed over a pod's workers
        queued=Gauge("cnnserve_queued_images", "Images waiting for or in the model, as each batch starts and ends",
                     ["model"], multiprocess_mode="livesum"),
    )
