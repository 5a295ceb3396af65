"""The fast paths searched with hypothesis against real servers: ``/classify`` and the Open Inference Protocol's infer
are answered past FastAPI's router (``CnnServeAPI.fast``, reached from ``http_server.FastPaths``) by code that
re-does what the router and its dependency solving did: the route's match, the query's validation, the refusals.
Two one-worker servers of the same model, one with ``fast_paths=false`` (every request through the router), each
under a memory cap, get the same generated request: paths near the routes', any query (repeated keys, odd values),
odd headers, and bodies from well-formed to hostile (tensors of any shape, datatype and length, binary parts whose
stated size lies, images and not-images, multipart).

Invariants, for every request:
- the two answers agree: the same status, the same JSON body (outputs to the last digit, or the refusal's code and
  words), the same Server-Timing stages;
- neither is a 5xx, each is JSON, and a refusal is the service's ``{"error", "code", "request_id"}``.

``tests/test_v2_fast.py`` compares the two in-process on chosen cases, this searches for the cases nobody chose."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.support.hostile import raw_http

from .conftest import Server, encode

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of each server, as the other fuzz tests
MODEL = "lenet5-digits"


@pytest.fixture(scope="module")
def pair(stored_default):
    assert stored_default.split(":")[0] == MODEL
    version = stored_default.split(":")[1]
    fast = Server("--arg", f"models={stored_default}", "--arg", "workers=1", memory_limit_mb=CAP_MB)
    try:
        routed = Server("--arg", f"models={stored_default}", "--arg", "workers=1", "--arg", "fast_paths=false",
                        memory_limit_mb=CAP_MB)
    except BaseException:
        fast.stop()
        raise
    yield fast, routed, version
    fast.stop()
    routed.stop()


DIGIT = np.full((1, 28, 28), 200, np.uint8)
PNG = encode(DIGIT[0])
JPEG = encode(DIGIT[0], "JPEG")

# -- what a request is made of -----------------------------------------------------------------------------------

QUERY_KEYS = st.sampled_from(["priority", "timeout_ms", "top_k", "model", "version", "calibrated", "extra",
                              "Priority", "top_k[]"])
QUERY_VALUES = st.one_of(
    st.sampled_from(["bulk", "interactive", "urgent", "5", "0", "-1", "1e9", "nan", "inf", "-inf", "true", "false",
                     "yes", "1.5", "", MODEL, "nope", "1e400", "0x10", " 5", "9" * 40]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF), max_size=8))
QUERY = st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4).map(
    lambda pairs: "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs))

DATATYPES = st.sampled_from(["UINT8", "FP32", "FP16", "FP64", "INT8", "INT32", "INT64", "BOOL", "BYTES", "uint8",
                             "NOPE", ""])
SHAPES = st.one_of(st.sampled_from([[1, 1, 28, 28], [2, 1, 28, 28], [1, 28, 28], [1], [0, 1, 28, 28],
                                    [1, 1, 28, 28, 1], [-1, 1, 28, 28], [1, 1, 2**31, 2**31]]),
                   st.lists(st.integers(-2, 64), max_size=5))
SCALARS = st.one_of(st.integers(-300, 300), st.floats(-1e3, 1e3, allow_nan=False), st.booleans(), st.none(),
                    st.text(max_size=4))


def sized(shape) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) and 0 <= d < 4096 else 1
    return n if n <= 4 * 784 else 0


@st.composite
def tensor(draw) -> dict:
    """One input of a v2 request: its fields each right, wrong or missing."""
    shape = draw(SHAPES)
    out = {}
    name = draw(st.sampled_from(["pixels", "pixels", "image", "x", None, 7]))
    if name is not None:
        out["name"] = name
    datatype = draw(st.one_of(st.none(), DATATYPES))
    if datatype is not None:
        out["datatype"] = datatype
    if draw(st.integers(0, 9)):
        out["shape"] = shape
    how = draw(st.sampled_from(["fill", "fill", "list", "nested", "image", "binary", "none", "scalar"]))
    if how == "fill":  # as many values as the shape says, all one value but maybe one
        data = [draw(st.integers(0, 255))] * sized(shape)
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(SCALARS)
        out["data"] = data
    elif how == "list":
        out["data"] = draw(st.lists(SCALARS, max_size=20))
    elif how == "nested":
        out["data"] = draw(st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=12))
    elif how == "image":  # a BYTES tensor of images, base64'd
        out["data"] = [base64.b64encode(draw(st.sampled_from([PNG, JPEG, b"not an image", b""]))).decode()]
    elif how == "binary":
        out["parameters"] = {"binary_data_size": draw(st.sampled_from([784, 0, 1, 783, 785, 2**40, -1, "784"]))}
    elif how == "scalar":
        out["data"] = draw(SCALARS)
    if draw(st.integers(0, 5)) == 0:
        out["parameters"] = {**out.get("parameters", {}), "content_type": draw(st.sampled_from(["", "str", "x"]))}
    return out


OUTPUTS = st.one_of(st.none(), st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["logits", "probabilities", "ood_score", "feelings", ""])},
    optional={"parameters": st.fixed_dictionaries({}, optional={
        "binary_data": st.booleans(), "classification": st.integers(-1, 12)})}), max_size=3))


@st.composite
def v2_body(draw) -> tuple[bytes, list]:
    """A v2 body (JSON, or JSON and a binary part) and its extra headers."""
    doc: dict = {}
    if draw(st.integers(0, 9)):
        doc["inputs"] = draw(st.lists(tensor(), min_size=0, max_size=2))
    if (outputs := draw(OUTPUTS)) is not None:
        doc["outputs"] = outputs
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=6))
    if draw(st.integers(0, 4)) == 0:
        doc["parameters"] = draw(st.fixed_dictionaries({}, optional={
            "binary_data_output": st.booleans(), "priority": st.integers(0, 3), "timeout": st.integers(0, 9)}))
    head = json.dumps(doc).encode()
    if not draw(st.booleans()):
        return head, []
    tail = draw(st.sampled_from([DIGIT.tobytes(), b"", DIGIT.tobytes()[:100], DIGIT.tobytes() * 2]))
    stated = draw(st.sampled_from([str(len(head)), str(len(head) + 1), "0", "-1", "x", str(len(head) + len(tail)),
                                   "99999999999999999999"]))
    return head + tail, [(b"Inference-Header-Content-Length", stated.encode())]


def multipart(field: str, payload: bytes) -> tuple[bytes, bytes]:
    boundary = b"fuzzboundary"
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + field.encode()
            + b"\"; filename=\"d.png\"\r\nContent-Type: image/png\r\n\r\n" + payload + b"\r\n--" + boundary + b"--\r\n")
    return body, b"multipart/form-data; boundary=" + boundary


@st.composite
def classify_body(draw) -> tuple[bytes, list]:
    payload = draw(st.sampled_from([PNG, JPEG, b"not an image", b"", PNG[:40], PNG + b"\0" * 9]))
    how = draw(st.sampled_from(["raw", "multipart", "wrong field"]))
    if how == "raw":
        ctype = draw(st.sampled_from([b"image/png", b"image/jpeg", b"application/octet-stream", b"text/plain", b""]))
        return payload, [(b"Content-Type", ctype)] if ctype else []
    body, ctype = multipart("image" if how == "multipart" else "picture", payload)
    return body, [(b"Content-Type", ctype)]


def paths(version: str) -> st.SearchStrategy:
    infer = f"/v2/models/{MODEL}"
    return st.sampled_from([
        f"{infer}/infer", f"{infer}/infer", f"{infer}/versions/{version}/infer", f"{infer}/versions/9/infer",
        "/v2/models/nope/infer", f"{infer}/infer/", "/v2/models//infer", f"{infer}/versions//infer",
        f"/v2/models/{MODEL.replace('-', '%2D')}/infer", f"{infer}%2Finfer", f"{infer}/versions/{version}%2F/infer",
        "/classify", "/classify", "/classify/", "/Classify", "//classify", "/classify%2F"])


# -- the comparison ---------------------------------------------------------------------------------------------

def answer(srv, target: str, headers: list, body: bytes) -> tuple:
    """What the comparison looks at: status, JSON body, Server-Timing's stage names; and what is wrong with it
    on its own."""
    status, fields, raw = raw_http(srv, "POST", target, [(b"X-Request-ID", b"fuzz-same-id"), *headers], body)
    problems = []
    if status >= 500:
        problems.append(f"{status}: {raw[:300]!r}")
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
        problems.append(f"{status}, not JSON: {raw[:200]!r}")
    if status >= 400 and not (isinstance(doc, dict) and {"error", "code", "request_id"} <= set(doc)):
        problems.append(f"a {status} that is not the service's JSON error: {raw[:200]!r}")
    timing = dict(fields).get(b"server-timing", b"").decode()
    stages = sorted({part.split(";")[0].strip() for part in timing.split(",") if part.strip()})
    return (status, doc, stages), problems


def compare(pair, target: str, headers: list, body: bytes, problems: list, seen: dict) -> None:
    fast, routed, _ = pair
    a, wrong_a = answer(fast, target, headers, body)
    b, wrong_b = answer(routed, target, headers, body)
    key = f"{target.split('?')[0]} {a[0]}"
    seen[key] = seen.get(key, 0) + 1
    problems.extend((target, headers, body[:120], "fast path: " + p) for p in wrong_a)
    problems.extend((target, headers, body[:120], "router: " + p) for p in wrong_b)
    if a != b:
        problems.append((target, headers, body[:120], f"fast path {a} | router {b}"))


def test_the_fast_paths_answer_as_the_router_does(pair):
    problems: list = []
    seen: dict = {}
    version = pair[2]

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(path=paths(version), query=QUERY, v2=v2_body(), image=classify_body(),
           extra=st.lists(st.tuples(st.sampled_from([b"Content-Type", b"Content-Encoding", b"Expect", b"Accept"]),
                                    st.sampled_from([b"application/json", b"gzip", b"100-continue", b"*/*", b"x"])),
                          max_size=1))
    @example(path=f"/v2/models/{MODEL}/infer", query="", image=(PNG, []), extra=[],
             v2=(json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                         "data": DIGIT.ravel().tolist()}]}).encode(), []))
    @example(path="/classify", query="top_k=3&calibrated=false", v2=(b"{}", []), image=(PNG, [(b"Content-Type",
             b"image/png")]), extra=[])
    def check(path, query, v2, image, extra):
        body, headers = image if "classify" in path.lower() else v2
        target = path + (f"?{query}" if query else "")
        try:
            compare(pair, target, [*headers, *extra], body, problems, seen)
        except (AssertionError, OSError) as e:
            problems.append((target, headers, body[:120], f"{type(e).__name__}: {e}"))

    check()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(repr(p) for p in problems[:8])
    # the search reached answers, not only refusals, on both routes
    assert seen.get(f"/v2/models/{MODEL}/infer 200") and seen.get("/classify 200"), seen
    assert any(k.startswith(f"/v2/models/{MODEL}/infer 4") for k in seen), seen

