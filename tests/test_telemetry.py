"""Request telemetry of a real server (service/telemetry.py): every answer's request id (HTTP's X-Request-ID, the
error bodies, the v2 body's id, gRPC's metadata), JSON log lines parsed one by one, and the OpenTelemetry spans a
small OTLP/HTTP receiver (tests/support/otlp.py, opentelemetry-proto) gets from a traced server.

Two servers of one worker each: one with JSON logs and every request traced, one with text access lines and
tracing_sample=0 (its receiver must get nothing)."""

from __future__ import annotations

import json
import os
import time

import grpc
import httpx
import numpy as np
import pytest

from tests.conftest import encode
from tests.support.otlp import Receiver
from tests.support.server import Server

DIGIT = encode(np.full((28, 28), 200, np.uint8))
PIXELS = np.zeros((1, 1, 28, 28), np.uint8)
SANE_ID = "client-id_0123.ABC:xyz"


def start(stored_default: str, receiver: Receiver, *args: str) -> Server:
    # the batch processor sends every 200 ms, not every 5 s, so the test need not wait
    old = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    try:
        return Server("--arg", f"models={stored_default}", "--arg", "workers=1",
                      "--arg", f"tracing_endpoint={receiver.endpoint}", *args)
    finally:
        if old is None:
            del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = old


@pytest.fixture(scope="module")
def traced(stored_default):
    """JSON logs, every request traced; its receiver."""
    receiver = Receiver()
    srv = start(stored_default, receiver, "--arg", "log_format=json", "--arg", "tracing_sample=1")
    yield srv, receiver
    srv.stop()
    receiver.close()


@pytest.fixture(scope="module")
def plain(stored_default):
    """Text access lines, tracing_sample=0 with a receiver all the same."""
    receiver = Receiver()
    srv = start(stored_default, receiver, "--arg", "access_log=true", "--arg", "tracing_sample=0")
    yield srv, receiver
    srv.stop()
    receiver.close()


def grpc_infer(target: str, metadata=(), model: str = "lenet5-digits"):
    """(answer or None, status code, initial metadata, trailing metadata) of one ModelInfer."""
    from cnnserve.core.grpc_proto import SERVICE, pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(PIXELS.shape))
    request.raw_input_contents.append(PIXELS.tobytes())
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        try:
            answer, call = infer.with_call(request, metadata=metadata, timeout=30)
            return answer, call.code(), dict(call.initial_metadata()), dict(call.trailing_metadata())
        except grpc.RpcError as e:
            return None, e.code(), dict(e.initial_metadata() or ()), dict(e.trailing_metadata() or ())


def server_lines(srv: Server) -> list[str]:
    srv.log.flush()
    with open(srv.log.name) as f:
        return [line for line in f.read().splitlines() if line.strip()]


def access_lines(srv: Server, wait_for: set[str], timeout: float = 10) -> dict[str, dict]:
    """The JSON access lines by request id, once those of ``wait_for`` are all written."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for line in server_lines(srv):
            if line.startswith("{"):
                doc = json.loads(line)
                if doc.get("log.logger") == "cnnserve.access":
                    found[doc["http.request.id"]] = doc
        if wait_for <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def spans_of(receiver: Receiver, trace_ids: set[str], n: int, timeout: float = 15) -> list[dict]:
    """The spans of these traces once there are ``n`` of them (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.snapshot() if s["trace_id"] in trace_ids]
        if len(spans) >= n or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


# -- ids and JSON logs ---------------------------------------------------------------------------------------------

