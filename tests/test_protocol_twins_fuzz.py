"""The Open Inference Protocol's two front ends searched with hypothesis against one real server under a memory cap:
the same generated infer request sent as KServe v2 REST (JSON ``data``, or the binary tensor extension) and as gRPC
``ModelInfer`` (typed ``contents``, or ``raw_input_contents``), which parse it each their own way (``kserve.py``,
``grpc_service.py``) into the one engine call (``v2.py``).

Invariants, for every request:
- both answer, or both refuse, and a refusal carries the same service code (the REST body's ``code``, gRPC's
  ``cnnserve-code`` trailing metadata) and the status the code maps to (400 INVALID_ARGUMENT, 404 NOT_FOUND);
- answered, the outputs are the same: names, datatypes, shapes and values (FP32 to the bit, classification texts
  to the letter);
- neither is a 5xx (but the 504 a client's own ``timeout`` asks for), INTERNAL or UNKNOWN.

Beside inference, metadata, readiness, Triton's configuration and statistics of any model name and version answer
alike over REST's paths and gRPC's fields."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cnnserve.core.grpc_proto import path, pb
from tests.support.hostile import raw_http

from .conftest import Server, encode

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of the server, as the other fuzz tests
MODEL = "lenet5-digits"
GRPC_OF_HTTP = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
                504: "DEADLINE_EXCEEDED"}  # as docs/grpc.md's table of refusals maps them
TYPED = {"UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
         "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
         "FP32": "fp32_contents", "FP64": "fp64_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents"}
NUMPY = {"UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
         "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BOOL": "?"}


@pytest.fixture(scope="module")
def twin(stored_default):
    assert stored_default.split(":")[0] == MODEL
    srv = Server("--arg", f"models={stored_default}", "--arg", "workers=1", memory_limit_mb=CAP_MB)
    channel = grpc.insecure_channel(srv.grpc_target)
    yield srv, channel, stored_default.split(":")[1]
    channel.close()
    srv.stop()


PNGS = [encode(np.full((28, 28), 40 * i, np.uint8)) for i in range(3)]


def with_lengths(blobs: list[bytes]) -> bytes:
    """Triton's serialisation of BYTES elements: each a 4-byte little-endian length and its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in blobs)


@st.composite
def requests(draw) -> dict:
    """One infer request, protocol-neutral: model and version, one input (or none, or two), outputs, priority."""
    version = draw(st.sampled_from(["", "", "", "9", "{version}"]))
    inputs = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):
        kind = draw(st.sampled_from(["pixels", "pixels", "image", "other"]))
        name = {"pixels": "pixels", "image": "image"}.get(kind) or draw(st.sampled_from(["x", "PIXELS", ""]))
        datatype = "BYTES" if kind == "image" else "UINT8"
        if draw(st.integers(0, 3)) == 0:
            datatype = draw(st.sampled_from(sorted(NUMPY) + ["BYTES"]))
        n = draw(st.sampled_from([1, 1, 2, 3]))
        shape = [n] if datatype == "BYTES" else [n, 1, 28, 28]
        if draw(st.integers(0, 4)) == 0:
            shape = draw(st.sampled_from([[n, 28, 28], [n, 1, 28, 27], [0, 1, 28, 28], [n * 784], [n, 1, 28, 28, 1],
                                          [n, 2]]))
        size = int(np.prod(shape)) if all(d >= 0 for d in shape) else 0
        if datatype == "BYTES":
            values = [draw(st.sampled_from(PNGS + [b"not an image", b""])) for _ in range(max(size, 0))]
        else:
            fill = draw(st.sampled_from([0, 7, 200, 255]))
            values = [fill] * size
            if values and draw(st.integers(0, 3)) == 0:  # one value out of uint8's range, or fractional
                values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([256, 1000, 1.5] if datatype.startswith(
                    "FP") else [256, 1000]))
            if values and draw(st.integers(0, 5)) == 0:  # one value too few or too many
                values = values[:-1] if draw(st.booleans()) else values + [fill]
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "values": values,
                       "raw": draw(st.booleans())})
    outputs = draw(st.one_of(st.just([]), st.lists(st.tuples(
        st.sampled_from(["logits", "probabilities", "probabilities", "nope"]),
        st.one_of(st.none(), st.sampled_from([1, 3, 10, 11, 0, -1]))), max_size=2, unique_by=lambda o: o[0])))
    priority = draw(st.sampled_from([None, None, "bulk", "interactive", "urgent", 1, 2, 0, True, 1.5]))
    timeout = draw(st.sampled_from([None, None, None, 1, 60_000_000, -5, 0]))  # microseconds: 1 always passes
    return {"model": draw(st.sampled_from([MODEL] * 8 + ["nope"])), "version": version, "inputs": inputs,
            "outputs": outputs, "priority": priority, "timeout": timeout}


