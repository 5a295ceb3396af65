"""The Open Inference Protocol (KServe v2, as Triton speaks it) for both of its front ends, HTTP (``kserve.py``)
and gRPC (``grpc_service.py``): model metadata, a request's one input tensor checked and turned into pixels or
encoded images, and the outputs of a ``Prediction`` by name. No transport here: each front end parses its
messages into a ``Tensor`` and serialises the outputs its own way.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from cnnserve.core import onnxmeta
from cnnserve.core.confidence import not_finite_rows

from .batching import PRIORITIES
from .engine import Call, Engine, Ticket
from .errors import APIError, model_output_not_finite, short

#: The Open Inference Protocol's extensions served (Triton's names), over HTTP and gRPC alike.
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics")
#: The input that carries encoded images (BYTES) instead of pixels.
IMAGE_INPUT = "image"


def model_metadata(engine: Engine, name: str, version: str | None = None) -> dict:
    m = engine.model(name, version)
    d = m.describe()
    versions = engine.registry.loaded().get(m.name) or ([m.version] if m.version else [])
    return {"name": m.name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": [d["input"]], "outputs": d["outputs"]}


def model_ready(engine: Engine, name: str, version: str | None = None) -> tuple[str, bool]:
    """A model version's name and readiness, as both front ends answer it: warmed up, in a worker not draining
    (gRPC's answer said so during a drain, HTTP's did not)."""
    m = engine.model(name, version)
    return m.name, m.warmup_ms > 0 and not engine.draining()


@dataclass
class Tensor:
    """An infer request's input tensor, whatever the protocol carried it in: its name, datatype and shape as
    the client sent them (checked here, so of any type), and its contents as either ``raw`` bytes (the binary
    tensor extension's part over HTTP, ``raw_input_contents`` over gRPC: pixels as bytes, images each as a
    4-byte little-endian length and its bytes) or ``data`` (JSON's list: integers, or base64 strings for
    images; gRPC's typed contents: ``uint_contents``, or ``bytes_contents`` already decoded)."""

    name: object
    datatype: object
    shape: object
    raw: bytes | memoryview | None = None
    data: object = None
    base64: bool = True  # ``data`` of an image input holds base64 strings (JSON), not the bytes (gRPC)


def not_one_input() -> APIError:
    return APIError(400, "bad_request", f"'inputs' must hold exactly one tensor: {onnxmeta.INPUT!r} "
                                        f"(UINT8 pixels) or {IMAGE_INPUT!r} (BYTES, encoded images)")


def tensor_input(engine: Engine, call: Call, t: Tensor) -> np.ndarray | list[bytes]:
    """The request's one input, by any protocol: the ``pixels`` tensor (UINT8 N x C x H x W), or ``image``, a
    BYTES tensor of N encoded images (decoded later by the service's preprocessing). Every field is
    type-checked (a bool is not an int), and the count is checked before any content is read."""
    if t.name == IMAGE_INPUT:
        return images_of(engine, t)
    c, h, w = call.model.spec.input_shape
    if t.name != onnxmeta.INPUT:
        raise APIError(400, "bad_input_name", f"input must be named {onnxmeta.INPUT!r} or {IMAGE_INPUT!r}, "
                                              f"got {short(t.name)}")
    if t.datatype != "UINT8":
        raise APIError(400, "bad_datatype", f"input datatype must be UINT8, got {short(t.datatype)}")
    shape = t.shape
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(s) is int for s in shape)
            or shape[1:] != [c, h, w] or shape[0] < 1):
        raise APIError(400, "bad_shape", f"input shape must be [N, {c}, {h}, {w}] with N >= 1, got {short(shape)}")
    engine.check_count(shape[0])
    count = shape[0] * c * h * w
    if t.raw is not None:
        if len(t.raw) != count:
            raise APIError(400, "bad_binary", f"the input's {len(t.raw)} bytes do not match shape {shape} "
                                                 f"({count} bytes)")
        return np.frombuffer(t.raw, np.uint8, count).reshape(shape)
    data = t.data
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__len__"):
        raise APIError(400, "bad_request", "input needs 'data' (a list of integers) or binary_data_size")
    if not isinstance(data, (list, np.ndarray)) and len(data) != count:  # gRPC's flat contents, before converted
        raise APIError(400, "bad_data", f"input data must be {count} integers for shape {shape}, got {len(data)}")
    problem = None
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        problem = "input data is ragged or holds values that are not integers"
    if problem:
        raise APIError(400, "bad_data", problem)
    if arr.size != count or arr.dtype.kind not in "iu":
        raise APIError(400, "bad_data", f"input data must be {count} integers for shape {shape}, "
                                           f"got {arr.size} values of type {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise APIError(400, "bad_data", "UINT8 data must lie in 0..255")
    return arr.astype(np.uint8).reshape(shape)


def images_of(engine: Engine, t: Tensor) -> list[bytes]:
    """The encoded images of a BYTES input: raw, each element is a 4-byte little-endian length and its
    bytes (Triton's serialisation, over HTTP's binary extension and gRPC's raw contents alike); as data,
    base64 strings (JSON) or the bytes themselves (gRPC's ``bytes_contents``)."""
    if t.datatype != "BYTES":
        raise APIError(400, "bad_datatype", f"input {IMAGE_INPUT!r} must be BYTES, got {short(t.datatype)}")
    shape = t.shape
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or not all(type(s) is int for s in shape)
            or shape[0] < 1 or shape[1:] not in ([], [1])):
        raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} shape must be [N] or [N, 1], got {short(shape)}")
    n = shape[0]
    engine.check_count(n)
    if t.raw is not None:
        size = len(t.raw)
        if not size:
            raise APIError(400, "bad_binary", f"input {IMAGE_INPUT!r} has no bytes")
        images, view, pos = [], memoryview(t.raw), 0
        while pos < size:
            if len(images) == n:  # more elements than the shape says: stop before reading them all
                raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds more images")
            if pos + 4 > size:
                raise APIError(400, "bad_binary", f"element {len(images)} of {IMAGE_INPUT!r}: truncated length")
            length = int.from_bytes(view[pos:pos + 4], "little")
            if pos + 4 + length > size:
                raise APIError(400, "bad_binary", f"element {len(images)} of {IMAGE_INPUT!r}: {length} bytes "
                                                     f"announced, {size - pos - 4} left")
            images.append(bytes(view[pos + 4:pos + 4 + length]))
            pos += 4 + length
    elif not t.base64:
        data = t.data
        if data is None or len(data) != n:  # counted before anything is copied
            raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds "
                                             f"{0 if data is None else len(data)} images")
        images = list(data)
    else:
        data = t.data
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise APIError(400, "bad_request", f"input {IMAGE_INPUT!r} needs 'data' (base64 strings) or "
                                               "binary_data_size")
        if len(data) != n:
            raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds {len(data)} images")
        try:
            images = [base64.b64decode(d, validate=True) for d in data]
        except ValueError:
            images = None
        if images is None:
            raise APIError(400, "bad_data", f"input {IMAGE_INPUT!r} data must be base64 strings")
    if len(images) != n:
        raise APIError(400, "bad_shape", f"input {IMAGE_INPUT!r} has shape {shape} but holds {len(images)} images")
    return images