def test_every_answer_carries_an_id_and_every_log_line_is_json(traced, stored_default):
    srv, _ = traced
    seen: dict[str, tuple] = {}  # request id -> (route, status) as the client saw it
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        ok = client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png", "X-Request-ID": SANE_ID})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == SANE_ID  # a sane id comes back as it was
        seen[SANE_ID] = ("/classify", 200)

        bad = client.post("/classify", content=b"not an image", headers={"Content-Type": "image/png"})
        assert bad.status_code in (400, 415)
        rid = bad.headers["x-request-id"]
        assert bad.json()["request_id"] == rid and len(rid) == 32  # made by the server, in the body too
        seen[rid] = ("/classify", bad.status_code)

        for insane in ("x" * 129, "a\tb", "quote\"d", "sp ace", "ü-nicode".encode()):
            r = client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png",
                                                                 "X-Request-ID": insane})
            assert r.status_code == 200 and r.headers["x-request-id"] not in (insane, "", "ü-nicode")
            assert len(r.headers["x-request-id"]) == 32
            seen[r.headers["x-request-id"]] = ("/classify", 200)

        lost = client.get("/no/such/route")  # BentoML's own router answers it: its JSON error carries the id too
        assert lost.status_code == 404 and lost.json()["request_id"] == lost.headers["x-request-id"]
        seen[lost.headers["x-request-id"]] = ("other", 404)

        batch = client.post("/classify/batch", files=[("images", ("a.png", DIGIT, "image/png"))])
        assert batch.status_code == 200
        seen[batch.headers["x-request-id"]] = ("/classify/batch", 200)

        body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
        v2 = client.post("/v2/models/lenet5-digits/infer", json=body)
        assert v2.status_code == 200 and v2.json()["id"] == v2.headers["x-request-id"]  # no id asked: the header's
        seen[v2.headers["x-request-id"]] = ("/v2/models/{name}/infer", 200)
        echoed = client.post("/v2/models/lenet5-digits/infer", json={**body, "id": "protocol-id"},
                             headers={"X-Request-ID": "header-id"})
        assert echoed.json()["id"] == "protocol-id" and echoed.headers["x-request-id"] == "header-id"
        seen["header-id"] = ("/v2/models/{name}/infer", 200)

    answer, code, initial, _ = grpc_infer(srv.grpc_target, metadata=(("x-request-id", "grpc-id-1"),))
    assert code == grpc.StatusCode.OK and answer.outputs and initial["x-request-id"] == "grpc-id-1"
    _, code, initial, trailing = grpc_infer(srv.grpc_target, model="no-such-model")
    assert code == grpc.StatusCode.NOT_FOUND
    assert trailing["x-request-id"] == initial["x-request-id"] and len(initial["x-request-id"]) == 32
    grpc_seen = {"grpc-id-1": "OK", initial["x-request-id"]: "NOT_FOUND"}

    lines = access_lines(srv, set(seen) | set(grpc_seen))
    assert set(seen) | set(grpc_seen) <= lines.keys(), f"missing access lines: {set(seen) - lines.keys()}"
    for rid, (route, status) in seen.items():
        line = lines[rid]
        assert line["http.route"] == route and line["http.response.status_code"] == status, line
        assert line["client.address"] == "127.0.0.1" and line["event.duration"] > 0 and line["@timestamp"]
    ok_line = lines[SANE_ID]
    assert ok_line["cnnserve.model"] == "lenet5-digits" and ok_line["cnnserve.model_version"]
    assert ok_line["cnnserve.batch_size"] >= 1 and ok_line["log.level"] == "INFO"
    for stage in ("read", "decode", "queue", "inference", "respond", "total"):
        assert ok_line[f"cnnserve.stage_ms.{stage}"] >= 0, stage
    assert lines[rid_of(seen, 400, 415)]["error.code"] == "not_an_image"
    for stage in ("decode", "queue", "inference", "respond"):  # stages from the batcher's marks where no timings
        assert lines["header-id"][f"cnnserve.stage_ms.{stage}"] >= 0, stage
    assert lines["grpc-id-1"]["rpc.grpc.status_code"] == "OK" and lines["grpc-id-1"]["cnnserve.batch_size"] >= 1
    assert lines[initial["x-request-id"]]["error.code"] == "unknown_model"
    assert lines[initial["x-request-id"]]["rpc.grpc.status_code"] == "NOT_FOUND"

    # every line the server wrote, its start-up and BentoML's own included, is one JSON object
    text = [line for line in server_lines(srv) if not line.startswith("{")]
    assert not text, text[:5]
    docs = [json.loads(line) for line in server_lines(srv)]
    assert all("@timestamp" in d and "log.level" in d and "message" in d for d in docs)
    assert any("Service cnnserve initialized" in d["message"] for d in docs)  # BentoML's line, as JSON


def rid_of(seen: dict, *statuses: int) -> str:
    return next(rid for rid, (_, status) in seen.items() if status in statuses)


