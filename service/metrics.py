"""cnnserve's own Prometheus metrics, served by BentoML at /metrics beside its own, and the one rule
for what a metric label may hold.

Created on first use inside the running worker (never at import): ``startup.begin()`` points
PROMETHEUS_MULTIPROC_DIR at the server's own folder when the service module loads, and metrics
created before that would never reach /metrics. Created once per process.

**Every label takes its values from a closed set**: model names that are served, stage and method
names of the code, refusal codes of the code, and for a request's path its route template
(``/v2/models/{name}/infer``) or ``other``. A label that took whatever a client sent would add a
series per value, each kept in every worker and in /metrics for good (measured: 6,000 requests to
``/nope/<uuid>`` added 128 MB to a worker and 25 MB to /metrics through BentoML's own request
metrics). ``ROUTES`` gives the path label; ``patches.py`` makes BentoML's request metrics use it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from types import SimpleNamespace

# Where one /classify request's time goes, in order (seconds; the Server-Timing header and the
# cnnserve_request_stage_seconds histogram carry them). ``total`` is the handler's time from entry
# to a serialised response; what a client sees beyond it is HTTP parsing, the framework and the network.
STAGES = {
    "read": "receiving the request body and parsing the form",
    "decode": "Pillow decoding the image (JPEG draft mode included)",
    "resize": "mode conversion, resize and array layout",
    "thread": "waiting for a decoding process, and handing the image to it and back",
    "queue": "waiting for the model (the batch before this one, and batching)",
    "inference": "the onnxruntime run of the batch that carried the image",
    "respond": "top-k, the JSON body and its serialisation",
    "total": "all of the above, from handler entry to a serialised response",
}

OTHER = "other"
#: BentoML's own routes beside the service's app (health, metrics, its OpenAPI page and assets).
BENTOML_ROUTES = ("/", "/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/schema.json",
                  "/static_content/{path}", "/assets/{path}")


class RouteLabels:
    """A request path to its route's template (``/models/lenet5`` -> ``/models/{name}``), or ``other``:
    a closed set, whatever the paths clients send."""

    CACHE = 1024  # exact paths remembered (bounded too: a client cannot grow it past this)

    def __init__(self, templates=BENTOML_ROUTES) -> None:
        self.exact: dict[str, str] = {}
        self.patterns: list[tuple[re.Pattern, str]] = []
        for template in templates:
            self.add(template)

    def add(self, template: str, pattern: re.Pattern | None = None) -> None:
        if pattern is None and "{" not in template:
            self.exact[template] = template
            return
        if pattern is None:
            pattern = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: "(?P<%s>.*)" % m.group(1)
                                              if m.group(1) == "path" else "(?P<%s>[^/]+)" % m.group(1),
                                              re.escape(template)) + "$")
        self.patterns.append((pattern, template))

    def add_app(self, app) -> "RouteLabels":
        """Every route of a Starlette or FastAPI app: its path template, a mount's as ``PREFIX/{path}``."""
        from starlette.routing import Mount

        for route in getattr(app, "routes", ()):
            included = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps an included router whole
            if included is not None:
                self.add_app(included)
                continue
            path, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
            if path is None or regex is None:
                continue
            if isinstance(route, Mount):
                self.add(path.rstrip("/") + "/{path}", regex)
            elif "{" in path:
                self.add(path, regex)
            else:
                self.exact[path] = path
        return self

    def label(self, path: str) -> str:
        found = self.exact.get(path)
        if found is not None:
            return found
        for pattern, template in self.patterns:
            if pattern.match(path):
                if len(self.exact) < self.CACHE and "{" not in path:
                    self.exact[path] = template
                return template
        return OTHER