async def decode(engine: Engine, call: Call, images: list[bytes]) -> np.ndarray:
    """Every image decoded; one that fails fails the request, naming its index."""
    decoded = await engine.decode_all(call.model, images, call.ticket)
    bad = next(((i, d) for i, d in enumerate(decoded) if isinstance(d, APIError)), None)
    if bad:
        i, e = bad
        raise APIError(e.status, e.code, f"image {i}: {e.message}")
    return np.stack(decoded)


def output_names(names: list) -> list[str]:
    """The outputs a request asks for, by name (all of them when it names none), each at most once: an answer
    is built per name, so a request naming one output thousands of times asked for thousands of copies of it
    (a 353 KB request got a 70 MB answer, built on the event loop). The first unknown or repeated name is
    refused, so neither the check nor its message grows with the list."""
    seen: list[str] = []
    for o in names:
        if not isinstance(o, str) or o not in onnxmeta.OUTPUTS:
            raise APIError(400, "bad_output", f"unknown output {short(o)}; this model has {list(onnxmeta.OUTPUTS)}")
        if o in seen:
            raise APIError(400, "duplicate_output", f"output {o!r} is asked for more than once; name each output "
                                                    "at most once")
        seen.append(o)
    return seen or list(onnxmeta.OUTPUTS)


