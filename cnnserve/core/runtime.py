"""ONNX sessions for serving and batch scoring: providers, warm-up, predict, top-k.

A model is one file written by ``cnnserve export``: its spec and labels come from the
file's metadata, never from code. Sessions try CUDA first and fall back to CPU; the
providers really in use (``session.get_providers()``) are what gets reported, since
onnxruntime-gpu lists CUDA even on machines where its libraries cannot load.
No torch, no model code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import onnxruntime as ort

from . import onnxmeta
from .binding import CUDA, BindingError, cuda_options, runner_for
from .config import PRECISIONS, DeviceOptions
from .onnxmeta import ModelInfo
from .spec import SpecError

log = logging.getLogger("cnnserve.runtime")

CPU = "CPUExecutionProvider"  # CUDA: binding.py's
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
# The CUDA provider's defaults (``binding.cuda_options``): HEURISTIC conv-algorithm search avoids EXHAUSTIVE's
# long first run per new input shape (every new batch size); no arena limit; no CUDA graphs.
NO_DEVICE_OPTIONS = DeviceOptions()


# Precisions: ``auto`` times the verified variants beside a model (NAME.fp16.onnx, NAME.int8.onnx) that
# suit the provider it runs on, during warm-up at the batch sizes it will run, and serves the fastest
# (config.PRECISIONS names them).
CANDIDATES = {CUDA: ("fp16", "fp32"), CPU: ("int8", "fp32")}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded or run as asked (named, with the reason)."""


def requested_providers(choice: str = "auto", device: DeviceOptions = NO_DEVICE_OPTIONS) -> list:
    """The provider list to ask onnxruntime for. ``auto``: CUDA when listed, then CPU;
    ``cpu``: CPU only; ``cuda``: CUDA, failing if it does not really load. ``device``: the GPU settings."""
    if choice not in PROVIDER_CHOICES:
        raise ValueError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}, got {choice!r}")
    if choice == "cpu" or CUDA not in ort.get_available_providers():
        return [CPU]
    return [(CUDA, cuda_options(device)), CPU]


_ort_log_severity = 2  # onnxruntime's default logger severity as this process last set it (2, WARNING, at start)


@contextlib.contextmanager
def ort_severity(level: int | None):
    """onnxruntime's process-wide log severity at ``level`` for the block (None: left as it is), then back
    to what it was (onnxruntime has no getter: the level is tracked here, and every change the project makes
    goes through this)."""
    global _ort_log_severity
    if level is None:
        yield
        return
    before = _ort_log_severity
    ort.set_default_logger_severity(level)
    _ort_log_severity = level
    try:
        yield
    finally:
        ort.set_default_logger_severity(before)
        _ort_log_severity = before


def cuda_works() -> bool:
    """Whether onnxruntime really runs on CUDA here (onnxruntime-gpu lists it even where it cannot load)."""
    if CUDA not in ort.get_available_providers():
        return False
    try:
        with ort_severity(4):  # onnxruntime logs the failed load as an error before raising
            ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", 0)
        return True
    except Exception:  # noqa: BLE001 - onnxruntime's own error classes: CUDA's libraries missing, no GPU
        return False