#: Every field of a JSON access line of a /classify answer from a traced server (docs/observability.md lists them)
CLASSIFY_FIELDS = {"@timestamp", "log.level", "log.logger", "process.pid", "message", "http.request.id",
                   "network.protocol", "http.request.method", "url.path", "http.route", "client.address",
                   "event.duration", "cnnserve.latency_ms", "http.response.status_code", "cnnserve.model",
                   "cnnserve.model_version", "cnnserve.batch_size", "trace.id", "span.id",
                   *(f"cnnserve.stage_ms.{stage}" for stage in ("read", "decode", "resize", "thread", "queue",
                                                                "inference", "respond", "total"))}


def test_a_json_access_line_has_every_field_and_escapes_what_clients_send(traced):
    """The JSON access lines are written as text, not through a JSON encoder (telemetry.Telemetry._log): every field
    is there under its name, with a value of its type, and what a client chose (an id, a path with a quote, a
    backslash, a new line and a non-ASCII letter) comes back as it was sent, the line one line of JSON."""
    import datetime
    import re

    srv, _ = traced
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        ok = client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png", "X-Request-ID": "fields"})
        hostile = client.get("/no%22such%5Cpath%0A%C3%A9", headers={"X-Request-ID": "hostile-path"})
    assert ok.status_code == 200 and hostile.status_code == 404
    lines = access_lines(srv, {"fields", "hostile-path"})
    line = lines["fields"]
    assert set(line) == CLASSIFY_FIELDS, set(line) ^ CLASSIFY_FIELDS
    stamp = datetime.datetime.fromisoformat(line["@timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0) and abs(time.time() - stamp.timestamp()) < 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", line["@timestamp"])
    assert (line["log.level"], line["log.logger"]) == ("INFO", "cnnserve.access")
    assert type(line["process.pid"]) is int and line["process.pid"] > 1
    assert (line["http.request.id"], line["network.protocol"], line["http.request.method"]) == ("fields", "http",
                                                                                                 "POST")
    assert line["url.path"] == line["http.route"] == "/classify" and line["client.address"] == "127.0.0.1"
    assert line["http.response.status_code"] == 200 and line["cnnserve.model"] == "lenet5-digits"
    assert type(line["cnnserve.model_version"]) is str and line["cnnserve.model_version"]
    assert type(line["event.duration"]) is int and type(line["cnnserve.latency_ms"]) is float
    # one duration, in ns and in ms rounded to 3 decimals, and the message's ms to 1
    assert abs(line["event.duration"] / 1e6 - line["cnnserve.latency_ms"]) <= 0.0005 + 1e-9, line
    assert line["message"] == f"POST /classify 200 {line['event.duration'] / 1e6:.1f} ms"
    for key in CLASSIFY_FIELDS:
        if key.startswith("cnnserve.stage_ms."):
            assert type(line[key]) is float and line[key] >= 0 and round(line[key], 3) == line[key], key
    assert line["cnnserve.stage_ms.total"] <= line["cnnserve.latency_ms"]
    assert type(line["cnnserve.batch_size"]) is int and line["cnnserve.batch_size"] >= 1
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace.id"]) and re.fullmatch(r"[0-9a-f]{16}", line["span.id"])

    bad = lines["hostile-path"]
    assert bad["url.path"] == "/no\"such\\path\n\u00e9" and bad["http.route"] == "other"
    assert bad["message"].startswith("GET /no\"such\\path\n\u00e9 404 ")
    assert bad["http.response.status_code"] == 404 and "cnnserve.model" not in bad
    raw = [x for x in server_lines(srv) if '"hostile-path"' in x]
    assert len(raw) == 1 and raw[0].isascii(), raw  # one line, as the JSON encoder writes it (ASCII)


def test_json_lines_are_what_the_json_encoder_writes(capsys):
    """In one process, records whose every string needs escaping: each line is ASCII and parses to its fields in
    their order, milliseconds written with three decimals (``0.040``: JSON's number for 0.04), for HTTP and gRPC,
    with and without stage timings, a model, a refusal's code, an API key and a trace."""
    import random

    from cnnserve.service.telemetry import RequestRecord, Telemetry

    class Model:
        name, version = 'digits "é"', "2\\b"

    class Call:
        model = Model()

    hostile = ['/a"b\\c', "/\u2028\x00\x1f\x7f", "/ü/" + "x" * 300, "/\ud800"]
    telemetry = Telemetry(access_log=True, log_format="json")  # no event loop here: each line written at once
    rng = random.Random(7)
    for i in range(200):
        protocol = "grpc" if i % 3 == 0 else "http"
        record = RequestRecord(f"id-{i}", time.perf_counter() - rng.random() / 10, protocol,
                               rng.choice(["POST", 'G"T']), rng.choice(hostile), rng.choice([None, "::1", 'c"l']))
        record.status = rng.choice(["OK", 'NOT"FOUND']) if protocol == "grpc" else rng.choice([200, 404, 0])
        record.code, record.api_key = rng.choice([None, 'q"uote\n']), rng.choice([None, "", "ké\\y"])
        record.call = Call() if i % 2 else None
        if i % 4 < 2:  # /classify's timings: values that end in zeros (4.000 ms is 4.0) and that do not
            record.timings = {"read": 0.004, "decode": 0.0, "queue": 0.0012345, "total": rng.random() / 10}
        else:
            now = record.start
            record.marks = {"read": now, "queued": now + 0.001, "started": now + 0.0025, "run": now + 0.003,
                            "ran": now + rng.random() / 100, "batch": rng.randint(1, 64)}
        trace_ids = ("a" * 32, "b" * 16) if i % 5 == 0 else None
        end = time.perf_counter()
        telemetry._log(record, end, trace_ids)
        line = capsys.readouterr().out
        assert line.endswith("\n") and line.count("\n") == 1, line
        fields = json.loads(line)
        expected = expected_fields(telemetry, record, end, trace_ids, fields["@timestamp"])
        assert list(fields) == list(expected) and fields == expected, (line, expected)
        assert line.isascii(), line  # every string escaped as the encoder does by default
        for key in ("cnnserve.latency_ms", *(k for k in fields if k.startswith("cnnserve.stage_ms."))):
            assert len(line.split(f'"{key}":', 1)[1].split(",", 1)[0].split("}", 1)[0].split(".")[1]) == 3, key


def expected_fields(telemetry, record, end: float, trace_ids, stamp: str) -> dict:
    """A JSON access line's fields as docs/observability.md describes them, made the slow way (a dict)."""
    ms = (end - record.start) * 1000
    path = record.path[:200]
    fields = {"@timestamp": stamp, "log.level": "INFO", "log.logger": "cnnserve.access", "process.pid": os.getpid(),
              "message": f"{record.method} {path} {record.status} {ms:.1f} ms", "http.request.id": record.id,
              "network.protocol": record.protocol, "http.request.method": record.method, "url.path": path,
              # no route table here: a path is its own route (not cut to 200 characters)
              "http.route": record.path, "client.address": record.client,
              "event.duration": int((end - record.start) * 1e9),
              "cnnserve.latency_ms": round(ms, 3),
              "rpc.grpc.status_code" if record.protocol == "grpc" else "http.response.status_code": record.status}
    if record.call is not None:
        fields["cnnserve.model"], fields["cnnserve.model_version"] = record.call.model.name, record.call.model.version
    if record.timings:
        stages = {stage: (0.0, seconds) for stage, seconds in record.timings.items()}
    else:
        m = record.marks
        stages = {"decode": (m["read"], m["queued"]), "queue": (m["queued"], m["started"]),
                  "inference": (m["run"], m["ran"]), "respond": (m["ran"], end)}
    for stage, (a, b) in stages.items():
        fields[f"cnnserve.stage_ms.{stage}"] = round((b - a) * 1000, 3)
    if record.marks and "batch" in record.marks:
        fields["cnnserve.batch_size"] = record.marks["batch"]
    if record.code:
        fields["error.code"] = record.code
    if record.api_key:
        fields["cnnserve.api_key"] = record.api_key
    if trace_ids:
        fields["trace.id"], fields["span.id"] = trace_ids
    return fields


def test_text_access_lines_name_the_request_id(plain):
    srv, _ = plain
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png", "X-Request-ID": SANE_ID})
    assert r.status_code == 200 and r.headers["x-request-id"] == SANE_ID
    deadline = time.monotonic() + 10
    while not any(f"POST /classify 200" in line and f"id={SANE_ID}" in line for line in server_lines(srv)):
        assert time.monotonic() < deadline, server_lines(srv)[-5:]
        time.sleep(0.2)


def test_a_refused_head_has_an_id_too(plain):
    """A head too large is refused before any route runs (http_server.GuardedHttpTools): its 431 names an id too."""
    import socket

    srv, _ = plain
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
        answer = b""
        while b"}" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    rid = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-request-id"))
    assert json.loads(body)["request_id"] == rid.decode() and len(rid) == 32


# -- traces --------------------------------------------------------------------------------------------------------

def test_a_traced_request_has_its_stages_under_its_span(traced):
    srv, receiver = traced
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        r = client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png", "X-Request-ID": "traced-1"})
        joined = client.post("/classify", content=DIGIT, headers={
            "Content-Type": "image/png", "traceparent": f"00-{parent_trace}-{parent_span}-01"})
        declined = client.post("/classify", content=DIGIT, headers={
            "Content-Type": "image/png", "traceparent": f"00-{'1' * 32}-{'2' * 16}-00"})
    assert r.status_code == joined.status_code == declined.status_code == 200
    lines = access_lines(srv, {"traced-1", joined.headers["x-request-id"], declined.headers["x-request-id"]})
    trace_id = lines["traced-1"]["trace.id"]  # the access line names the request's trace
    assert "trace.id" not in lines[declined.headers["x-request-id"]]  # its parent said not sampled

    spans = spans_of(receiver, {trace_id, parent_trace}, 10)
    mine = [s for s in spans if s["trace_id"] == trace_id]
    root = next(s for s in mine if s["parent_id"] == "")
    assert root["name"] == "POST /classify" and root["kind"] == 2  # SERVER
    assert root["attributes"]["cnnserve.request_id"] == "traced-1"
    assert root["attributes"]["http.response.status_code"] == 200
    assert root["attributes"]["cnnserve.model"] == "lenet5-digits"
    assert root["resource"]["service.name"] == "cnnserve"
    children = {s["name"]: s for s in mine if s["parent_id"] == root["span_id"]}
    assert set(children) == {"decode", "queue", "inference", "respond"}, mine
    order = [children[n] for n in ("decode", "queue", "inference", "respond")]
    for a, b in zip(order, order[1:]):  # one after the other, within the request's span
        assert a["end"] <= b["start"] + 1000, (a, b)  # (a microsecond of rounding)
    assert root["start"] <= order[0]["start"] and order[-1]["end"] <= root["end"]
    assert children["inference"]["attributes"]["cnnserve.batch_size"] >= 1

    other = [s for s in spans if s["trace_id"] == parent_trace]  # a client's sampled trace is joined
    other_root = next(s for s in other if s["attributes"].get("cnnserve.request_id"))
    assert other_root["parent_id"] == parent_span and len(other) == 5
    assert not [s for s in receiver.snapshot() if s["trace_id"] == "1" * 32]


def test_grpc_and_v2_calls_are_traced_with_their_batches(traced):
    srv, receiver = traced
    _, code, initial, _ = grpc_infer(srv.grpc_target, metadata=(("x-request-id", "grpc-traced"),))
    assert code == grpc.StatusCode.OK
    lines = access_lines(srv, {"grpc-traced"})
    spans = spans_of(receiver, {lines["grpc-traced"]["trace.id"]}, 5)
    root = next(s for s in spans if s["parent_id"] == "")
    assert root["name"] == "inference.GRPCInferenceService/ModelInfer" and root["attributes"]["rpc.system"] == "grpc"
    assert {s["name"] for s in spans if s["parent_id"] == root["span_id"]} == {"decode", "queue", "inference",
                                                                               "respond"}


def test_sample_zero_exports_nothing(plain):
    srv, receiver = plain
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for _ in range(20):
            assert client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png"}).status_code == 200
        # a client's sampled trace is not joined either: no tracer at all
        client.post("/classify", content=DIGIT, headers={"Content-Type": "image/png",
                                                         "traceparent": f"00-{'3' * 32}-{'4' * 16}-01"})
    assert grpc_infer(srv.grpc_target)[1] == grpc.StatusCode.OK
    time.sleep(1.0)  # five of the batch processor's periods
    assert receiver.posts == 0 and receiver.count == 0
