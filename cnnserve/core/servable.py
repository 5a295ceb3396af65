"""Whether an exported model can be served, decided from the file before anything serves it.

``cnnserve store`` refuses a model that fails this check, and the service runs it in the server's
first process, before its workers start (``service/startup.py``): a model a worker could never load
or warm up stops the server once, with one message, instead of restarting workers forever (issue 24:
metadata claiming a 100000x100000 input was stored, and warm-up then asked for 9.31 GiB in every
worker, 54 tracebacks in 90 s).

What is checked: onnxruntime loads the file (external data outside the model's folder, absolute or
missing is refused there); the metadata parses into a spec; the spec's input is one an image could
be decoded into (``Limits``: pixels and bytes) and its labels are a sane set; the graph takes exactly
``pixels`` as uint8 N x C x H x W with the spec's C, H and W wherever the graph fixes them, and gives
``logits`` and ``probabilities`` one column per label; and runs on one and on two blank images give
exactly that. No torch, no onnx: only onnxruntime, which every install has.
"""

from __future__ import annotations

import os

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
    return info


def check_model(path: str | os.PathLike, limits: Limits = DEFAULTS.limits) -> ModelInfo:
    """Load ``path`` on the CPU, as a server would, and check it (``check_session``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a check, not a benchmark: leave the cores to what is running
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes per failure
        raise NotServable(f"{path}: onnxruntime cannot load it: {_last_line(e)}") from None
    return check_session(session, path, limits)


def _last_line(e: BaseException) -> str:
    """onnxruntime's message without its C++ location prefix."""
    text = str(e).strip()
    return text.rsplit(") ", 1)[-1][:300] if "onnxruntime::" in text else text[:300]
