"""Ray Serve (``ray[serve]`` 2.60.0, ``rayserve_serve.py``): the documented settings are ``@serve.batch``'s
defaults (``max_batch_size=10``, ``batch_wait_timeout_s=0.01``) on one replica; its tuning tries onnxruntime's threads
not spinning between runs (``spin``: cnnserve's setting), larger batches, shorter waits and two replicas."""

from .base import Peer

PEER = Peer(
    name="rayserve", label="Ray Serve", script="rayserve_serve.py", kinds=("json", "binary", "image"),
    default={"max_batch_size": 10, "batch_wait_timeout_s": 0.01, "num_replicas": 1},
    default_from="@serve.batch() defaults: max_batch_size 10, batch_wait_timeout_s 0.01; num_replicas 1",
    trials=[{"spin": False}, {"spin": False, "batch_wait_timeout_s": 0.0},
            {"spin": False, "max_batch_size": 64, "batch_wait_timeout_s": 0.0},
            {"spin": False, "max_batch_size": 64, "batch_wait_timeout_s": 0.002},
            {"spin": False, "num_replicas": 2, "batch_wait_timeout_s": 0.0, "threads": 1},
            {"spin": False, "num_replicas": 2, "max_batch_size": 64, "batch_wait_timeout_s": 0.0, "threads": 1}],
    notes="its FastAPI ingress parses the Open Inference Protocol (peer_model.parse_v2), as a user would write it")