def create_session(path: str | os.PathLike | bytes, providers: str = "auto", threads: int | None = None,
                   source: str | None = None, spin: bool = False,
                   device: DeviceOptions = NO_DEVICE_OPTIONS) -> ort.InferenceSession:
    """``spin``: let onnxruntime's worker threads busy-wait between runs. Off by default: a server
    shares its cores with decoding and HTTP, and spinning threads take CPU from both. ``device``: the
    CUDA provider's settings (device id, cuDNN search, arena limit, CUDA graphs)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    wanted = requested_providers(providers, device)
    source = source or (str(path) if not isinstance(path, bytes) else "model")
    # A failed CUDA load is logged by onnxruntime as an error, then it falls back to CPU:
    # keep that out of the log and report the outcome ourselves.
    problem = None
    with ort_severity(4 if len(wanted) > 1 else None):
        try:
            sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own exception classes per failure
            problem = f"{source}: onnxruntime cannot load it: {e}"
    if problem:
        raise ModelLoadError(problem)
    used = sess.get_providers()
    if providers == "cuda" and used[0] != CUDA:
        raise ModelLoadError(f"{source}: CUDA was required but onnxruntime fell back to {used[0]} "
                            "(CUDA 13 and cuDNN 9 libraries missing, or no GPU)")
    if len(wanted) > 1 and used[0] != CUDA:
        log.info("%s: CUDA provider unavailable here, running on %s", source, used[0])
    return sess


@dataclass
class Model:
    """A loaded, warmed model: its name and version, what it says about itself, and its session."""

    name: str
    version: str
    info: ModelInfo
    session: ort.InferenceSession
    warmup_ms: float = 0.0
    #: seconds per image in the warm-up's largest batch (the batcher's first estimate of its slices)
    seconds_per_image: float = 0.0
    #: how the precision was chosen: mode (auto or forced), candidates, warm-up timings, the choice
    choice: dict = field(default_factory=dict)
    #: IO binding or CUDA graph buckets (``binding.runner_for``); None: the session's own run
    runner: object | None = None

    @property
    def spec(self):
        return self.info.spec

    @cached_property
    def samples(self) -> list[dict]:
        """The held-out sample images the export embedded (``onnxmeta.KEY_SAMPLES``)."""
        return onnxmeta.samples(self.session.get_modelmeta().custom_metadata_map)

    @cached_property
    def cam_weights(self) -> np.ndarray | None:
        """The classifier's weights (classes x channels) when the export added CAM outputs (``features``
        and ``cam_weights``, see ``service/explain.py``); None otherwise. Read by one run, once."""
        names = {o.name for o in self.session.get_outputs()}
        if not {onnxmeta.FEATURES, onnxmeta.CAM_WEIGHTS} <= names:
            return None
        return self.run(np.zeros((1, *self.spec.input_shape), np.uint8), [onnxmeta.CAM_WEIGHTS])[0]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (float32, N x classes) for a batch of uint8 images; one onnxruntime run (the outputs
        the batcher asks for, so that a CUDA graph bucket serves it too)."""
        return self.run(pixels, list(onnxmeta.OUTPUTS))[onnxmeta.OUTPUTS.index(onnxmeta.PROBABILITIES)]

    def run(self, pixels: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if self.runner is not None:
            return self.runner.run(pixels, outputs)
        return self.session.run(outputs, {onnxmeta.INPUT: pixels})

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict]]:
        """Per image, the k most probable classes as label, index and probability (descending)."""
        k = min(k, probs.shape[1])
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = self.spec.labels
        return [[{"label": labels[i], "index": int(i), "probability": float(p[i])} for i in row]
                for row, p in zip(idx, probs)]

    def warm_up(self, batch_sizes=(1, 8)) -> None:
        """Run once per batch size before reporting ready: the first runs allocate and pick kernels."""
        t = time.perf_counter()
        for n in batch_sizes:
            start = time.perf_counter()
            self.predict(np.zeros((n, *self.spec.input_shape), np.uint8))
            self.seconds_per_image = (time.perf_counter() - start) / max(n, 1)
        self.warmup_ms = (time.perf_counter() - t) * 1000

    def describe(self) -> dict:
        """Metadata for the API: spec, labels, version, precision, providers in use, I/O."""
        c, h, w = self.spec.input_shape
        return {
            "name": self.name, "version": self.version, "arch": self.spec.arch, "precision": self.info.precision,
            "providers": self.providers, "spec": self.spec.to_dict(), "labels": list(self.spec.labels),
            # the chosen file by name only: a client has no business with the server's paths
            "precision_choice": {**self.choice, **({"file": os.path.basename(self.choice["file"])}
                                                   if "file" in self.choice else {})},
            "metrics": self.info.metrics, "data": self.info.data, "origin": self.info.origin,
            # probabilities = softmax(logits / temperature); the OOD rule and the export's measured figures
            "temperature": self.info.temperature, "ood": self.info.ood, "calibration": self.info.calibration,
            "input": {"name": onnxmeta.INPUT, "datatype": "UINT8", "shape": [-1, c, h, w]},
            "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, self.spec.num_classes]}
                        for o in onnxmeta.OUTPUTS],
        }


def time_sessions(sessions: dict[str, ort.InferenceSession], shape: tuple, batch_sizes, rounds: int = 5) -> dict:
    """Milliseconds per image for each session at each batch size: the median of ``rounds`` runs,
    the sessions interleaved so that a noisy neighbour slows all of them alike."""
    runs: dict = {name: {b: [] for b in batch_sizes} for name in sessions}
    inputs = {b: np.zeros((b, *shape), np.uint8) for b in batch_sizes}
    for sess in sessions.values():  # the first run at a shape allocates and picks kernels
        for b in batch_sizes:
            sess.run(None, {onnxmeta.INPUT: inputs[b]})
    for _ in range(rounds):
        for name, sess in sessions.items():
            for b in batch_sizes:
                t = time.perf_counter()
                sess.run(None, {onnxmeta.INPUT: inputs[b]})
                runs[name][b].append((time.perf_counter() - t) * 1000 / b)
    return {name: {str(b): float(np.median(v)) for b, v in per.items()} for name, per in runs.items()}


