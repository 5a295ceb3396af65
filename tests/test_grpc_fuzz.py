"""gRPC's ModelInfer fuzzed with hypothesis: requests built from the message's own fields (duplicate outputs,
huge, zero and negative shapes, wrong datatypes, contents in the wrong typed field, raw contents that do not
match, many inputs, parameters of every type, unknown and 100 KB model names) against one real two-worker server
under a memory cap. After every example: the status is OK or a deliberate refusal, never INTERNAL or UNKNOWN;
a refusal's message is short whatever the client sent (it travels as metadata, which a client caps at 8 KB); an
unknown model is NOT_FOUND; an answer is no larger than its request's batch can need; the workers stay within
their memory bound. Afterwards the server is ready and a good request gets its answer."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cnnserve.core.grpc_proto import path, pb
from tests.support.faults import worker_pids

from .conftest import Server, encode

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of the server, as tests/test_grpc.py: hostile input fails there, not on the machine
REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
WORKER_MB = 1536  # one worker serving LeNet-5 sits near 160 MB; messages here are at most 2 MB
MAX_DETAILS = 1100  # the service cuts refusal messages to 1,000 bytes
PER_IMAGE = 2 * 10 * 64  # both outputs of a 10-class model, as FP32 or as "value:index:label" texts
CHANNELS = 4  # the examples go round these, so that both workers (SO_REUSEPORT spreads connections) get some


@pytest.fixture(scope="module")
def fuzzed(stored_default):
    # answers past 100 KB refused (256 images' top 10 as text for both outputs is about 150 KB)
    s = Server("--arg", f"models={stored_default}", "--arg", "workers=2", "--arg", "max_request_mb=2",
               "--arg", "grpc_max_answer_mb=0.1", memory_limit_mb=CAP_MB)
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    channels = [grpc.insecure_channel(s.grpc_target, options=options) for _ in range(CHANNELS)]
    yield s, channels
    for ch in channels:
        ch.close()
    s.stop()


# -- the requests --------------------------------------------------------------------------------------------

MODEL = "lenet5-digits"
INT64 = st.integers(-2**63, 2**63 - 1)
SIZES = st.sampled_from([0, 1, 2, 3, 28, 256, 257, 100_000, 2**31, 2**62, 2**63 - 1, -1, -28, -2**63]) | INT64
TEXT = st.text(max_size=12)
PARAMETER = st.one_of(st.booleans().map(lambda v: ("bool_param", v)), INT64.map(lambda v: ("int64_param", v)),
                      TEXT.map(lambda v: ("string_param", v)),
                      st.floats(allow_nan=True).map(lambda v: ("double_param", v)),
                      st.integers(0, 2**64 - 1).map(lambda v: ("uint64_param", v)))
PARAMETERS = st.dictionaries(st.sampled_from(["priority", "timeout", "classification", "binary_data_size"]) | TEXT,
                             PARAMETER, max_size=4)
TYPED = {  # every typed contents field, with values of its type
    "bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1), "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=40)}


def png(n: int = 1) -> list[bytes]:
    """``n`` small PNGs (eight different ones, made once)."""
    if not PNGS:
        PNGS.extend(encode(np.full((28, 28), 30 * i, np.uint8)) for i in range(8))
    return [PNGS[i % len(PNGS)] for i in range(n)]


PNGS: list[bytes] = []


def with_lengths(blobs: list[bytes]) -> bytes:
    """Triton's serialisation of BYTES elements: each a 4-byte little-endian length and its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in blobs)


def put(target, params: dict) -> None:
    for key, (field, value) in params.items():
        setattr(target[key], field, value)


