"""The Open Inference Protocol over gRPC (service/grpc_server.py) against a real `bentoml serve`, with Triton's
own clients: the same answers as HTTP, deadlines, refusals mapped to status codes (never INTERNAL or
UNKNOWN, whatever the input), health, reflection and the drain."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from cnnserve.core.grpc_proto import HEALTH_SERVICE, SERVICE, path, pb

from .conftest import Server, encode, free_port, health_of, serve_until_exit

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process of the server: hostile input fails there, not on the machine (test_reliability.py)
BAD = {"StatusCode.INTERNAL", "StatusCode.UNKNOWN"}


@pytest.fixture(scope="module")
def srv(stored_default):
    s = Server("--arg", f"models={stored_default}", "--arg", "max_request_mb=2", memory_limit_mb=CAP_MB)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(stored_default) -> str:
    return stored_default.split(":")[0]


def pixels_input(x: np.ndarray, binary: bool = True):
    t = tg.InferInput("pixels", list(x.shape), "UINT8")
    t.set_data_from_numpy(x)
    return t


def images_input(blobs: list[bytes]):
    t = tg.InferInput("image", [len(blobs)], "BYTES")
    t.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return t


def test_descriptors_are_tritonclients():
    """The server's messages are the installed tritonclient's, byte for byte (else: regenerate them)."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    from cnnserve.core import grpc_descriptors as d

    hint = "tritonclient changed its protocol: python -m cnnserve.core.grpc_proto --write"
    assert d.GRPC_SERVICE == service_pb2.DESCRIPTOR.serialized_pb, hint
    assert d.MODEL_CONFIG == model_config_pb2.DESCRIPTOR.serialized_pb, hint


def test_same_answers_as_http_for_the_digits_test_split(srv, model, digits_test):
    """Pixels and PNG images over gRPC (sync client) give HTTP's top-1 and probabilities within 1e-6."""
    images, labels = digits_test
    hc = th.InferenceServerClient(srv.url.removeprefix("http://"))
    gc = tg.InferenceServerClient(srv.grpc_target)
    assert gc.is_server_live() and gc.is_server_ready() and gc.is_model_ready(model)
    meta = gc.get_model_metadata(model, as_json=True)
    assert meta["inputs"][0]["name"] == "pixels" and meta["platform"] == "onnxruntime_onnx"
    assert gc.get_server_metadata(as_json=True)["name"] == "cnnserve"
    # the index is the HTTP one's: every stored version, the served one READY, as hc (HTTP) says too
    index = gc.get_model_repository_index(as_json=True)["models"]
    assert any(m["name"] == model and m.get("state") == "READY" for m in index), index
    assert sorted((m["name"], m["version"], m.get("state")) for m in index) == sorted(
        (m["name"], m["version"], m.get("state")) for m in hc.get_model_repository_index())
    out = th.InferRequestedOutput("probabilities", binary_data=True)
    via_http, via_grpc, via_bytes = [], [], []
    for i in range(0, len(images), 64):
        x = images[i:i + 64]
        t = th.InferInput("pixels", list(x.shape), "UINT8")
        t.set_data_from_numpy(x, binary_data=True)
        via_http.append(hc.infer(model, [t], outputs=[out]).as_numpy("probabilities"))
        via_grpc.append(gc.infer(model, [pixels_input(x)], client_timeout=30).as_numpy("probabilities"))
        blobs = [encode(im[0]) for im in x]
        via_bytes.append(gc.infer(model, [images_input(blobs)], client_timeout=30).as_numpy("probabilities"))
    h, g, b = (np.concatenate(v) for v in (via_http, via_grpc, via_bytes))
    assert h.shape == g.shape == b.shape == (len(images), 10)
    assert np.array_equal(h.argmax(1), g.argmax(1)) and np.array_equal(h.argmax(1), b.argmax(1))
    assert np.abs(h - g).max() <= 1e-6 and np.abs(h - b).max() <= 1e-6
    assert (g.argmax(1) == labels).mean() > 0.9
    # typed contents (uint_contents) as well as raw bytes, and only the output asked for
    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="pixels", datatype="UINT8", shape=list(images[:2].shape))
    tensor.contents.uint_contents.extend(images[:2].ravel().tolist())
    req.outputs.add(name="logits")
    with grpc.insecure_channel(srv.grpc_target) as ch:
        resp = pb.ModelInferResponse.FromString(
            ch.unary_unary(path("ModelInfer"))(req.SerializeToString(), timeout=30))
    assert [o.name for o in resp.outputs] == ["logits"] and list(resp.outputs[0].shape) == [2, 10]
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 10)
    assert np.array_equal(logits.argmax(1), h[:2].argmax(1))