def choose_precision(path: str | os.PathLike, precision: str = "auto", providers: str = "auto",
                     threads: int | None = None, spin: bool = False, batch_sizes=(1, 8),
                     device: DeviceOptions = NO_DEVICE_OPTIONS):
    """The session to serve ``path`` with, and how its precision was chosen (``Model.choice``). The sessions
    timed here never have CUDA graphs (``attach_runner`` opens the chosen file again with them)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = replace(device, cuda_graphs=False)
    first = create_session(path, providers, threads, spin=spin, device=device)
    info = ModelInfo.from_metadata(first.get_modelmeta().custom_metadata_map, str(path))
    own = info.precision
    files = onnxmeta.variant_files(path, own)
    opened = {own: first}

    def session_of(p: str) -> ort.InferenceSession | None:
        """The variant's session, or None (logged) when the file beside ``path`` was made from other
        weights or for another spec (a stale variant left by an earlier export)."""
        if p not in opened:
            try:
                sess = create_session(files[p], providers, threads, spin=spin, device=device)
                other = ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map, files[p])
            except (ModelLoadError, SpecError) as e:  # a damaged variant: refused if forced, else passed over
                if precision != "auto":
                    raise ModelLoadError(str(e)) from None
                log.warning("%s: cannot be loaded (%s); ignored", files[p], e)
                sess = other = None
            if other is not None and (other.precision != p or not info.same_weights(other)):
                log.warning("%s: not a %s variant of %s (other weights or spec); ignored", files[p], p, path)
                sess = None
            opened[p] = sess
        return opened[p]

    if precision != "auto":
        sess = session_of(precision) if precision in files else None
        if sess is None:
            raise ModelLoadError(f"{path}: no {precision} variant of these weights beside it (it has "
                                 f"{', '.join(sorted(p for p in files if p == own or session_of(p)))}); "
                                 f"export it with --{precision}")
        return sess, {"mode": precision, "available": sorted(files), "chosen": precision, "file": files[precision]}
    provider = first.get_providers()[0]
    candidates = [p for p in CANDIDATES.get(provider, ()) if p in files and session_of(p) is not None]
    choice = {"mode": "auto", "provider": provider, "available": sorted(files), "candidates": candidates}
    if len(candidates) < 2:
        choice["chosen"] = own if own in candidates or not candidates else candidates[0]
        choice["reason"] = "the only candidate for " + provider
        choice["file"] = files[choice["chosen"]]
        return opened[choice["chosen"]], choice
    sessions = {p: opened[p] for p in candidates}
    shape = tuple(first.get_inputs()[0].shape[1:])
    timings = time_sessions(sessions, shape, sorted(set(batch_sizes)))
    mean = {p: float(np.mean(list(t.values()))) for p, t in timings.items()}
    chosen = min(mean, key=mean.get)
    choice.update(chosen=chosen, file=files[chosen], ms_per_image=timings, mean_ms_per_image=mean,
                  reason=f"fastest mean ms per image over batch sizes {', '.join(timings[chosen])} in warm-up")
    return sessions[chosen], choice


def attach_runner(sess: ort.InferenceSession, file: str, shape: tuple, providers: str, threads: int | None,
                  spin: bool, device: DeviceOptions):
    """The session to serve, its runner (``binding.runner_for``) and a line saying which and why. With CUDA
    graphs asked for on CUDA, ``file`` is opened again with them; where onnxruntime cannot capture them (a node
    off CUDA, a dynamic shape inside) the session without graphs serves, and the line says why."""
    outputs, refused = list(onnxmeta.OUTPUTS), ""
    if device.cuda_graphs and sess.get_providers()[0] == CUDA:
        try:
            graphs = create_session(file, providers, threads, spin=spin, device=device)
            runner, note = runner_for(graphs, shape, outputs, device)
            return graphs, runner, note
        except (ModelLoadError, BindingError) as e:
            log.warning("%s: CUDA graphs refused (%s); serving without them", file, e)
            refused = f"CUDA graphs refused ({e}); "
    elif device.cuda_graphs:
        refused = f"no CUDA graphs on {sess.get_providers()[0]}; "
    runner, note = runner_for(sess, shape, outputs, replace(device, cuda_graphs=False))
    return sess, runner, refused + note


def load_model(path: str | os.PathLike, name: str | None = None, version: str = "", providers: str = "auto",
               threads: int | None = None, warm_up: bool = True, spin: bool = False, precision: str | None = None,
               batch_sizes=(1, 8), device: DeviceOptions = NO_DEVICE_OPTIONS) -> Model:
    """Load an exported ONNX file; its spec and labels come from its metadata. ``precision``: which of
    its verified variants to run (``auto``: the fastest here at ``batch_sizes``, see ``choose_precision``);
    None: the file as given. ``device``: the GPU settings (IO binding, CUDA graphs, the provider's options)."""
    if precision is None:
        sess = create_session(path, providers, threads, spin=spin, device=replace(device, cuda_graphs=False))
        choice = {"mode": "file", "file": str(path)}
    else:
        sess, choice = choose_precision(path, precision, providers, threads, spin, batch_sizes, device)
    info = ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map, str(path))
    sess, runner, choice["runner"] = attach_runner(sess, choice["file"], info.spec.input_shape, providers, threads,
                                                   spin, device)
    model = Model(name=name or info.spec.arch, version=version, info=info, session=sess, choice=choice,
                  runner=runner)
    if warm_up:
        model.warm_up()
    log.info("loaded %s:%s (%s, %s) from %s on %s; warm-up %.0f ms", model.name, version or "-", info.spec.arch,
             info.precision, path, ", ".join(model.providers), model.warmup_ms)
    if "ms_per_image" in choice:
        log.info("%s: precision auto on %s chose %s; warm-up ms per image %s", model.name, choice["provider"],
                 choice["chosen"], {p: {b: round(v, 4) for b, v in t.items()} for p, t in choice["ms_per_image"].items()})
    return model
