"""What every peer's server script shares, as a user of that peer would write it: the ``model.onnx`` in an
onnxruntime session (the same file cnnserve serves: uint8 N x C x H x W ``pixels`` in, ``probabilities`` out),
an encoded image decoded with Pillow into that input, and, for a server whose framework does not speak the Open
Inference Protocol itself (Ray Serve), its request and answer. Runs in the peers' environments: numpy,
onnxruntime and Pillow only, nothing of this repository."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

INPUT, IMAGE, OUTPUT = "pixels", "image", "probabilities"


class Classifier:
    def __init__(self, path: str, threads: int = 0, spin: bool = True):
        """onnxruntime's defaults unless told: all cores, its worker threads spinning between runs (``spin``)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.channels, self.height, self.width = (int(d) for d in self.session.get_inputs()[0].shape[1:])
        self.classes = int(next(o for o in self.session.get_outputs() if o.name == OUTPUT).shape[-1])

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: pixels})[0]

    def decode(self, data: bytes) -> np.ndarray:
        return decode(data, self.channels, self.height, self.width)

    def images(self, items) -> np.ndarray:
        """A BYTES tensor's items (base64 text in JSON, or bytes) decoded into one batch."""
        return np.concatenate([self.decode(base64.b64decode(x) if isinstance(x, str) else bytes(x)) for x in items])


def decode(data: bytes, channels: int, height: int, width: int) -> np.ndarray:
    """One encoded image as the model's 1 x C x H x W uint8 input."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return (a[None] if channels == 1 else a.transpose(2, 0, 1))[None]


def parse_v2(model: Classifier, body: bytes, header_length: str | None) -> np.ndarray:
    """An Open Inference Protocol request's one input as the model's pixels: UINT8 ``pixels`` as JSON data or
    with the binary tensor extension, or BYTES ``image`` (base64 encoded images)."""
    n = int(header_length) if header_length else len(body)
    req = json.loads(body[:n])
    t = req["inputs"][0]
    if t["name"] == IMAGE:
        return model.images(t["data"])
    size = (t.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        x = np.frombuffer(body[n:n + size], dtype=np.uint8)
    else:
        x = np.asarray(t["data"], dtype=np.uint8)
    return x.reshape(t["shape"])


def answer_v2(name: str, probs: np.ndarray) -> bytes:
    return json.dumps({"model_name": name, "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape),
                                                        "data": probs.ravel().tolist()}]}).encode()