def test_async_client_deadlines_and_priority(srv, model, digits_test):
    images, _ = digits_test

    async def run():
        async with tga.InferenceServerClient(srv.grpc_target) as c:
            assert await c.is_server_ready()
            x = images[:8]
            results = await asyncio.gather(*[c.infer(model, [pixels_input(x[i:i + 1])], client_timeout=30,
                                                     priority=1 + i % 2) for i in range(8)])
            probs = np.concatenate([r.as_numpy("probabilities") for r in results])
            # a deadline that has passed before the model could run: DEADLINE_EXCEEDED, never run
            big = np.repeat(images[:1], 256, axis=0)
            with pytest.raises(InferenceServerException) as e:
                await c.infer(model, [pixels_input(big)], client_timeout=0.0005)
            return probs, e.value.status()

    probs, status = asyncio.run(run())
    assert probs.shape == (8, 10)
    assert status == "StatusCode.DEADLINE_EXCEEDED"


def call(target: str, method: str, body: bytes, timeout: float = 30):
    """One raw call: (status code name, details, trailing metadata)."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as ch:
        try:
            ch.unary_unary(path(method))(body, timeout=timeout)
            return "OK", "", {}
        except grpc.RpcError as e:
            return e.code().name, e.details(), dict(e.trailing_metadata() or ())


def infer_bytes(model: str, name="pixels", datatype="UINT8", shape=(1, 1, 28, 28), raw: bytes | None = None,
                **params) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        req.raw_input_contents.append(raw)
    for k, v in params.items():
        if isinstance(v, str):
            req.parameters[k].string_param = v
        else:
            req.parameters[k].int64_param = v
    return req.SerializeToString()


def test_refusals_map_to_status_codes(srv, model):
    t = srv.grpc_target
    ok = bytes(784)
    cases = {
        "unknown model": (infer_bytes("nope", raw=ok), "NOT_FOUND", "unknown_model"),
        "bad dtype": (infer_bytes(model, datatype="FP32", raw=ok), "INVALID_ARGUMENT", "bad_datatype"),
        "bad shape": (infer_bytes(model, shape=(1, 3, 28, 28), raw=ok), "INVALID_ARGUMENT", "bad_shape"),
        "negative shape": (infer_bytes(model, shape=(-1, 1, 28, 28), raw=ok), "INVALID_ARGUMENT", "bad_shape"),
        "short raw": (infer_bytes(model, raw=ok[:100]), "INVALID_ARGUMENT", "bad_binary"),
        "too many images": (infer_bytes(model, shape=(100_000, 1, 28, 28), raw=ok), "INVALID_ARGUMENT",
                            "too_many_images"),
        "bad priority": (infer_bytes(model, raw=ok, priority="urgent"), "INVALID_ARGUMENT", "bad_priority"),
        "not an image": (infer_bytes(model, "image", "BYTES", (1,), raw=b"\x04\x00\x00\x00abcd"),
                         "INVALID_ARGUMENT", None),
        "not a protobuf": (b"\xff\xff\xff\xff garbage", "INVALID_ARGUMENT", "bad_message"),
        "no inputs": (pb.ModelInferRequest(model_name=model).SerializeToString(), "INVALID_ARGUMENT", "bad_request"),
    }
    for what, (body, status, code) in cases.items():
        got, details, trailing = call(t, "ModelInfer", body)
        assert got == status, (what, got, details)
        if code:
            assert trailing.get("cnnserve-code") == code, (what, trailing, details)
    # typed contents that do not match the shape, or hold values past 255
    for values, shape in (([1] * 100_000, (1, 1, 28, 28)), ([300] * 784, (1, 1, 28, 28))):
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="pixels", datatype="UINT8", shape=list(shape)).contents.uint_contents.extend(values)
        got, details, trailing = call(t, "ModelInfer", req.SerializeToString())
        assert (got, trailing.get("cnnserve-code")) == ("INVALID_ARGUMENT", "bad_data"), details
    # 100,000 BYTES elements (typed and raw) for a tensor of one: refused, cheaply
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b"x"] * 100_000)
    assert call(t, "ModelInfer", req.SerializeToString())[0] == "INVALID_ARGUMENT"
    raw = b"\x01\x00\x00\x00x" * 100_000
    assert call(t, "ModelInfer", infer_bytes(model, "image", "BYTES", (1,), raw=raw))[0] == "INVALID_ARGUMENT"
    assert call(t, "ModelInfer", infer_bytes(model, "image", "BYTES", (100_000,), raw=raw))[0] == "INVALID_ARGUMENT"
    # a message over max_request_mb (2 MB here): RESOURCE_EXHAUSTED before it is parsed
    got, details, _ = call(t, "ModelInfer", infer_bytes(model, raw=bytes(3 * 2**20)))
    assert got == "RESOURCE_EXHAUSTED", details
    # methods not served: UNIMPLEMENTED; the server is still fine after all this
    assert call(t, "ModelStreamInfer", b"")[0] == "UNIMPLEMENTED"
    assert call(t, "ServerLive", b"")[0] == "OK"


def test_hostile_messages_never_internal(srv, model):
    """Random bytes, truncated and mutated messages, wrong field types: every answer is a status a client
    can act on, never INTERNAL or UNKNOWN."""
    rng = np.random.default_rng(28)
    good = infer_bytes(model, raw=bytes(784))
    bodies = [rng.bytes(int(n)) for n in rng.integers(0, 4000, 40)]
    bodies += [good[:int(n)] for n in rng.integers(0, len(good), 30)]
    for _ in range(60):
        b = bytearray(good)
        for i in rng.integers(0, len(b), 4):
            b[int(i)] = int(rng.integers(0, 256))
        bodies.append(bytes(b))
    seen = {}
    for method in ("ModelInfer", "ModelMetadata", "ModelReady"):
        for body in bodies:
            got = call(srv.grpc_target, method, body)[0]
            seen[got] = seen.get(got, 0) + 1
            assert f"StatusCode.{got}" not in BAD, (method, body[:60], got)
    assert seen.get("INVALID_ARGUMENT", 0) > 0, seen


def test_health_reflection_and_metrics(srv, model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(srv.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {SERVICE, HEALTH_SERVICE} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe the service
    import urllib.request

    x = np.zeros((1, 1, 28, 28), np.uint8)  # one infer call each way
    t = th.InferInput("pixels", list(x.shape), "UINT8")
    t.set_data_from_numpy(x, binary_data=True)
    th.InferenceServerClient(srv.url.removeprefix("http://")).infer(model, [t])
    tg.InferenceServerClient(srv.grpc_target).infer(model, [pixels_input(x)])
    text = urllib.request.urlopen(srv.url + "/metrics", timeout=10).read().decode()
    assert 'protocol="grpc"' in text and "cnnserve_request_seconds" in text
    # the infer calls of both protocols in one histogram
    assert all(f'endpoint="ModelInfer",protocol="{p}"' in text for p in ("http", "grpc")), \
        [line for line in text.splitlines() if "cnnserve_request_seconds_count" in line]


def test_a_second_server_on_the_same_grpc_port_is_refused(srv, stored_default):
    """Workers share gRPC's port through SO_REUSEPORT, which any process of the same user may join: a second
    server given a port that a running one serves is refused at start, in one line, and the first keeps its
    gRPC; so is a gRPC port that is HTTP's too."""
    from grpc_health.v1 import health_pb2

    status, out, seconds = serve_until_exit("--arg", f"models={stored_default}", "--arg",
                                            f"grpc_port={srv.grpc_port}", cap_mb=CAP_MB)
    assert status == 1 and f"gRPC's port {srv.grpc_port} on 127.0.0.1 is taken" in out, out[-3000:]
    assert "Traceback" not in out and "Starting production" not in out, out[-3000:]  # before any worker
    assert health_of(srv.grpc_target) == health_pb2.HealthCheckResponse.SERVING
    port = free_port()
    status, out, seconds = serve_until_exit("--arg", f"models={stored_default}", "--arg", f"grpc_port={port}",
                                            port=port, cap_mb=CAP_MB)
    assert status == 1 and f"grpc_port {port} is HTTP's port too" in out, out[-3000:]
