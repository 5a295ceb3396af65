"""IO binding and CUDA graphs for a model's session (``config.DeviceOptions``; docs/gpu.md).

onnxruntime's CUDA guide: a plain ``session.run`` copies numpy inputs to the device and the outputs back on
every call through its own staging; IO binding copies the input once and binds the outputs where they are
wanted. CUDA graphs replay a captured sequence of kernel launches, and need IO binding, fixed shapes, fixed
buffer addresses, every node on CUDA and no two runs at once on the session: here a batch is padded up to
one of a fixed set of sizes (buckets), each with its own buffers and graph (the run option ``gpu_graph_id``),
and runs are one at a time. Every path runs on CPU too (bound to host memory, without graphs): that is how
the suite tests them. No torch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from . import onnxmeta
from .config import DeviceOptions

log = logging.getLogger("cnnserve.binding")

CUDA = "CUDAExecutionProvider"
GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option: which captured graph a run replays (-1: none)


class BindingError(RuntimeError):
    """IO binding or a bucket's graph cannot serve this session (the reason in words)."""


def cuda_options(d: DeviceOptions) -> dict:
    """The CUDA provider's options for ``d`` (onnxruntime reads strings)."""
    opts = {"device_id": str(d.device_id), "cudnn_conv_algo_search": d.conv_search,
            # the arena grows by what is asked, not by doubling
            "arena_extend_strategy": "kSameAsRequested",
            # fp16 convolutions reach their fast algorithms only when cuDNN may take the workspace it asks for
            "cudnn_conv_use_max_workspace": "1"}
    if d.mem_limit_bytes:
        opts["gpu_mem_limit"] = str(d.mem_limit_bytes)
    if d.cuda_graphs:
        opts["enable_cuda_graph"] = "1"
    return opts


class Bound:
    """Runs through IO binding: the input bound from host memory (copied to ``device`` once), the outputs
    allocated on ``device`` and copied back. A binding per call, so runs may overlap. On a session with
    CUDA graphs enabled, runs here say ``gpu_graph_id=-1``: outside the graphs, nothing captured."""

    kind = "io_binding"

    def __init__(self, session: ort.InferenceSession, device: str = "cpu", device_id: int = 0,
                 graphs: bool = False):
        self.session, self.device, self.device_id = session, device, device_id
        self.options = ort.RunOptions()
        if graphs:
            self.options.add_run_config_entry(GRAPH_ID, "-1")

    def run(self, pixels: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(onnxmeta.INPUT, np.ascontiguousarray(pixels))
        for name in outputs:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding, self.options)
        return binding.copy_outputs_to_cpu()

    def describe(self) -> dict:
        return {"kind": self.kind, "device": f"{self.device}:{self.device_id}"}


@dataclass
class _Slot:
    """One bucket's fixed buffers: the host staging array, the bound input and outputs, the run option."""

    staging: np.ndarray
    inputs: ort.OrtValue
    outputs: list
    binding: object
    options: ort.RunOptions
    runs: int = 0


