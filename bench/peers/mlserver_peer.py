"""Seldon's MLServer (``mlserver`` 1.7.1, ``mlserver_serve.py``): the documented settings are its defaults
(adaptive batching off, ``parallel_workers=1``); its tuning tries onnxruntime's threads not
spinning between runs (``spin``: cnnserve's setting), turns adaptive batching on (``max_batch_size``,
``max_batch_time``) and tries the inference pool's size (0: inference on the server's own event loop)."""

from .base import Peer

PEER = Peer(
    name="mlserver", label="MLServer", script="mlserver_serve.py", kinds=("json", "image"),
    default={"parallel_workers": 1, "max_batch_size": 0, "max_batch_time": 0.0},
    default_from="MLServer's defaults: adaptive batching off (max_batch_size 0), parallel_workers 1",
    trials=[{"spin": False}, {"spin": False, "max_batch_size": 32, "max_batch_time": 0.001},
            {"spin": False, "parallel_workers": 0}, {"spin": False, "parallel_workers": 2, "threads": 1},
            {"spin": False, "parallel_workers": 0, "max_batch_size": 32, "max_batch_time": 0.001},
            {"spin": False, "max_batch_size": 64, "max_batch_time": 0.005},
            {"spin": False, "parallel_workers": 2, "threads": 1, "max_batch_size": 32, "max_batch_time": 0.001}],
    extra_ports=("--grpc-port", "--metrics-port"),
    notes="its REST server reads JSON tensors only (no binary tensor extension)")