# -- Triton's request and output parameters, as either protocol carries them -------------------------------

def priority_value(value) -> str | None:
    """The ``priority`` request parameter: ``interactive`` or ``bulk``, or an integer (1 interactive, 2 and more
    bulk); None where it is absent or 0 (the default)."""
    if value is None or (type(value) is int and value == 0):
        return None
    if type(value) is int:
        return "interactive" if value == 1 else "bulk"
    if isinstance(value, str) and value in PRIORITIES:
        return value
    raise APIError(400, "bad_priority", f"priority must be interactive or bulk (or 1, 2), got {short(value)}")


def tighten(ticket: Ticket, seconds: float | None) -> None:
    """The request's deadline ``seconds`` after its arrival where that is sooner (a gRPC deadline, Triton's
    ``timeout`` parameter in microseconds)."""
    if seconds is not None and seconds > 0 and (ticket.deadline is None or ticket.start + seconds < ticket.deadline):
        ticket.deadline = ticket.start + seconds


def timeout_seconds(value) -> float | None:
    return value / 1e6 if type(value) is int and value > 0 else None


def classification(k, num_classes: int) -> int | None:
    """An output's ``classification`` parameter (tritonclient's ``class_count``): how many classes, or None."""
    if k is None or (type(k) is int and k == 0):
        return None
    if type(k) is not int or not 1 <= k <= num_classes:
        raise APIError(400, "bad_top_k", f"classification must be between 1 and {num_classes}, got {short(k)}")
    return k


def top_of(part: np.ndarray, k: int | None) -> np.ndarray | None:
    """The indices of each row's ``k`` largest values, largest first (None without classification)."""
    return np.argsort(-part, axis=1, kind="stable")[:, :k] if k else None


def classified(part: np.ndarray, top: np.ndarray, labels: tuple[str, ...]) -> list[str]:
    """Triton's classification extension: each row's top classes as ``value:index:label`` texts (BYTES)."""
    return [f"{row[i]:f}:{i}:{labels[i]}" for row, idx in zip(part, top) for i in idx]


async def outputs(engine: Engine, call: Call, pixels: np.ndarray | list[bytes]) -> dict[str, np.ndarray]:
    """The input (pixels, or encoded images, decoded first) through the model's batcher: every output,
    N rows each (float32). Both v2 front ends (HTTP and gRPC) answer from this."""
    if isinstance(pixels, list):
        pixels = await decode(engine, call, pixels)
    p = await engine.run(call, pixels)
    bad = not_finite_rows(p.logits, p.probabilities)
    if bad:  # no protocol can carry NaN as a number (JSON has none), and no client can use it
        raise model_output_not_finite(p.model.name, p.model.version, bad)
    return {onnxmeta.LOGITS: p.logits, onnxmeta.PROBABILITIES: p.probabilities}


# -- an answer's size, bounded before it is built (gRPC's grpc_max_answer_mb) ---------------------------------

def text_bytes(part: np.ndarray, top: np.ndarray, labels: tuple[str, ...]) -> int:
    """What the texts ``"value:index:label"`` of ``top`` (indices into ``part``'s rows) take with their 4-byte
    lengths, at most: each value as wide as the widest in ``part`` (with a sign), each index as the largest."""
    width = len(f"{float(np.abs(part).max(initial=0)):f}") + 1
    return top.size * (4 + width + 1 + len(str(len(labels) - 1)) + 1) + int(label_bytes(labels)[top].sum())


_LABEL_BYTES: dict[int, tuple[tuple, np.ndarray]] = {}


def label_bytes(labels: tuple[str, ...]) -> np.ndarray:
    """Each label's length in UTF-8, once per model (a model may have 100,000 labels)."""
    hit = _LABEL_BYTES.get(id(labels))
    if hit is None or hit[0] is not labels:
        if len(_LABEL_BYTES) > 64:  # models come and go at runtime
            _LABEL_BYTES.clear()
        hit = _LABEL_BYTES[id(labels)] = (labels, np.array([len(x.encode()) for x in labels], np.int64))
    return hit[1]