def test_sigterm_drains_grpc_calls_in_flight(stored_default, model, digits_test):
    """SIGTERM with gRPC clients calling: health goes NOT_SERVING, the calls in flight are answered, the
    server exits 0 within drain + grace."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    images, _ = digits_test
    s = Server("--arg", f"models={stored_default}", "--arg", "drain_s=1", "--arg", "grace_s=10")
    results: list[str] = []
    stop = threading.Event()

    def client() -> None:
        c = tg.InferenceServerClient(s.grpc_target)
        while not stop.is_set():
            try:
                c.infer(model, [pixels_input(images[:16])], client_timeout=20)
                results.append("ok")
            except InferenceServerException as e:
                results.append(e.status() or "error")
                if e.status() in ("StatusCode.UNAVAILABLE",):  # refused after the stop: not sent again
                    return

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for th_ in threads:
            th_.start()
        time.sleep(2)
        before = len(results)
        os.kill(s.proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        with grpc.insecure_channel(s.grpc_target) as ch:
            status = None
            for _ in range(100):
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError as e:  # stopped already: the drain window was missed
                    status = e.code().name
                if status != health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        code = s.proc.wait(60)
        took = time.monotonic() - t0
        stop.set()
        for th_ in threads:
            th_.join(30)
    finally:
        stop.set()
        s.stop()
    assert code == 0, s.output()
    assert before > 0 and results.count("ok") > before
    # every call either answered or refused before it ran (UNAVAILABLE once stopped): none failed mid-way
    assert set(results) <= {"ok", "StatusCode.UNAVAILABLE"}, (set(results), s.output())
    assert took < 1 + 10 + 15


def test_batch_scorer_grpc_engine_matches_http(srv, digits_test, tmp_path):
    """`cnnserve score --engine grpc` gives the http engine's rows (labels, indices, probabilities), and a
    file that is not an image gets its own error row."""
    import json

    from .conftest import run_cli

    images, _ = digits_test
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(24):
        (folder / f"{i:02d}.png").write_bytes(encode(images[i][0]))
    (folder / "broken.png").write_bytes(b"not an image")
    rows = {}
    for engine, url in (("http", srv.url), ("grpc", srv.grpc_target)):
        out = tmp_path / f"{engine}.jsonl"
        run_cli("score", str(folder), "--engine", engine, "--url", url, "--out", out, "--top-k", "3", check=True)
        rows[engine] = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["http"].keys() == rows["grpc"].keys() and len(rows["grpc"]) == 25
    for p, h in rows["http"].items():
        g = rows["grpc"][p]
        assert (g["labels"], g["indices"]) == (h["labels"], h["indices"]), p
        assert np.allclose(g["probabilities"], h["probabilities"], atol=1e-5), p
        assert bool(g["error"]) == bool(h["error"]) == p.endswith("broken.png"), (p, g["error"], h["error"])