def representable(t: dict) -> bool:
    """Whether each value fits the input's datatype in both protocols' encodings (a 1.5 in an integer tensor or a
    1000 in a UINT8 raw buffer has no twin: only what both can carry is compared)."""
    if t["datatype"] == "BYTES":
        return True
    kind = np.dtype(NUMPY[t["datatype"]])
    if kind.kind == "b":
        return all(v in (0, 1) for v in t["values"])
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return all(float(v).is_integer() and info.min <= v <= info.max for v in t["values"])
    return True


def as_rest(req: dict, version: str) -> tuple[str, bytes, list]:
    doc: dict = {"inputs": []}
    tail = b""
    for t in req["inputs"]:
        entry = {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]}
        if t["raw"]:
            part = (with_lengths(t["values"]) if t["datatype"] == "BYTES"
                    else np.asarray(t["values"], NUMPY[t["datatype"]]).tobytes())
            entry["parameters"] = {"binary_data_size": len(part)}
            tail += part
        elif t["datatype"] == "BYTES":
            entry["data"] = [base64.b64encode(v).decode() for v in t["values"]]
        else:
            entry["data"] = [bool(v) for v in t["values"]] if t["datatype"] == "BOOL" else t["values"]
        doc["inputs"].append(entry)
    if req["outputs"]:
        doc["outputs"] = [{"name": name, **({"parameters": {"classification": k}} if k is not None else {})}
                          for name, k in req["outputs"]]
    doc["parameters"] = {k: req[k] for k in ("priority", "timeout") if req[k] is not None}
    head = json.dumps(doc).encode()
    headers = [(b"Content-Type", b"application/json")]
    if tail:
        headers.append((b"Inference-Header-Content-Length", str(len(head)).encode()))
    where = f"/v2/models/{req['model']}" + (f"/versions/{version}" if version else "") + "/infer"
    return where, head + tail, headers


def as_grpc(req: dict, version: str) -> pb.ModelInferRequest:
    m = pb.ModelInferRequest(model_name=req["model"], model_version=version)
    raws = []
    for t in req["inputs"]:
        x = m.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if t["raw"]:
            raws.append(with_lengths(t["values"]) if t["datatype"] == "BYTES"
                        else np.asarray(t["values"], NUMPY[t["datatype"]]).tobytes())
        elif t["datatype"] in TYPED:
            values = [bool(v) for v in t["values"]] if t["datatype"] == "BOOL" else t["values"]
            getattr(x.contents, TYPED[t["datatype"]]).extend(values)
        else:  # FP16 has no typed field: raw, as for every client
            raws.append(np.asarray(t["values"], NUMPY[t["datatype"]]).tobytes())
    if raws and len(raws) != len(m.inputs):  # the protocol: raw contents for every input, or for none
        return None
    m.raw_input_contents.extend(raws)
    for name, k in req["outputs"]:
        out = m.outputs.add(name=name)
        if k is not None:
            out.parameters["classification"].int64_param = k
    for key in ("priority", "timeout"):
        value = req[key]
        if value is not None:  # as tritonclient sets a parameter: by its Python type
            field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
            setattr(m.parameters[key], field, value)
    return m


