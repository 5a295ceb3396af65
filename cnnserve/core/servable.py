"""Whether an exported model can be served, decided from the file before anything serves it.

``cnnserve store`` refuses a model that fails this check, and the service runs it in the server's
first process, before its workers start (``service/startup.py``): a model a worker could never load
or warm up stops the server once, with one message, instead of restarting workers forever (as it did
when metadata claiming a 100000x100000 input was stored, and warm-up then asked for 9.31 GiB in every
worker: 54 tracebacks in 90 s).

What is checked: onnxruntime loads the file (external data outside the model's folder, absolute or
missing is refused there); the metadata parses into a spec; the spec's input is one an image could
be decoded into (``Limits``: pixels and bytes) and its labels are a sane set; the graph takes exactly
``pixels`` as uint8 N x C x H x W with the spec's C, H and W wherever the graph fixes them, and gives
``logits`` and ``probabilities`` one column per label; and runs on one and on two blank images give
exactly that, finite. No torch, no onnx: only onnxruntime, which every install has.

``trial`` runs the same checks, and a run at the largest batch a server would give the model, in a process of
its own under a deadline and an address-space cap: a file can claim any input, hold a ``Loop`` that never ends
or ask for gigabytes at batch 64, and a thread that runs onnxruntime cannot be stopped, a process can. A server
loads a model in its own process only after the trial passed (``service/manager.py``, ``startup.preflight``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np

from . import onnxmeta
from .config import DEFAULTS, Limits
from .onnxmeta import ModelInfo
from .spec import ModelSpec, SpecError

#: Classes a model may name (ImageNet-21k has 21,841), and the longest label.
MAX_CLASSES, MAX_LABEL_CHARS = 100_000, 1_000


class NotServable(ValueError):
    """A model file that cannot be served; the message names the file and what is wrong."""


def check_spec(spec: ModelSpec, limits: Limits = DEFAULTS.limits, source: str = "model") -> None:
    """The spec's input and labels against what a server can hold (``NotServable`` otherwise)."""
    c, h, w = spec.input_shape
    if h * w > limits.max_pixels or c * h * w * 4 > limits.max_decoded_bytes:
        # the graph normalises to float32: 4 bytes a value, per image of every batch
        raise NotServable(f"{source}: its metadata declares a {c}x{h}x{w} input, more than an image may be "
                          f"({limits.max_pixels:,} pixels, {limits.max_decoded_bytes / 2**20:,.0f} MiB as "
                          "float32: max_image_pixels, max_decoded_mb); no server could warm it up")
    n = spec.num_classes
    if not 1 <= n <= MAX_CLASSES:
        raise NotServable(f"{source}: its metadata names {n:,} labels; a model needs 1 to {MAX_CLASSES:,}")
    long = next((label for label in spec.labels if len(label) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise NotServable(f"{source}: label {long[:40]!r}... is {len(long):,} characters; the limit is "
                          f"{MAX_LABEL_CHARS:,}")


def _dims_fit(declared, wanted) -> bool:
    """Whether a graph's declared dimensions (ints, or names/None where free) admit ``wanted``."""
    return len(declared) == len(wanted) and all(not isinstance(d, int) or d == v or (d <= 0 and v is None)
                                                for d, v in zip(declared, wanted))


def check_session(session, path: str | os.PathLike, limits: Limits = DEFAULTS.limits) -> ModelInfo:
    """An onnxruntime session of an export checked against its metadata (see the module's docstring);
    its ``ModelInfo``, or ``NotServable``."""
    source = str(path)
    try:
        info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, source)
    except SpecError as e:
        raise NotServable(str(e)) from None
    spec = info.spec
    check_spec(spec, limits, source)
    c, h, w = spec.input_shape
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [onnxmeta.INPUT]:
        raise NotServable(f"{source}: the graph takes {[i.name for i in inputs]}; a served model takes exactly "
                          f"one input, {onnxmeta.INPUT!r}")
    pixels = inputs[0]
    if pixels.type != "tensor(uint8)" or not _dims_fit(pixels.shape, [None, c, h, w]):
        raise NotServable(f"{source}: the graph's input is {pixels.type} {pixels.shape}, but its metadata says "
                          f"uint8 [N, {c}, {h}, {w}]: the metadata does not describe this graph")
    outputs = {o.name: o for o in session.get_outputs()}
    k = spec.num_classes
    for name in onnxmeta.OUTPUTS:
        o = outputs.get(name)
        if o is None or o.type != "tensor(float)" or not _dims_fit(o.shape, [None, k]):
            raise NotServable(f"{source}: the graph's output {name!r} is "
                              f"{'missing' if o is None else f'{o.type} {o.shape}'}, but its metadata names {k} "
                              f"labels: float [N, {k}] expected")
    for n in (1, 2):  # two: a graph whose batch size is baked in fails here, not in a server's batches
        try:
            got = session.run(list(onnxmeta.OUTPUTS), {onnxmeta.INPUT: np.zeros((n, c, h, w), np.uint8)})
        except Exception as e:  # onnxruntime's own exception classes
            raise NotServable(f"{source}: a batch of {n} blank images does not run: {_last_line(e)}") from None
        shapes = [tuple(g.shape) for g in got]
        if shapes != [(n, k)] * len(onnxmeta.OUTPUTS):
            raise NotServable(f"{source}: a batch of {n} images gave outputs of shapes {shapes}, but its metadata "
                              f"names {k} labels: ({n}, {k}) expected")
        _check_finite(got, source, n)
    return info


def _check_finite(outputs, source: str, n: int) -> None:
    """Probabilities a client could be answered with are numbers: a graph giving NaN or infinity on blank images
    is broken (a server would answer NaN, which JSON cannot carry)."""
    for name, out in zip(onnxmeta.OUTPUTS, outputs):
        if not np.isfinite(out).all():
            raise NotServable(f"{source}: a batch of {n} blank images gives {name!r} values that are not finite "
                              "(NaN or infinity): the model is broken")


def check_model(path: str | os.PathLike, limits: Limits = DEFAULTS.limits) -> ModelInfo:
    """Load ``path`` on the CPU, as a server would, and check it (``check_session``)."""
    return check_session(_cpu_session(path), path, limits)


def _cpu_session(path: str | os.PathLike):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a check, not a benchmark: leave the cores to what is running
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes per failure
        raise NotServable(f"{path}: onnxruntime cannot load it: {_last_line(e)}") from None


#: The largest batch ``Model.warm_up`` runs by default.
WARM_BATCH = 8


class TrialFailed(NotServable):
    """A trial that ran out of its time or memory (the model may be sound, only too large for the limits)."""


def trial(path: str | os.PathLike, limits: Limits = DEFAULTS.limits, batch_size: int = 64, precision: str = "auto",
          timeout_s: float = 60.0, memory_mb: float = 4096.0) -> None:
    """``check_model`` of ``path`` and of each variant a server could choose for ``precision``, and one run of
    each at the largest batch the server's worker runs while loading it (``batch_size``, the server's
    max_batch_size, where the worker times variants at it; else the warm-up's), in a process of its own: killed
    past ``timeout_s`` seconds, its address space capped at ``memory_mb``; a batch of ``batch_size`` inputs that
    would not fit ``memory_mb`` is refused before anything runs. ``NotServable`` (``TrialFailed`` for time and
    memory) says why."""
    # the child caps itself as it starts (``_limit_self``): a preexec_fn would run Python between fork and exec in
    # a process with gRPC's threads, which crashed the child (SIGSEGV)
    job = json.dumps({"path": str(path), "batch_size": batch_size, "precision": precision, "memory_mb": memory_mb,
                      "cpu_s": int(timeout_s) + 5, "parent": os.getpid(),
                      "max_pixels": limits.max_pixels, "max_decoded_bytes": limits.max_decoded_bytes})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "cnnserve.core.servable", job], capture_output=True,
                              timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise TrialFailed(f"{path}: checking it and warming it up took longer than "
                          f"{timeout_s:g} s (load_timeout_s); it was stopped") from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        verdict = None
    if isinstance(verdict, dict) and verdict.get("ok"):
        return
    if isinstance(verdict, dict) and verdict.get("error"):
        raise NotServable(str(verdict["error"]))
    err = done.stderr.decode("utf-8", "replace")
    if done.returncode < 0 or "MemoryError" in err or "bad_alloc" in err or "Failed to allocate" in err:
        raise TrialFailed(f"{path}: checking it and warming it up needs more than "
                          f"{memory_mb:,.0f} MB of address space (load_memory_mb), or ended by signal "
                          f"{-done.returncode if done.returncode < 0 else 'none'}") from None
    raise NotServable(f"{path}: the trial process ended with status {done.returncode}: "
                      f"{_last_line(RuntimeError(err.strip().splitlines()[-1] if err.strip() else 'no output'))}")