@st.composite
def tensors(draw, n: int):
    """(input, raw contents): a good one for ``n`` images, each part of it possibly replaced by nonsense."""
    kind = draw(st.sampled_from(["pixels", "pixels", "image", "nonsense"]))
    t = pb.ModelInferRequest.InferInputTensor(name="image" if kind == "image" else "pixels",
                                              datatype="BYTES" if kind == "image" else "UINT8",
                                              shape=[n] if kind == "image" else [n, 1, 28, 28])
    raw = []
    how = draw(st.sampled_from(["raw", "typed"]))
    if kind == "pixels" and how == "raw":
        raw = [bytes(draw(st.sampled_from([784 * n, 784 * n - 1, 784 * n + 1, 0, 784]))) or b""]
    elif kind == "pixels":
        t.contents.uint_contents.extend(draw(st.sampled_from([[7] * (784 * n), [7] * 783, [256] * (784 * n)])))
    elif kind == "image" and how == "raw":
        raw = [draw(st.sampled_from([with_lengths(png(n)), with_lengths(png(n))[:-3], b"\xff\xff\xff\x7f",
                                     with_lengths([b"not an image"] * n), with_lengths(png(n + 1))]))]
    elif kind == "image":
        t.contents.bytes_contents.extend(draw(st.sampled_from([png(n), png(n + 2), [b""] * n, [b"GIF89a"] * n])))
    if kind == "nonsense" or draw(st.booleans()):  # something of it wrong
        what = draw(st.sampled_from(["name", "datatype", "shape", "contents", "raw", "parameters"]))
        if what == "name":
            t.name = draw(st.sampled_from(["", "PIXELS", "pixels ", "x" * 10_000]) | TEXT)
        elif what == "datatype":
            t.datatype = draw(st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "UINT8", "uint8", ""]) | TEXT)
        elif what == "shape":
            del t.shape[:]
            t.shape.extend(draw(st.lists(SIZES, max_size=6)))
        elif what == "contents":  # a typed field beside, or instead of, the right one
            field = draw(st.sampled_from(sorted(TYPED)))
            if draw(st.booleans()):
                t.contents.Clear()
            getattr(t.contents, field).extend(draw(st.lists(TYPED[field], max_size=50)))
        elif what == "raw":
            raw = draw(st.lists(st.binary(max_size=64) | st.just(bytes(784)), max_size=3))
        else:
            put(t.parameters, draw(PARAMETERS))
    return t, raw


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    """A ModelInferRequest: often a good one, with some of its fields replaced by anything of their type."""
    n = draw(st.sampled_from([1, 1, 2, 5, 64, 256]))
    def usually(value, other):  # the served model and its version in most examples, to get past them
        return value if draw(st.integers(0, 9)) < 8 else draw(other)

    req = pb.ModelInferRequest(
        model_name=usually(MODEL, st.sampled_from(["nope", "", "x" * 100_000, "名前" * 10, "../" * 20]) | TEXT),
        model_version=usually("", st.sampled_from(["1", "latest", "0" * 50]) | TEXT),
        id=draw(st.sampled_from(["", "req-1"]) | TEXT | st.just("i" * 50_000)))
    put(req.parameters, draw(PARAMETERS | st.fixed_dictionaries(
        {"priority": st.sampled_from([("string_param", "bulk"), ("int64_param", 1), ("bool_param", True)])})))
    count = draw(st.sampled_from([1, 1, 1, 0, 2, 200]))
    for _ in range(count):
        t, raw = draw(tensors(n if count < 10 else 1))  # many inputs, each small: within max_request_mb
        req.inputs.append(t)
        req.raw_input_contents.extend(raw)
    names = st.sampled_from(["logits", "probabilities", "", "nope", "probabilities "]) | TEXT
    outputs = draw(st.lists(st.tuples(names, PARAMETERS | st.fixed_dictionaries({"classification": st.tuples(
        st.just("int64_param"), st.sampled_from([0, 1, 3, 10, 11, -1, 2**62]))})), max_size=4)
        | st.tuples(st.sampled_from(["logits", "probabilities"]), st.integers(2, 3000)).map(
            lambda d: [(d[0], {})] * d[1]))
    for name, params in outputs:
        put(req.outputs.add(name=name).parameters, params)
    return req


def batch_of(req) -> int:
    """The images a request that was answered carried: its one input's first dimension."""
    return int(req.inputs[0].shape[0])


# -- the test ------------------------------------------------------------------------------------------------

