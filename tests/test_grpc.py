"""The Open Inference Protocol over gRPC (service/grpc_server.py) against a real `bentoml serve`, with Triton's
own clients: the same answers as HTTP, deadlines, refusals mapped to status codes (never INTERNAL or
UNKNOWN, whatever the input), health, reflection and the drain."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
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
    # answers over 50 KB refused: 256 images' top 10 as text for both outputs is about 150 KB, 16 images' is 10 KB
    s = Server("--arg", f"models={stored_default}", "--arg", "max_request_mb=2", "--arg", "grpc_max_answer_mb=0.05",
               memory_limit_mb=CAP_MB)
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
    # a call that ends without a message (a unary call always carries one; a hand-made client need not)
    for method in ("ModelInfer", "ServerLive"):
        with grpc.insecure_channel(t) as ch, pytest.raises(grpc.RpcError) as e:
            ch.stream_unary(path(method))(iter(()), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    with grpc.insecure_channel(t) as ch, pytest.raises(grpc.RpcError) as e:
        ch.stream_unary("/grpc.health.v1.Health/Check")(iter(()), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
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


def test_answers_are_bounded_by_what_the_request_asks(srv, model, digits_test):
    """An answer is built once per output, each output at most once, and never past ``grpc_max_answer_mb``:
    a request that names an output many times is refused (one named 2,000 times in a 0.7 MB request once got a
    513 MB answer and took its worker from 163 MB to 2.1 GB); one whose answer would pass the limit is refused
    with the reason before the answer is built, and the server answers the next request as before."""
    images, _ = digits_test

    def request(n: int, outputs: list[tuple[str, int]]) -> bytes:
        req = pb.ModelInferRequest(model_name=model, id="x")
        req.inputs.add(name="pixels", datatype="UINT8", shape=[n, 1, 28, 28])
        req.raw_input_contents.append(np.resize(images, (n, 1, 28, 28)).tobytes())
        for name, k in outputs:
            o = req.outputs.add(name=name)
            if k:
                o.parameters["classification"].int64_param = k
        return req.SerializeToString()

    got, details, trailing = call(srv.grpc_target, "ModelInfer", request(1, [("probabilities", 0)] * 2000))
    assert (got, trailing.get("cnnserve-code")) == ("INVALID_ARGUMENT", "duplicate_output"), details
    assert len(details) < 1000
    both_as_text = [("logits", 10), ("probabilities", 10)]
    got, details, trailing = call(srv.grpc_target, "ModelInfer", request(256, both_as_text))
    assert (got, trailing.get("cnnserve-code")) == ("INVALID_ARGUMENT", "answer_too_large"), details
    assert "grpc_max_answer_mb" in details, details
    with grpc.insecure_channel(srv.grpc_target) as ch:
        for n, outputs in ((16, both_as_text), (256, [])):
            raw = ch.unary_unary(path("ModelInfer"))(request(n, outputs), timeout=30)
            resp = pb.ModelInferResponse.FromString(raw)
            assert [list(o.shape) for o in resp.outputs] == ([[n, 10]] * 2)
            assert len(raw) <= n * 2 * 10 * 64 + 1024  # what n images can need, whatever was asked
    assert call(srv.grpc_target, "ServerReady", b"")[0] == "OK"


# -- HTTP/2 by hand: what a client that stalls, floods or never reads does to the server --------------------------

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 3, 4


class RawH2:
    """An HTTP/2 client written frame by frame (the project has no HTTP/2 library, and grpc's own client cannot
    stop half-way through a unary call's message or leave its answers unread): a connection that opens calls,
    sends what the server's flow control lets it send, and reads (acknowledging pings and, if ``reads``,
    opening its window for the answers) only when asked to."""

    def __init__(self, target: str, window: int = 65535, reads: bool = True) -> None:
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.reads, self.buf, self.next_id, self.eof, self.goaway = reads, b"", 1, False, None
        self.settings: dict[int, int] = {}
        self.conn_window, self.initial = 65535, 65535
        self.windows: dict[int, int] = {}
        self.ended: dict[int, str] = {}  # stream -> "trailers" or "reset"
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0, struct.pack(
            ">HIHI", 2, 0, INITIAL_WINDOW_SIZE, window)))

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.eof = True
            return False

    def pump(self, seconds: float = 0.0) -> None:
        """Read and handle what arrives within ``seconds``."""
        end = time.monotonic() + seconds
        while not self.eof:
            if not select.select([self.sock], [], [], max(0.0, end - time.monotonic()))[0]:
                return
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.buf += chunk
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                kind, flags, sid, payload = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big"), \
                    self.buf[9:9 + n]
                self.buf = self.buf[9 + n:]
                self.handle(kind, flags, sid & 0x7FFFFFFF, payload)
            if time.monotonic() >= end:
                return

    def handle(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & 1:
            for i in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[i:i + 6])
                self.settings[key] = value
                if key == INITIAL_WINDOW_SIZE:
                    self.windows = {s: w + value - self.initial for s, w in self.windows.items()}
                    self.initial = value
            self.send(frame(SETTINGS, 1, 0, b""))
        elif kind == WINDOW_UPDATE:
            grow = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += grow
            elif sid in self.windows:
                self.windows[sid] += grow
        elif kind == PING and not flags & 1:
            self.send(frame(PING, 1, 0, payload))
        elif kind == GOAWAY:
            self.goaway = int.from_bytes(payload[4:8], "big")
        elif kind == RST_STREAM:
            self.ended.setdefault(sid, "reset")
        elif kind == DATA and payload and self.reads:
            self.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload)))
                      + frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", len(payload))))
        if kind in (DATA, HEADERS) and flags & 1:
            self.ended.setdefault(sid, "trailers")

    def call(self, method: str) -> int:
        return self.call_path(path(method))

    def call_path(self, where: str) -> int:
        """A new call's headers (HPACK literals, nothing indexed or compressed); its stream id."""
        sid, self.next_id = self.next_id, self.next_id + 2
        block = b"".join(b"\x00" + hpack_length(len(k)) + k + hpack_length(len(v)) + v for k, v in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", where.encode()),
            (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
        self.windows[sid] = self.initial
        self.send(frame(HEADERS, 4, sid, block))
        return sid

    def push(self, sid: int, data: bytes, end: bool = False, patience: float = 1.0) -> int:
        """Send as much of ``data`` as the server's windows allow, waiting up to ``patience`` seconds for them
        to open; the bytes the server let through."""
        sent, idle = 0, time.monotonic()
        while sent < len(data) and sid not in self.ended and not self.eof:
            room = min(self.conn_window, self.windows[sid], self.settings.get(5, 16384), len(data) - sent)
            if room <= 0:
                if time.monotonic() - idle > patience:
                    break
                self.pump(0.05)
                continue
            last = end and sent + room == len(data)
            if not self.send(frame(DATA, 1 if last else 0, sid, data[sent:sent + room])):
                break
            sent, idle = sent + room, time.monotonic()
            self.conn_window -= room
            self.windows[sid] -= room
        return sent

    def close(self) -> None:
        self.sock.close()


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def hpack_length(n: int) -> bytes:
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append(n & 127 | 128)
        n >>= 7
    return bytes([*out, n])


def grpc_message(body: bytes, announced: int | None = None) -> bytes:
    """gRPC's framing of one message: uncompressed, its length (or ``announced``), the bytes."""
    return b"\x00" + struct.pack(">I", len(body) if announced is None else announced) + body


@pytest.fixture(scope="module")
def bounded_srv(stored_default):
    """gRPC's bounds made short enough to watch (two workers, 20 MB messages as by default)."""
    s = Server("--arg", f"models={stored_default}", "--arg", "workers=2", "--arg", "grpc_max_calls=4",
               "--arg", "grpc_max_streams=4", "--arg", "timeout_ms=10000", "--arg", "grace_s=2",
               "--arg", "grpc_keepalive_s=2", "--arg", "grpc_connection_age_s=6", memory_limit_mb=CAP_MB)
    yield s
    s.stop()


def settle(rss, limit_mb: float, seconds: float = 20) -> float:
    """The server's memory once it is at most ``limit_mb`` (polled for ``seconds``; freed pages go back to the
    system a few seconds after the calls that held them end); the last reading if it never gets there."""
    deadline = time.monotonic() + seconds
    while True:
        now = rss()
        if now <= limit_mb or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def test_unfinished_messages_are_bounded_and_dropped(bounded_srv, model):
    """10 connections x 5 calls, each sending all but the last byte of an 8 MB message (a review measured 10
    x 5 x 19 MB: 742 MB held, never closed, never given back): a connection carries at most
    ``grpc_max_streams`` calls (its fifth is refused by HTTP/2 itself), a worker reads at most
    ``grpc_max_calls`` messages at once (other calls are refused RESOURCE_EXHAUSTED after one 64 KB window,
    unread), every unfinished call ends DEADLINE_EXCEEDED once its deadline (``timeout_ms``) has passed, and
    the memory goes back. (The calls are all sent well within the 10 s deadline, which would let more in.)"""
    from tests.support.faults import tree_rss_mb

    rss = lambda: tree_rss_mb(bounded_srv.proc.pid)  # noqa: E731
    before = rss()
    conns = [RawH2(bounded_srv.grpc_target) for _ in range(10)]
    for c in conns:
        c.pump(0.3)
    assert conns[0].settings.get(MAX_CONCURRENT_STREAMS) == 4, conns[0].settings
    assert conns[0].settings.get(INITIAL_WINDOW_SIZE, 65535) <= 65535, conns[0].settings  # no BDP-grown window
    body = grpc_message(bytes(8 << 20))[:-1]
    accepted = [[c.push(c.call("ModelInfer"), body, patience=0.5) for _ in range(5)] for c in conns]
    checks = RawH2(bounded_srv.grpc_target)  # gRPC's own services read theirs within the deadline too
    checks.pump(0.3)
    for method in ("/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        checks.push(checks.call_path(method), grpc_message(b"\x0a", announced=1000))
    conns.append(checks)
    held = [n for per_conn in accepted for n in per_conn if n > 128 * 1024]
    peak = rss()
    assert len(held) <= 2 * 4, accepted  # two workers, 4 calls each
    assert peak - before < 2 * 4 * 8 * 2 + 200, (before, peak)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15 and not all(len(c.ended) == len(c.windows) or c.eof for c in conns):
        for c in conns:
            c.pump(0.05)
    took = time.monotonic() - t0
    assert all(len(c.ended) == len(c.windows) or c.eof for c in conns), [c.ended for c in conns]
    assert took < 10 + 5, took
    for c in conns:
        c.close()
    after = settle(rss, before + 60)
    assert after < before + 60, (before, peak, after)
    assert health_of(bounded_srv.grpc_target) == 1  # SERVING


def test_clients_that_never_read_are_closed(bounded_srv, model):
    """A client that stops reading its socket with answers pending (a review: 4 such calls held 1.2 GB for 60 s)
    is closed once a keepalive ping goes unanswered (``grpc_keepalive_s``, then as long again); one that reads
    and answers pings but never opens its window for the answers is asked to go away after
    ``grpc_connection_age_s`` and closed once no call of it is in flight, at most the grace (the longer of
    ``grace_s`` and ``timeout_ms``) later. Afterwards the workers answer as before."""
    request = infer_bytes(model, shape=(256, 1, 28, 28), raw=bytes(256 * 784))
    deaf = RawH2(bounded_srv.grpc_target, window=0, reads=False)
    deaf.pump(0.3)
    for _ in range(4):
        deaf.push(deaf.call("ModelInfer"), grpc_message(request), end=True)
    stubborn, born = RawH2(bounded_srv.grpc_target, window=0), time.monotonic()
    stubborn.pump(0.3)
    for _ in range(4):
        stubborn.push(stubborn.call("ModelInfer"), grpc_message(request), end=True)
    t0 = time.monotonic()
    deaf_closed = stubborn_closed = None
    while time.monotonic() - t0 < 20 and (deaf_closed is None or stubborn_closed is None):
        time.sleep(0.1)
        stubborn.pump(0.1)
        if stubborn.eof and stubborn_closed is None:
            stubborn_closed = time.monotonic() - born
        if deaf_closed is None and closed_by_peer(deaf.sock):
            deaf_closed = time.monotonic() - t0
    deaf.close()
    stubborn.close()
    assert deaf_closed is not None and deaf_closed < 2 + 2 + 3, deaf_closed
    assert stubborn.goaway is not None
    # GOAWAY at 6 s (+-10%: gRPC's jitter), then closed once no call is in flight, at most the grace (10 s) later
    assert stubborn_closed is not None and 6 * 0.9 < stubborn_closed < 6 * 1.1 + 10 + 3, stubborn_closed
    with grpc.insecure_channel(bounded_srv.grpc_target) as ch:
        for _ in range(4):
            ch.unary_unary(path("ModelInfer"))(request, timeout=30)


def test_calls_past_the_stream_limit_wait_in_the_client(bounded_srv, model):
    """A client with more calls than ``grpc_max_streams`` on one connection keeps the rest in its own queue and
    every call is answered: none is refused (gRPC's "overload protection" refused calls at the limit with
    REFUSED_STREAM, which the client reports as UNAVAILABLE)."""
    request = infer_bytes(model, raw=bytes(784))
    with grpc.insecure_channel(bounded_srv.grpc_target) as ch:
        infer = ch.unary_unary(path("ModelInfer"))
        for _ in range(3):
            calls = [infer.future(request, timeout=30) for _ in range(40)]
            assert [c.exception() for c in calls] == [None] * 40


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock``: what it sent before is read and dropped, then EOF or a reset."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(1 << 20):
                return True
        except OSError:
            return True
    return False


def test_health_reflection_and_metrics(srv, model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(srv.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
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
        deadline = time.monotonic() + 60
        while results.count("ok") < 2 * len(threads):  # the clients are calling: answers come back
            assert time.monotonic() < deadline and all(th_.is_alive() for th_ in threads), results
            time.sleep(0.05)
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
