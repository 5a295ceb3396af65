"""KServe's Python model server (``kserve`` 0.21.0, ``kserve_serve.py``): the documented settings are
``ModelServer``'s defaults (one uvicorn worker, latency logging on); it has no batcher of its own (KServe batches
in its agent sidecar on Kubernetes), so its tuning tries onnxruntime's threads not spinning between runs
(``spin``: cnnserve's setting), its workers and the per-request logging."""

from .base import Peer

PEER = Peer(
    name="kserve", label="KServe", script="kserve_serve.py", kinds=("json", "binary", "image"),
    default={"workers": 1, "latency_logging": True},
    default_from="kserve.ModelServer() defaults: workers 1, enable_latency_logging true, no batching in-process",
    trials=[{"spin": False}, {"spin": False, "latency_logging": False},
            {"spin": False, "latency_logging": False, "workers": 2},
            {"spin": False, "latency_logging": False, "workers": 2, "threads": 1}, {"workers": 2},
            {"spin": False, "latency_logging": False, "workers": 3, "threads": 1}],
    notes="no in-process batching (KServe's batcher is the Kubernetes agent sidecar)")