#: The path labels of this process's service (``service.py`` adds its app's routes).
ROUTES = RouteLabels()


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    from prometheus_client import Counter, Gauge, Histogram

    seconds = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    return SimpleNamespace(
        batch_size=Histogram("cnnserve_batch_size", "Images per onnxruntime run (batch formed)", ["model"],
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
        inference=Histogram("cnnserve_inference_seconds", "Time of one onnxruntime run", ["model"], buckets=seconds),
        stage=Histogram("cnnserve_request_stage_seconds", "Time of one /classify request in each stage "
                        "(service.metrics.STAGES)", ["model", "stage"], buckets=seconds),
        explain=Histogram("cnnserve_explain_stage_seconds", "Time of one /classify/explain request in each stage "
                          "(read, decode, resize, queue, inference, explain: the map and its PNG, total)",
                          ["model", "method", "stage"], buckets=seconds),
        rejected=Counter("cnnserve_rejected_requests", "Requests refused, by reason and protocol (http, grpc)",
                         ["reason", "protocol"]),
        # gRPC calls by method and status code (HTTP's are BentoML's bentoml_service_request_* by route)
        requests=Histogram("cnnserve_request_seconds", "Time of one call, by protocol, endpoint (a served "
                           "method) and status", ["protocol", "endpoint", "status"], buckets=seconds),
        # callers by their API key's name from the keys file (service/apikeys.py): a closed set the operator writes
        api_key_requests=Counter("cnnserve_api_key_requests", "Inference requests with a valid API key, by the key's "
                                 "name and protocol", ["key", "protocol"]),
        # the autoscaling metric (deploy/kubernetes): summed over a pod's workers
        queued=Gauge("cnnserve_queued_images", "Images waiting for or in the model, as each batch starts and ends",
                     ["model"], multiprocess_mode="livesum"),
        # models at runtime (service/registry.py); the model label is a stored model's name, never a version
        model_loads=Counter("cnnserve_model_loads", "Model versions loaded at runtime, by result",
                            ["model", "result"]),
        model_unloads=Counter("cnnserve_model_unloads", "Model versions released (unloaded or replaced)", ["model"]),
        model_evictions=Counter("cnnserve_model_evictions", "Idle model versions evicted for max_model_memory_mb",
                                ["model"]),
        model_load_seconds=Histogram("cnnserve_model_load_seconds", "Time to load, choose the precision of and "
                                     "warm one model version", ["model"],
                                     buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        model_resident_bytes=Gauge("cnnserve_model_resident_bytes", "Memory of a model's loaded versions (what the "
                                   "worker grew by as each loaded), the largest over the workers", ["model"],
                                   multiprocess_mode="livemax"),
        # a rollout (service/rollout.py), set from the server's one rollout file: every worker the same figure
        feedback_labelled=Gauge("cnnserve_feedback_labelled", "Answers of a version a client labelled (feedback)",
                                ["model", "version"], multiprocess_mode="livemax"),
        feedback_accuracy=Gauge("cnnserve_feedback_accuracy", "Share of a version's labelled answers that were right",
                                ["model", "version"], multiprocess_mode="livemax"),
        feedback_confusion=Gauge("cnnserve_feedback_confusion", "Labelled answers of a version by true and answered "
                                 "class (the most labelled classes)", ["model", "version", "label", "predicted"],
                                 multiprocess_mode="livemax"),
        shadow_agreement=Gauge("cnnserve_shadow_agreement", "Share of shadowed requests whose top-1 the candidate "
                               "agreed on", ["model", "primary", "candidate"], multiprocess_mode="livemax"),
        shadow_dropped=Gauge("cnnserve_shadow_dropped", "Shadow runs dropped under load",
                             ["model", "primary", "candidate"], multiprocess_mode="livemax"),
        # drift (service/answers.py, off the request path): what the answers look like, per model
        top1_probability=Histogram("cnnserve_top1_probability", "Top-1 probability of each answer", ["model"],
                                   buckets=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)),
        ood_score=Histogram("cnnserve_ood_score", "OOD score of each answer: its energy's distance from the "
                            "validation split's median (1: the edge of their middle 95%; higher: less like the "
                            "training data)", ["model"], buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20, 50)),
        predicted_class=Counter("cnnserve_predicted_class", "Answers by top-1 class", ["model", "label"]),
        out_of_distribution=Counter("cnnserve_out_of_distribution", "Answers over the model's OOD threshold",
                                    ["model"]),
        class_psi=Gauge("cnnserve_class_psi", "Population stability index of the predicted classes over the "
                        "last answers against the test split's", ["model"], multiprocess_mode="livemax"),
    )


class BoundedEndpoint:
    """A Prometheus metric whose ``endpoint`` label is mapped to a closed set (``metrics.ROUTES``)."""

    def __init__(self, metric, label) -> None:
        self._metric, self._label = metric, label
        self._children: dict = {}  # labelled children by their labels: prometheus's labels() locks and checks names

    def labels(self, *args, **kwargs):
        if "endpoint" in kwargs:
            kwargs["endpoint"] = self._label(kwargs["endpoint"])
        key = (args, *kwargs.items())
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= 4096:  # the labels are a closed set; bounded all the same
                self._children.clear()
            child = self._children[key] = self._metric.labels(*args, **kwargs)
        return child

    def __getattr__(self, name):
        return getattr(self._metric, name)


#: ``prometheus_client.Histogram.observe`` as ``observe_many`` mirrors it (read in prometheus-client 0.26.0):
#: ``_sum`` gets the amount, and the first bucket whose upper bound is >= the amount gets 1.
HISTOGRAM_OBSERVE_DIGESTS = frozenset({"9340a2dc863ecbf2"})


@lru_cache(maxsize=1)
def bulk_observe_matches() -> bool:
    """Whether the installed ``Histogram.observe`` is the one ``observe_many`` mirrors."""
    from prometheus_client import Histogram

    from .probes import tree_digest

    try:
        return tree_digest(Histogram.observe) in HISTOGRAM_OBSERVE_DIGESTS
    except (OSError, TypeError, SyntaxError):  # no source to read
        return False


def observe_many(child, values) -> None:
    """Many observations into one labelled Histogram child: what ``observe`` per value does (checked by
    ``bulk_observe_matches``, else it is what runs; the sum equal up to float rounding), in one ``inc``
    per bucket and one for the sum. In multiprocess mode each ``inc`` is a write to a memory-mapped file
    under a lock: per value, draining a second of answers held the GIL long enough to cost the service
    10% of its throughput and half again its p99 (measured on the drift monitor)."""
    import numpy as np

    values = np.asarray(values, np.float64).ravel()
    if not bulk_observe_matches():
        for v in values:
            child.observe(float(v))
        return
    if not len(values):
        return
    child._sum.inc(float(values.sum()))
    # the first bound >= value (NaN: none, as ``observe`` counts it in no bucket)
    counts = np.bincount(np.searchsorted(np.asarray(child._upper_bounds), values, side="left"),
                         minlength=len(child._upper_bounds) + 1)
    for bucket, n in zip(child._buckets, counts[:len(child._buckets)].tolist()):
        if n:
            bucket.inc(n)
