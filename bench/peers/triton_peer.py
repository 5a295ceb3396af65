"""Triton Inference Server (PyTriton 0.7.0 on Python 3.12, ``triton_serve.py``): the documented settings are PyTriton's
``ModelConfig`` defaults (``max_batch_size=4``, a ``DynamicBatcher()`` with no queue delay, one model instance);
its tuning tries onnxruntime's threads not spinning between runs (``spin``: cnnserve's setting), larger batches,
a queue delay and two instances (Triton's knobs for a CPU model)."""

from .base import Peer

PEER = Peer(
    name="triton", label="Triton (PyTriton)", script="triton_serve.py", kinds=("json", "binary"),
    default={"max_batch_size": 4, "max_queue_delay_us": 0, "instances": 1},
    default_from="PyTriton's ModelConfig() defaults: max_batch_size 4, DynamicBatcher(), one instance",
    trials=[{"spin": False}, {"spin": False, "max_batch_size": 64},
            {"spin": False, "max_batch_size": 64, "instances": 2},
            {"spin": False, "max_batch_size": 64, "max_queue_delay_us": 500},
            {"spin": False, "max_batch_size": 64, "instances": 2, "threads": 1}, {"max_batch_size": 64},
            {"spin": False, "max_batch_size": 16}, {"spin": False, "max_batch_size": 64, "max_queue_delay_us": 2000}],
    extra_ports=("--grpc-port", "--metrics-port"),
    notes="encoded images are not taken (Triton would need a decoding model or DALI)")
