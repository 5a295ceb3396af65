"""One image, three front ends, searched with hypothesis against one real server under a memory cap: the same
generated file (any of Pillow's common formats and modes, any small size, whole or cut short or with a byte
changed) sent as ``POST /classify``'s body, as the Open Inference Protocol's ``image`` input over REST (base64
JSON) and over gRPC (``bytes_contents``). Each front end hands the bytes to the one decoder (``Engine.decode``).

Invariants, for every image:
- the three answer alike: all three classify it, or all three refuse it with the same service code (REST's
  ``code``, gRPC's ``cnnserve-code``);
- answered, the probabilities agree: /classify's top 10 (every class of the model) are v2's ``probabilities`` over
  REST and over gRPC, to float32's last digits;
- none is a 5xx, INTERNAL or UNKNOWN.

And a batch: ``POST /classify/batch`` with several such files answers each as ``/classify`` answers it alone (the
same probabilities, or an error entry with the same code), in order, the good ones still answered beside bad ones."""

from __future__ import annotations

import base64
import io
import json

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnserve.core.grpc_proto import path, pb
from tests.support.hostile import raw_http

from .conftest import Server

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of the server, as the other fuzz tests
MODEL = "lenet5-digits"
CLASSES = 10
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "GIF": "image/gif", "TIFF": "image/tiff",
           "WEBP": "image/webp"}
MODES = ["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK", "I", "F"]


@pytest.fixture(scope="module")
def served(stored_default):
    assert stored_default.split(":")[0] == MODEL
    srv = Server("--arg", f"models={stored_default}", "--arg", "workers=1", memory_limit_mb=CAP_MB)
    channel = grpc.insecure_channel(srv.grpc_target)
    yield srv, channel
    channel.close()
    srv.stop()


@st.composite
def images(draw) -> tuple[bytes, str]:
    """A small image file and its content type: most whole, some cut short or with one byte changed."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (h, w), np.uint8), "L")
    try:
        img = img.convert(mode)
        out = io.BytesIO()
        img.save(out, fmt)
        data = out.getvalue()
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold: the grey original
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w), np.uint8), "L").save(out, fmt)
        data = out.getvalue()
    damage = draw(st.sampled_from(["none", "none", "none", "cut", "byte"]))
    if damage == "cut" and len(data) > 1:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data, FORMATS[fmt]


def via_classify(srv, data: bytes, ctype: str) -> tuple:
    status, _, raw = raw_http(srv, "POST", f"/classify?model={MODEL}&top_k={CLASSES}",
                              [(b"Content-Type", ctype.encode())], data)
    doc = json.loads(raw)
    if status != 200:
        return status, doc.get("code"), None
    probs = np.zeros(CLASSES, np.float32)
    for p in doc["predictions"]:
        probs[p["index"]] = p["probability"]
    return status, None, probs


def via_rest(srv, data: bytes) -> tuple:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(data).decode()]}],
                       "outputs": [{"name": "probabilities"}]}).encode()
    status, _, raw = raw_http(srv, "POST", f"/v2/models/{MODEL}/infer", [(b"Content-Type", b"application/json")],
                              body)
    doc = json.loads(raw)
    if status != 200:
        return status, doc.get("code"), None
    return status, None, np.asarray(doc["outputs"][0]["data"], np.float32)


def via_grpc(channel, data: bytes) -> tuple:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
    req.outputs.add(name="probabilities")
    try:
        resp = pb.ModelInferResponse.FromString(channel.unary_unary(path("ModelInfer"))(req.SerializeToString(),
                                                                                        timeout=60))
    except grpc.RpcError as e:
        return e.code().name, dict(e.trailing_metadata() or ()).get("cnnserve-code"), None
    return "OK", None, np.frombuffer(resp.raw_output_contents[0], "<f4")


def test_an_image_is_answered_alike_by_every_front_end(served):
    srv, channel = served
    problems: list = []
    seen: dict = {}

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(image=images())
    @example(image=(b"", "image/png"))
    @example(image=(b"not an image", "image/jpeg"))
    def check(image):
        data, ctype = image
        a, b, c = via_classify(srv, data, ctype), via_rest(srv, data), via_grpc(channel, data)
        seen[f"{a[0]} {b[0]} {c[0]}"] = seen.get(f"{a[0]} {b[0]} {c[0]}", 0) + 1
        what = (ctype, len(data), data[:24])
        if a[0] >= 500 or b[0] >= 500 or c[0] in ("INTERNAL", "UNKNOWN"):
            problems.append((what, a[:2], b[:2], c[:2]))
        elif (a[0] == 200, b[0] == 200, c[0] == "OK") not in ((True, True, True), (False, False, False)):
            problems.append((what, "one answered, another refused", a[:2], b[:2], c[:2]))
        elif a[0] == 200:
            if not (np.allclose(a[2], b[2], rtol=0, atol=2e-7) and np.array_equal(b[2], c[2])):
                problems.append((what, "probabilities differ", a[2], b[2], c[2]))
        elif not a[1] == b[1] == c[1]:
            problems.append((what, "refused with different codes", a[:2], b[:2], c[:2]))

    check()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(repr(p)[:800] for p in problems[:6])
    assert seen.get("200 200 OK", 0) >= 50 and sum(n for k, n in seen.items() if k.startswith("4")) >= 10, seen


def multipart(files: list[tuple[bytes, str]]) -> tuple[bytes, bytes]:
    boundary = b"twinsboundary7"
    body = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; filename="f%d"\r\n'
                    % i + b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data + b"\r\n"
                    for i, (data, ctype) in enumerate(files))
    return body + b"--" + boundary + b"--\r\n", b"multipart/form-data; boundary=" + boundary


def test_a_batch_answers_each_image_as_classify_does(served):
    srv, _ = served
    problems: list = []
    seen = {"answered": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(files=st.lists(images(), min_size=1, max_size=6))
    def check(files):
        body, ctype = multipart(files)
        status, _, raw = raw_http(srv, "POST", f"/classify/batch?model={MODEL}&top_k={CLASSES}",
                                  [(b"Content-Type", ctype)], body)
        if status != 200:
            problems.append(("batch", status, raw[:300]))
            return
        results = json.loads(raw)["results"]
        if [r["index"] for r in results] != list(range(len(files))):
            problems.append(("order", [r["index"] for r in results]))
            return
        for (data, kind), r in zip(files, results):
            alone = via_classify(srv, data, kind)
            if "error" in r:
                seen["refused"] += 1
                if alone[0] == 200 or alone[1] != r["error"]["code"] or alone[0] != r["error"]["status"]:
                    problems.append(("refused in the batch", r["error"], "alone", alone[:2], len(data)))
            else:
                seen["answered"] += 1
                probs = np.zeros(CLASSES, np.float32)
                for p in r["predictions"]:
                    probs[p["index"]] = p["probability"]
                if alone[0] != 200 or not np.allclose(alone[2], probs, rtol=0, atol=2e-7):
                    problems.append(("answered in the batch", probs, "alone", alone, len(data)))

    check()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(repr(p)[:800] for p in problems[:6])
    assert seen["answered"] >= 50 and seen["refused"] >= 5, seen