def rest_outputs(doc: dict) -> list:
    return [(o["name"], o["datatype"], list(o["shape"]),
             [str(v) for v in o["data"]] if o["datatype"] == "BYTES" else np.asarray(o["data"], "<f4").tolist())
            for o in doc["outputs"]]


def grpc_outputs(resp: pb.ModelInferResponse) -> list:
    out = []
    for o, raw in zip(resp.outputs, resp.raw_output_contents):
        if o.datatype == "BYTES":
            values, i = [], 0
            while i < len(raw):
                n = int.from_bytes(raw[i:i + 4], "little")
                values.append(raw[i + 4:i + 4 + n].decode())
                i += 4 + n
        else:
            values = np.frombuffer(raw, "<f4").tolist()
        out.append((o.name, o.datatype, list(o.shape), values))
    return out


def test_rest_and_grpc_answer_the_same_request_alike(twin):
    srv, channel, version = twin
    infer = channel.unary_unary(path("ModelInfer"))
    problems: list = []
    seen: dict = {}

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=requests())
    @example(req={"model": MODEL, "version": "", "outputs": [], "priority": None, "timeout": None, "inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "values": [7] * 784, "raw": False}]})
    @example(req={"model": MODEL, "version": "{version}", "outputs": [("probabilities", 3)], "priority": "bulk",
                  "timeout": 60_000_000,
                  "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "values": PNGS[:2], "raw": True}]})
    def check(req):
        if not all(representable(t) for t in req["inputs"]):
            return
        v = req["version"].replace("{version}", version)
        message = as_grpc(req, v)
        if message is None:
            return
        target, body, headers = as_rest(req, v)
        try:
            status, _, raw = raw_http(srv, "POST", target, headers, body)
        except (AssertionError, OSError) as e:
            problems.append((req, f"REST: {type(e).__name__}: {e}"))
            return
        doc = json.loads(raw)
        try:
            resp = pb.ModelInferResponse.FromString(infer(message.SerializeToString(), timeout=60))
            code, service_code = "OK", None
        except grpc.RpcError as e:
            resp, code = None, e.code().name
            service_code = dict(e.trailing_metadata() or ()).get("cnnserve-code")
        seen[f"{status} {code}"] = seen.get(f"{status} {code}", 0) + 1
        what = {k: (val if k != "inputs" else [{**t, "values": f"{len(t['values'])} values"} for t in val])
                for k, val in req.items()}
        if (status >= 500 and not (status == 504 and req["timeout"])) or code in ("INTERNAL", "UNKNOWN"):
            problems.append((what, status, doc, code))
        elif (status == 200) != (code == "OK"):
            problems.append((what, f"REST {status} {doc.get('code')} {doc.get('error', '')[:150]}",
                             f"gRPC {code} {service_code}"))
        elif status == 200:
            if rest_outputs(doc) != grpc_outputs(resp):
                problems.append((what, "outputs differ", rest_outputs(doc), grpc_outputs(resp)))
        elif doc.get("code") != service_code or GRPC_OF_HTTP.get(status) != code:
            problems.append((what, f"REST {status} {doc.get('code')} {doc.get('error', '')[:150]}",
                             f"gRPC {code} {service_code}"))

    check()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(repr(p)[:1200] for p in problems[:6])
    assert seen.get("200 OK", 0) >= 20 and seen.get("400 INVALID_ARGUMENT", 0) >= 20, seen
    assert seen.get("404 NOT_FOUND") and seen.get("504 DEADLINE_EXCEEDED"), seen


# -- beside inference: metadata, readiness, configuration and statistics ---------------------------------------

# Not "stats": GET /v2/models/stats is the protocol's every-model statistics (Triton's path), so over REST a model of
# that name has no metadata route, as in Triton; nor "/", which no path segment holds.
NAMES = st.one_of(st.sampled_from([MODEL, MODEL, MODEL, "nope", "名前", "x" * 300, "a b", "..", "%", "?"]),
                  st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1,
                          max_size=10).filter(lambda n: n != "stats"))
KINDS = {"metadata": ("", "ModelMetadata"), "ready": ("/ready", "ModelReady"), "config": ("/config", "ModelConfig"),
         "stats": ("/stats", "ModelStatistics")}


def rest_view(kind: str, doc: dict):
    if kind == "metadata":
        return (doc["name"], doc["versions"], doc["platform"],
                [(t["name"], t["datatype"], t["shape"]) for t in doc["inputs"] + doc["outputs"]])
    if kind == "ready":
        return doc["ready"]
    if kind == "config":
        return doc["name"], doc["max_batch_size"], [t["name"] for t in doc["input"]]
    return sorted((m["name"], m["version"]) for m in doc["model_stats"])


def grpc_view(kind: str, resp):
    if kind == "metadata":
        return (resp.name, list(resp.versions), resp.platform,
                [(t.name, t.datatype, list(t.shape)) for t in [*resp.inputs, *resp.outputs]])
    if kind == "ready":
        return resp.ready
    if kind == "config":
        return resp.config.name, resp.config.max_batch_size, [t.name for t in resp.config.input]
    return sorted((m.name, m.version) for m in resp.model_stats)


def test_rest_and_grpc_describe_a_model_alike(twin):
    """Metadata, readiness, Triton's configuration and statistics for any model name and version (the served one,
    unknown ones, odd characters), over REST's paths and gRPC's fields: the same description, or the same
    refusal (status and service code)."""
    from urllib.parse import quote

    srv, channel, version = twin
    problems: list = []
    seen: dict = {}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(sorted(KINDS)), name=NAMES,
           v=st.sampled_from(["", "", "{version}", "9", "latest", "ü"]))
    def check(kind, name, v):
        v = v.replace("{version}", version)
        suffix, method = KINDS[kind]
        target = f"/v2/models/{quote(name, safe='')}" + (f"/versions/{quote(v, safe='')}" if v else "") + suffix
        status, _, raw = raw_http(srv, "GET", target, [])
        doc = json.loads(raw)
        request = {"ModelMetadata": pb.ModelMetadataRequest, "ModelReady": pb.ModelReadyRequest,
                   "ModelConfig": pb.ModelConfigRequest, "ModelStatistics": pb.ModelStatisticsRequest}[method]
        answer = {"ModelMetadata": pb.ModelMetadataResponse, "ModelReady": pb.ModelReadyResponse,
                  "ModelConfig": pb.ModelConfigResponse, "ModelStatistics": pb.ModelStatisticsResponse}[method]
        try:
            resp = answer.FromString(channel.unary_unary(path(method))(
                request(name=name, version=v).SerializeToString(), timeout=30))
            code, service_code = "OK", None
        except grpc.RpcError as e:
            resp, code = None, e.code().name
            service_code = dict(e.trailing_metadata() or ()).get("cnnserve-code")
        seen[f"{kind} {status} {code}"] = seen.get(f"{kind} {status} {code}", 0) + 1
        if status >= 500 or code in ("INTERNAL", "UNKNOWN"):
            problems.append((kind, name, v, status, doc, code))
        elif (status == 200) != (code == "OK"):
            problems.append((kind, name, v, f"REST {status} {doc}", f"gRPC {code} {service_code}"))
        elif status == 200:
            if rest_view(kind, doc) != grpc_view(kind, resp):
                problems.append((kind, name, v, "differ", rest_view(kind, doc), grpc_view(kind, resp)))
        elif doc.get("code") != service_code or GRPC_OF_HTTP.get(status) != code:
            problems.append((kind, name, v, f"REST {status} {doc.get('code')}", f"gRPC {code} {service_code}"))

    check()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(repr(p)[:600] for p in problems[:8])
    assert all(seen.get(f"{kind} 200 OK") for kind in KINDS) and any(" 404 NOT_FOUND" in k for k in seen), seen