class Buckets(Bound):
    """Batches padded up to fixed sizes, each size with its own bound buffers and, with ``graphs``, its own
    CUDA graph; one run at a time. A batch larger than the largest bucket runs in slices of it. Runs that ask
    for other outputs than ``outputs`` (an explanation's feature maps) go through plain binding, outside the
    graphs, still one at a time. The padding rows hold whatever the bucket's last batch left there: a CNN in
    inference treats rows independently, and only the batch's own rows are returned."""

    def __init__(self, session: ort.InferenceSession, input_shape: tuple, outputs: list[str], buckets,
                 device: str = "cpu", device_id: int = 0, graphs: bool = False):
        super().__init__(session, device, device_id, graphs)
        self.input_shape, self.outputs, self.graphs = tuple(input_shape), list(outputs), graphs
        self.buckets = tuple(sorted(set(buckets)))
        self.kind = "cuda_graphs" if graphs else "buckets"
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}

    def bucket(self, n: int) -> int:
        """The size a batch of ``n`` (at most the largest bucket) is padded up to."""
        return next(b for b in self.buckets if b >= n)

    def _slot(self, size: int) -> _Slot:
        slot = self._slots.get(size)
        if slot is None:
            staging = np.zeros((size, *self.input_shape), np.uint8)
            shapes = Bound.run(self, staging, self.outputs)  # the outputs' shapes and types at this size
            inputs = ort.OrtValue.ortvalue_from_numpy(staging, self.device, self.device_id)
            outs = [ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, self.device, self.device_id)
                    for a in shapes]
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(onnxmeta.INPUT, inputs)
            for name, value in zip(self.outputs, outs):
                binding.bind_ortvalue_output(name, value)
            options = ort.RunOptions()
            if self.graphs:
                options.add_run_config_entry(GRAPH_ID, str(self.buckets.index(size)))
            slot = self._slots[size] = _Slot(staging, inputs, outs, binding, options)
        return slot

    def run(self, pixels: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if list(outputs) != self.outputs:
            with self._lock:
                return super().run(pixels, outputs)
        n, top = len(pixels), self.buckets[-1]
        if n > top:
            parts = [self.run(pixels[i:i + top], outputs) for i in range(0, n, top)]
            return [np.concatenate(column) for column in zip(*parts)]
        with self._lock:
            slot = self._slot(self.bucket(n))
            slot.staging[:n] = pixels
            slot.inputs.update_inplace(slot.staging)
            self.session.run_with_iobinding(slot.binding, slot.options)
            slot.runs += 1
            # copies: the next run of this bucket overwrites the bound outputs
            return [np.array(value.numpy()[:n]) for value in slot.outputs]

    def warm(self) -> None:
        """Every bucket run three times: onnxruntime runs a graph-enabled size normally before it captures."""
        for size in self.buckets:
            for _ in range(3):
                self.run(np.zeros((size, *self.input_shape), np.uint8), self.outputs)

    def describe(self) -> dict:
        return {**super().describe(), "buckets": list(self.buckets),
                "runs": {str(b): s.runs for b, s in sorted(self._slots.items())}}


def runner_for(session: ort.InferenceSession, input_shape: tuple, outputs: list[str], d: DeviceOptions,
               device: str | None = None):
    """The runner ``d`` asks for on this session, checked against a plain run on a real batch, and a line
    saying what was chosen and why. None (with the reason) where nothing is asked for or the check fails:
    the session's own ``run`` serves then. ``device``: where to bind (default: CUDA when the session runs
    on it). Raises ``BindingError`` only for a graph-enabled session, which has no plain path to fall back
    on (the caller opens the file again without graphs)."""
    on_cuda = session.get_providers()[0] == CUDA
    device = device or ("cuda" if on_cuda else "cpu")
    graphs = d.cuda_graphs and device == "cuda"
    if not (graphs or d.io_binding == "on" or (d.io_binding == "auto" and on_cuda)):
        return None, f"session.run (io_binding={d.io_binding}, on {'CUDA' if on_cuda else 'CPU'})"
    try:
        if graphs:
            runner = Buckets(session, input_shape, outputs, d.buckets, device, d.device_id, graphs=True)
            runner.warm()
        else:
            runner = Bound(session, device, d.device_id)
        check = np.random.default_rng(0).integers(0, 256, (2, *input_shape), dtype=np.uint8)
        got = runner.run(check, outputs)
        want = Bound(session, device, d.device_id, graphs).run(check, outputs) if graphs else \
            session.run(outputs, {onnxmeta.INPUT: check})
        if not all(np.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(got, want)):
            raise BindingError("its answers differ from a plain run's on the same batch")
    except Exception as e:  # onnxruntime raises its own classes: a device it lacks, a graph it cannot capture
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        if graphs:
            raise BindingError(reason) from None
        log.warning("IO binding on %s refused (%s): running through session.run", device, reason)
        return None, f"session.run (IO binding on {device} failed: {reason})"
    return runner, f"{runner.kind} on {device}:{d.device_id}"