def _many_inputs() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    for _ in range(200):
        req.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 28, 28])
        req.raw_input_contents.append(bytes(784))
    return req


def _with(**fields) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=fields.pop("model_name", MODEL))
    shape = fields.pop("shape", [1, 1, 28, 28])
    req.inputs.add(name="pixels", datatype=fields.pop("datatype", "UINT8"), shape=shape)
    req.raw_input_contents.append(fields.pop("raw", bytes(784)))
    for name in fields.pop("outputs", []):
        req.outputs.add(name=name)
    assert not fields
    return req


def test_generated_infer_requests(fuzzed, stored_default):
    """Every generated request is answered or deliberately refused, within the invariants above (the module's
    docstring); 300 examples plus the named ones."""
    srv, channels = fuzzed
    assert stored_default.split(":")[0] == MODEL
    seen: dict[str, int] = {}
    problems: list = []
    count = [0]

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, phases=[Phase.explicit,
              Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=infer_requests())
    @example(req=_with(model_name="x" * 100_000))  # the name is echoed in the refusal: cut, still NOT_FOUND
    @example(req=_with(outputs=["probabilities"] * 20_000))  # each output at most once
    @example(req=_with(shape=[2**62, 1, 28, 28]))
    @example(req=_with(shape=[0, 1, 28, 28], raw=b""))
    @example(req=_with(shape=[-1, 1, 28, 28]))
    @example(req=_with(datatype="FP32", raw=bytes(784 * 4)))
    @example(req=_many_inputs())
    def check(req):
        count[0] += 1
        ch = channels[count[0] % len(channels)]
        body = req.SerializeToString()
        try:
            raw = ch.unary_unary(path("ModelInfer"))(body, timeout=30)
            status, details = "OK", ""
        except grpc.RpcError as e:
            raw, status, details = None, e.code().name, e.details() or ""
        seen[status] = seen.get(status, 0) + 1
        what = (req.model_name[:40], [(t.name[:20], t.datatype[:10], list(t.shape)[:6]) for t in req.inputs[:3]],
                len(req.inputs), len(req.outputs), status, details[:200])
        if status != "OK" and status not in REFUSALS:
            problems.append(("status", what))
        if len(details.encode()) > MAX_DETAILS:
            problems.append(("long refusal", len(details.encode()), what))
        if req.model_name not in ("", MODEL) and len(body) <= 2 * 2**20 and status != "NOT_FOUND":  # "": the default
            problems.append(("unknown model not NOT_FOUND", what))
        if raw is not None and len(raw) > batch_of(req) * PER_IMAGE + len(req.id) + 1024:
            problems.append(("answer larger than its batch can need", len(raw), what))
        if count[0] % 10 == 0:
            sizes = worker_rss(srv)
            if max(sizes) > WORKER_MB:
                problems.append(("worker memory", sizes, what))

    check()
    assert not problems, (len(problems), sorted({p[0] for p in problems}), problems[:10])
    assert seen.get("OK", 0) >= 10 and seen.get("INVALID_ARGUMENT", 0) >= 10, seen  # both paths were exercised
    assert max(worker_rss(srv)) <= WORKER_MB
    # still ready, on every connection, and a good request still answers
    x = np.zeros((1, 1, 28, 28), np.uint8)
    for ch in channels:
        ready = pb.ServerReadyResponse.FromString(ch.unary_unary(path("ServerReady"))(b"", timeout=10))
        assert ready.ready
        resp = pb.ModelInferResponse.FromString(ch.unary_unary(path("ModelInfer"))(
            _with(raw=x.tobytes(), outputs=["probabilities"]).SerializeToString(), timeout=30))
        probs = np.frombuffer(resp.raw_output_contents[0], "<f4")
        assert list(resp.outputs[0].shape) == [1, 10] and abs(probs.sum() - 1) < 1e-4


def worker_rss(srv) -> list[float]:
    import psutil

    sizes = []
    for pid in worker_pids(srv):
        try:
            sizes.append(psutil.Process(pid).memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            sizes.append(0.0)
    return sizes or [0.0]