def _limit_self(job: dict) -> None:
    """In the trial's child, before it imports onnxruntime: its address space capped at ``memory_mb``, its CPU
    time at ``cpu_s`` (it runs one thread), and its life tied to its parent's. The deadline is the parent's
    (subprocess.run's timeout): should the parent die first (a worker killed with -9), the child would run on
    under init; Linux's PR_SET_PDEATHSIG has the kernel kill it then."""
    cap = int(job["memory_mb"] * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    resource.setrlimit(resource.RLIMIT_CPU, (int(job["cpu_s"]), int(job["cpu_s"]) + 1))
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the CPU limit still ends it
        pass
    # the parent died before the line above ("my parent is pid 1" would not do: in a container the server is)
    if os.getppid() != job["parent"]:
        os._exit(1)


def _trial_main(job: dict) -> dict:
    """The trial's child: every file a server could choose checked, each run once at the largest batch."""
    from dataclasses import replace

    limits = replace(DEFAULTS.limits, max_pixels=job["max_pixels"], max_decoded_bytes=job["max_decoded_bytes"])
    path, precision, n = job["path"], job["precision"], max(1, int(job["batch_size"]))
    session = _cpu_session(path)
    try:
        spec = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, path).spec
    except SpecError as e:
        raise NotServable(str(e)) from None
    check_spec(spec, limits, path)
    c, h, w = spec.input_shape
    need = n * c * h * w * 4
    if need > job["memory_mb"] * 2**20:  # its input alone, as the float32 the graph normalises to: said before
        # anything runs, since even the checks' batches of one and two images would take long at that size
        raise NotServable(f"{path}: a batch of {n} of its {c}x{h}x{w} inputs takes {need / 2**20:,.0f} MB as "
                          f"float32, more than load_memory_mb ({job['memory_mb']:,.0f} MB) allows a load; a "
                          "smaller max_batch_size or a larger load_memory_mb would let it warm up")
    info = check_session(session, path, limits)
    files = onnxmeta.variant_files(path, info.precision)
    chosen = files if precision == "auto" else {p: f for p, f in files.items() if p == precision}
    # Run at the largest batch the worker itself will run while it loads: its warm-up's (``Model.warm_up``: 8),
    # or max_batch_size where it times several variants to choose one. Larger batches at serving time are bounded
    # by the input check above; running them here would cost a large model seconds of a core per worker.
    n = n if precision == "auto" and len(files) > 1 else min(n, WARM_BATCH)
    for file in chosen.values():
        if file != path:
            check_model(file, limits)
            session = _cpu_session(file)
        try:
            got = session.run(list(onnxmeta.OUTPUTS), {onnxmeta.INPUT: np.zeros((n, *info.spec.input_shape),
                                                                                 np.uint8)})
        except Exception as e:  # onnxruntime's own exception classes
            raise NotServable(f"{file}: a batch of {n} blank images does not run: {_last_line(e)}") from None
        _check_finite(got, file, n)
    return {"ok": True}


def _last_line(e: BaseException) -> str:
    """onnxruntime's message without its C++ location prefix."""
    text = str(e).strip()
    return text.rsplit(") ", 1)[-1][:300] if "onnxruntime::" in text else text[:300]


if __name__ == "__main__":  # the trial's child process (``trial``)
    _limit_self(json.loads(sys.argv[1]))
    try:
        verdict = _trial_main(json.loads(sys.argv[1]))
    except NotServable as e:
        verdict = {"error": str(e)}
    except MemoryError:
        verdict = {"error": f"{json.loads(sys.argv[1])['path']}: warming it up ran out of its address space "
                            "(load_memory_mb)"}
    print(json.dumps(verdict), flush=True)
