"""Hostile input, overload and faults: every case that once cost gigabytes, froze a worker,
answered 500 or lost rows, each against the real thing. Anything that could allocate without
bound runs in a process with an address-space cap (RLIMIT_AS), so a regression fails the test
instead of exhausting the machine."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import numpy as np
import onnx
import pytest

from cnnserve.service.batching import ClientGone, DeadlineExceeded, MicroBatcher
from tests.conftest import ROOT, Server, encode, serve_until_exit
from tests.support import faults, hostile

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process: a BentoML worker with onnxruntime maps about 2 GB of address space


def run_capped(code: str, megabytes: int = 3072, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh Python with its address space capped; it prints one JSON line last."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({megabytes} << 20, {megabytes} << 20))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"capped process failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_until(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass (fails,
    saying ``what`` never happened)."""
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(every)
    return got


async def until(predicate, timeout: float, what: str) -> None:
    """``wait_until`` on the event loop: yields to it between polls."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.001)


# --- in-process, under a memory cap -------------------------------------------------------------

def test_hostile_images_refused_from_their_headers_under_a_memory_cap():
    """Each hostile image gets its 4xx from the header or the byte structure, for a stretch and a
    centre-crop model, in a process capped at 1.5 GB (several once took 3-20 GB)."""
    out = run_capped("""
import json
from tests.support import hostile
from cnnserve.core.spec import ModelSpec
from cnnserve.core.preprocess import ImageError, preprocess
specs = [ModelSpec("lenet5", 1, 28, 28, (0.5,), (0.5,), labels=tuple("0123456789")),
         ModelSpec("mobilenet_v1", 3, 224, 224, (0.5,) * 3, (0.5,) * 3, resize="center-crop", labels=("a", "b"))]
got = {}
for name, (data, _, _) in hostile.images().items():
    for spec in specs:
        try:
            preprocess(data, spec)
            got[f"{name} / {spec.resize}"] = "accepted"
        except ImageError as e:
            got[f"{name} / {spec.resize}"] = [e.status, e.code]
print(json.dumps(got))
""", megabytes=1536)
    expected = {f"{name} / {resize}": [status, code] for name, (_, status, code) in hostile.images().items()
                for resize in ("stretch", "center-crop")}
    assert out == expected


def test_rejected_images_hold_no_memory(default_onnx):
    """200 images that allocate 18 MB each and then fail (truncated half-way) through the service's
    own decode path, with the garbage collector frozen as in the server: memory and live objects
    stay flat (they grew without bound while tracebacks kept the buffers)."""
    out = run_capped("""
import asyncio, gc, json, resource
from tests.support import hostile
from cnnserve.core.config import Settings
from cnnserve.core.runtime import load_model
from cnnserve.service.engine import Engine
from cnnserve.service.errors import APIError
from cnnserve.service.memory import return_freed_memory

model = load_model(%r, providers="cpu")
# decoded here, as a decoding process (a long-lived one) decodes: what one rejection leaves, every one does
engine = Engine([model], Settings(inline_decode_bytes=1 << 30, inline_decode_pixels=1 << 30))
return_freed_memory()
bad = hostile.truncated_png()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

async def reject(n):
    for _ in range(n):
        try:
            await engine.decode(model, bad)
        except APIError as e:
            assert e.code == "truncated", e.code
            e.__traceback__ = e.__context__ = None  # what the API's error handler does

async def main():
    await reject(20)
    before, objects = rss(), len(gc.get_objects())
    await reject(200)
    return {"before": before, "after": rss(), "objects": len(gc.get_objects()) - objects}

gc.collect(); gc.freeze()
print(json.dumps(asyncio.run(main())))
""" % str(default_onnx), megabytes=2048)
    assert out["after"] - out["before"] < 60, out  # 200 x 18 MB = 3.6 GB if any were kept
    assert out["objects"] < 500, out


# --- the batcher: deadlines, priorities, clients that left ---------------------------------------

def test_batcher_runs_interactive_first_and_never_runs_expired_or_abandoned_requests():
    import threading

    gate, seen = threading.Event(), []

    def fn(x):
        gate.wait(5)
        seen.append([int(v) for v in x[:, 0]])
        return x.astype(np.float32)

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_queue=100, max_wait_ms=0, fixed_slice=4)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(b.submit(np.array([[0]], np.uint8)))  # holds the model
        await asyncio.sleep(0.05)
        gone = loop.create_future()
        bulk = [asyncio.create_task(b.submit(np.array([[10 + i]], np.uint8), priority="bulk")) for i in range(3)]
        inter = [asyncio.create_task(b.submit(np.array([[20 + i]], np.uint8))) for i in range(3)]
        left = asyncio.create_task(b.submit(np.array([[30]], np.uint8), gone=gone))
        late = asyncio.create_task(b.submit(np.array([[40]], np.uint8), deadline=time.perf_counter() + 0.05))
        await asyncio.sleep(0.01)
        gone.set_result({"type": "http.disconnect"})  # its client went away while it waited
        expired = await asyncio.gather(late, return_exceptions=True)  # answered at its deadline, queue still held
        gate.set()
        await asyncio.gather(first, *bulk, *inter)
        abandoned = await asyncio.gather(left, return_exceptions=True)
        b.close()
        return expired[0], abandoned[0]

    expired, abandoned = asyncio.run(main())
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(abandoned, ClientGone)
    assert seen[0] == [0]
    assert seen[1] == [20, 21, 22, 10]  # interactive first, bulk takes the room left
    assert seen[2] == [11, 12]
    assert all(v not in sum(seen, []) for v in (30, 40))  # never run


def test_bulk_work_runs_a_slice_at_a_time_and_interactive_requests_get_in_between():
    """An explanation's 10 copies at bulk priority, a CAM pass (another job), and interactive requests
    arriving while the bulk work runs: every batch carries at most one slice (3 images) of bulk work, every
    interactive request waits for at most the batch running when it arrived, the CAM pass gets a batch of
    its own, and each request gets its own rows back in order."""
    import threading

    batches, arrivals = [], []

    def fn(x):
        batches.append(("run", [int(v) for v in x[:, 0]], time.perf_counter()))
        time.sleep(0.02)
        return x.astype(np.float32) * 10

    def cam(x):
        batches.append(("cam", [int(v) for v in x[:, 0]], time.perf_counter()))
        return [x.astype(np.float32), -x.astype(np.float32)]

    async def main():
        b = MicroBatcher(fn, max_batch_size=8, max_queue=100, max_wait_ms=0, fixed_slice=3)
        explanation = asyncio.create_task(b.submit(np.arange(100, 110, dtype=np.uint8)[:, None], priority="bulk"))
        cam_pass = asyncio.create_task(b.submit(np.array([[7]], np.uint8), priority="bulk", job=cam))
        await until(lambda: batches, 5, "the first slice runs")
        interactive = []
        for i in range(3):  # each arrives while a batch of bulk work runs, and the next arrives once one more began
            started = len(batches)
            arrivals.append(time.perf_counter())
            interactive.append(asyncio.create_task(b.submit(np.array([[i]], np.uint8))))
            await until(lambda: len(batches) > started, 5, f"a batch after interactive request {i} arrived")
        out = await asyncio.gather(explanation, cam_pass, *interactive)
        b.close()
        return out

    explanation, cam_pass, *interactive = asyncio.run(main())
    assert explanation[:, 0].tolist() == [v * 10 for v in range(100, 110)]  # all its rows, in order
    assert [a.tolist() for a in cam_pass] == [[[7.0]], [[-7.0]]]
    assert [r.tolist() for r in interactive] == [[[0.0]], [[10.0]], [[20.0]]]
    bulk = [[v for v in values if v >= 100] for kind, values, _ in batches if kind == "run"]
    assert all(len(v) <= 3 for v in bulk) and sum(map(len, bulk)) == 10, batches
    assert [values for kind, values, _ in batches if kind == "cam"] == [[7]]
    for i, t in enumerate(arrivals):  # each waited for at most the batch running (or just taken) when it came
        after = [values for _, values, started in batches if started > t]
        assert i in sum(after[:2], []), (i, batches)  # (the last may arrive as the last batch but one starts)


def test_bulk_requests_take_at_most_half_the_queue():
    import threading

    from cnnserve.service.batching import Overloaded

    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return x.astype(np.float32)

    async def main():
        b = MicroBatcher(fn, max_batch_size=1, max_queue=4, max_wait_ms=0, fixed_slice=1)
        one = np.zeros((1, 1), np.uint8)
        running = asyncio.create_task(b.submit(one))
        await asyncio.sleep(0.05)  # the model is busy with it; everything else waits
        tasks = [asyncio.create_task(b.submit(one, priority=p)) for p in ("bulk", "bulk", "bulk", "interactive",
                                                                           "interactive")]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(running, *tasks, return_exceptions=True)
        b.close()
        return ["Overloaded" if isinstance(r, Overloaded) else "ok" for r in results[1:]]

    assert asyncio.run(main()) == ["ok", "ok", "Overloaded", "ok", "ok"]


# --- a real server, capped ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def center_crop_tag(default_onnx, tmp_path_factory):
    """The default model re-labelled as a 28-px centre-crop model (same graph, other resize policy)."""
    from cnnserve.core.onnxmeta import KEY_SPEC
    from cnnserve.core.spec import ModelSpec
    from cnnserve.export.store import store_model

    m = onnx.load(str(default_onnx))
    prop = next(p for p in m.metadata_props if p.key == KEY_SPEC)
    prop.value = replace(ModelSpec.from_json(prop.value), resize="center-crop").to_json()
    path = tmp_path_factory.mktemp("cc") / "model.onnx"
    onnx.save(m, str(path))
    return str(store_model(path, "lenet5-centercrop").tag)


@pytest.fixture(scope="module")
def capped_server(stored_default, center_crop_tag):
    srv = Server("--arg", f"models={stored_default} {center_crop_tag}", "--arg", "body_timeout_s=1",
                 "--arg", "header_timeout_s=2", memory_limit_mb=CAP_MB)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(capped_server):
    with httpx.Client(base_url=capped_server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("model", ["lenet5-digits", "lenet5-centercrop"])
def test_hostile_images_over_http(client, model):
    for name, (data, status, code) in hostile.images().items():
        r = client.post("/classify", params={"model": model}, content=data,
                        headers={"Content-Type": "application/octet-stream"})
        assert (r.status_code, r.json()["code"]) == (status, code), name
    assert client.get("/readyz").status_code == 200


def test_v2_bodies_that_once_answered_500(client):
    for name, (body, status, code) in hostile.v2_bodies([1, 1, 28, 28]).items():
        r = client.post("/v2/models/lenet5-digits/infer", content=body,
                        headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json().get("code")) == (status, code), (name, r.text[:200])
    r = client.post("/v2/models/lenet5-digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "\xb2".encode("latin-1")})
    assert r.status_code == 400


def test_worker_memory_stays_flat_over_rejections(capped_server, client):
    """400 rejected uploads that each allocate 18 MB before failing: the workers give it back."""
    bad = hostile.truncated_png()
    for _ in range(40):
        client.post("/classify", content=bad, headers={"Content-Type": "image/png"})
    before = faults.tree_rss_mb(capped_server.proc.pid)
    for _ in range(400):
        r = client.post("/classify", content=bad, headers={"Content-Type": "image/png"})
        assert r.status_code == 400
    after = faults.tree_rss_mb(capped_server.proc.pid)
    assert after - before < 150, (before, after)  # 400 x 18 MB = 7 GB if kept


def raw(port: int, data: bytes, wait: float = 8.0) -> bytes:
    """Send raw bytes on a new connection, keep it open, and return what the server answers."""
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def test_a_body_that_keeps_arriving_is_read_past_the_idle_timeout(capped_server, digits_test):
    """``body_timeout_s`` (1 s here) bounds the silence between a body's bytes, not the whole body: a PNG sent in six
    pieces 0.3 s apart (1.5 s in all) is classified."""
    png = encode(digits_test[0][0][0])
    head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(png))
    pieces = [png[i * len(png) // 6:(i + 1) * len(png) // 6] for i in range(6)]
    with socket.create_connection(("127.0.0.1", capped_server.port), timeout=30) as s:
        s.sendall(head)
        for piece in pieces:
            time.sleep(0.3)
            s.sendall(piece)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_incomplete_bodies_and_heads_get_a_prompt_4xx(capped_server):
    port = capped_server.port
    answer = raw(port, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                 + b"\x89PNG" + b"\0" * 122)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:300]  # not BentoML's 504
    answer = raw(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    answer = raw(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")  # the head never ends
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert httpx.get(capped_server.url + "/readyz").status_code == 200


def test_disconnect_mid_body_is_one_info_line(capped_server):
    s = socket.create_connection(("127.0.0.1", capped_server.port))
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
              + b"\0" * 100)
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 10
    while "client disconnected" not in capped_server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = capped_server.output()
    assert "client disconnected" in log
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_deadline_and_priority_parameters(client, digits_test):
    png = encode(digits_test[0][0][0])
    headers = {"Content-Type": "image/png"}
    r = client.post("/classify", content=png, headers=headers, params={"timeout_ms": 0.001})
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded"
    r = client.post("/classify", content=png, headers=headers, params={"timeout_ms": 5000, "priority": "bulk"})
    assert r.status_code == 200
    for params in ({"timeout_ms": -1}, {"priority": "urgent"}):
        r = client.post("/classify", content=png, headers=headers, params=params)
        assert r.status_code == 400, params


def fuzz(url: str, doc: dict, max_examples: int, headers: dict | None = None, real: dict | None = None,
         paths: set | None = None) -> tuple[list[str], list]:
    """schemathesis cases for every operation of ``doc`` (those of ``paths`` only, when given), valid ones and
    ones that break the schema, sent to ``url``. ``real``: path parameter -> values that exist (model names,
    their versions), which the parameter takes in some of the cases (the rest are made up). Returns the
    operations checked and, for every answer that is wrong, the request and the answer: a 5xx (but the 504 a
    client asks for with its own timeout_ms), or a 4xx whose body is not the service's JSON ``{"error",
    "code"}``. Every case runs: no shrinking, all failures listed."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_dict(doc)
    checked, failures = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        if paths is not None and op.path not in paths:
            continue
        chosen = st.fixed_dictionaries({k: st.sampled_from([None, *v]) for k, v in (real or {}).items()
                                        if "{%s}" % k in op.path})
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode), values=chosen)
            def check(case, values):
                values = {k: v for k, v in values.items() if v is not None}
                if values:
                    case.path_parameters = {**(case.path_parameters or {}), **values}
                r = case.call(base_url=url, headers=headers, timeout=60)
                problem = wrong_answer(case, r)
                if problem:
                    failures.append((case.method, case.formatted_path, case.query, short_body(case.body),
                                     r.status_code, problem))

            try:
                check()
            except Unsatisfiable:  # nothing in the operation's schema to break (no parameters, no body)
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.path
        checked.append(f"{op.method.upper()} {op.path}")
    return checked, failures


def wrong_answer(case, r) -> str | None:
    try:
        body = r.json()
    except ValueError:
        body = None
    # the one 5xx a client may ask for: a deadline of its own choosing (timeout_ms) that passed
    asked = (r.status_code == 504 and "timeout_ms" in (case.query or {}) and isinstance(body, dict)
             and body.get("code") == "deadline_exceeded")
    if r.status_code >= 500 and not asked:
        return r.text[:300]
    if 400 <= r.status_code < 500 and not (isinstance(body, dict) and {"error", "code"} <= set(body)):
        return f"a {r.status_code} that is not the service's JSON error: {r.headers.get('content-type')} {r.text[:200]}"
    return None


def short_body(body) -> str:
    text = repr(body)
    return text if len(text) <= 200 else text[:197] + "..."


def declared_routes() -> set[str]:
    """Every route the service declares (the routers of api.py, triton.py, kserve.py, repository.py, rollout_api.py)
    that its OpenAPI document lists."""
    from cnnserve.service import api, kserve, repository, rollout_api, triton

    routes = [r for router in (api.router, triton.router, kserve.router, repository.router, rollout_api.router)
              for r in router.routes]
    hidden = {r.path for r in routes if not r.include_in_schema}
    assert hidden == {"/demo"}, hidden  # the demo page's redirect; the page itself is static files
    return {f"{method} {r.path}" for r in routes if r.path not in hidden for method in r.methods}


def test_fuzzed_from_the_openapi_document(capped_server, client):
    """schemathesis generates requests for every operation of /docs.json, valid ones and ones that break the
    schema: never a 5xx (but the 504 a client asks for with its own timeout_ms), every 4xx the service's JSON
    ``{"error", "code"}``, and the server stays ready with bounded memory. Every route the service declares is
    in the document, BentoML's own too. Model control is off here (403): the next test fuzzes it on."""
    doc = client.get("/docs.json").json()
    loaded = client.get("/models").json()["loaded"]
    checked, failures = fuzz(capped_server.url, doc, max_examples=12,
                             real={"name": tuple(loaded), "version": tuple(sum(loaded.values(), []))})
    assert not failures, "\n".join(map(str, failures[:20]))
    assert declared_routes() <= set(checked), declared_routes() - set(checked)
    assert {"GET /readyz", "GET /livez", "GET /metrics"} <= set(checked)
    assert client.get("/readyz").status_code == 200
    assert faults.tree_rss_mb(capped_server.proc.pid) < 4096


def test_fuzzed_model_repository_with_and_without_the_token(default_onnx, stored_default, tmp_path):
    """The model repository's routes (index, load, unload, and a rollout's canary, shadow, promote and rollback)
    fuzzed on a server with model control on, without the token (403 each) and with it, the cases naming real
    models too: loads, unloads, canaries and shadows happen, a served set is never emptied (the server refuses the
    last unload itself), and every answer is right as above."""
    from cnnserve.export.store import store_model

    second = str(store_model(default_onnx, "digits-fuzz").tag)
    token = tmp_path / "token"
    token.write_text("fuzz-token\n")
    srv = Server("--arg", f"models={stored_default} {second}", "--arg", "workers=1", "--arg", "model_control=true",
                 "--arg", f"control_token_file={token}", "--arg", "control_wait_s=5", memory_limit_mb=CAP_MB)
    try:
        doc = httpx.get(srv.url + "/docs.json").json()
        repository = {p for p in doc["paths"] if p.startswith("/v2/repository/")}
        assert repository == {"/v2/repository/index", *(f"/v2/repository/models/{{name}}/{action}" for action in
                              ("load", "unload", "canary", "shadow", "promote", "rollback"))}, repository
        real = {"name": ("lenet5-digits", "digits-fuzz", "lenet5-digits:" + stored_default.split(":")[1])}
        without, failures = fuzz(srv.url, doc, max_examples=10, real=real, paths=repository)
        with_token, more = fuzz(srv.url, doc, max_examples=20, real=real, paths=repository,
                                headers={"Authorization": "Bearer fuzz-token"})
        failures += more
        assert not failures, "\n".join(map(str, failures[:20]))
        assert len(without) == len(with_token) == len(repository)
        served = httpx.get(srv.url + "/models").json()["loaded"]
        assert served and httpx.get(srv.url + "/readyz").status_code == 200, served
        assert "Traceback" not in srv.output(), srv.output()[-3000:]
    finally:
        srv.stop()


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_requests_whose_clients_left_are_never_run(stored_default, digits_test):
    """Twenty clients send an image and hang up at once; the batcher holds batches open 400 ms, by
    which time every one of them has gone: none reaches the model, none is logged as an error."""
    srv = Server("--arg", f"models={stored_default}", "--arg", "workers=1", "--arg", "max_wait_ms=400",
                 memory_limit_mb=CAP_MB)
    try:
        png = encode(digits_test[0][0][0])
        r = httpx.post(srv.url + "/classify", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        ran = metric_sum(srv.url, "cnnserve_batch_size_sum")
        head = (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(png)}\r\n\r\n").encode()
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        for s in socks:
            s.sendall(head + png)
        for s in socks:
            s.close()
        # refused by the batcher, not while reading the body or waiting to be decoded (the other two paths
        # that count client_closed): each of the twenty is logged once with the batcher's words, once its
        # batch closes (400 ms); a request that ran instead would never be logged so
        refused = "while the request waited for the model; it was not run"
        log = wait_until(lambda: (out := srv.output()).count(refused) >= 20 and out, 30,
                         "twenty requests refused by the batcher")
        assert log.count(refused) == 20, log[-3000:]
        assert metric_sum(srv.url, "cnnserve_batch_size_sum") == ran  # not one of them ran
        assert 'reason="client_closed"' in httpx.get(srv.url + "/metrics").text
        assert "bytes of the body" not in log and "waited to be decoded" not in log
        assert "Traceback" not in log
    finally:
        srv.stop()


# --- faults: drain, a killed worker, a soak -------------------------------------------------------

@pytest.fixture(scope="module")
def bodies(digits_test):
    x = digits_test[0]
    return [(encode(x[i][0]), "image/png") for i in range(8)]


def test_sigterm_under_load_drains_without_dropping(stored_default, bodies):
    srv = Server("--arg", f"models={stored_default}", "--arg", "drain_s=2", memory_limit_mb=CAP_MB)
    try:
        out = faults.drain_trial(srv, bodies, clients=16)
    finally:
        srv.stop()
    assert out["exit_code"] == 0, out
    assert out["readyz_503_after_s"] is not None, out  # readiness fell during the drain (figures: the report)
    assert out["answered_after_sigterm"] > 0 and out["5xx_after_sigterm"] == 0, out
    assert out["dropped_after_sigterm"] == 0, out


def test_kill_9_of_a_worker_is_not_an_outage(stored_default, bodies):
    srv = Server("--arg", f"models={stored_default}", memory_limit_mb=CAP_MB)
    try:
        out = faults.kill_worker_trial(srv, bodies, clients=16)
    finally:
        srv.stop()
    assert out["workers"] == 2, out  # the default where there are two cores
    assert out["5xx"] == 0, out
    assert out["failed"] <= out["clients"], out  # at most the requests the dead worker held
    assert out["answered_after_kill"] > 100, out  # the other worker kept answering
    assert out["worker_back_after_s"] is not None, out  # and the lost one was started again


def test_soak_with_hostile_images_mixed_in(capped_server, bodies):
    hostile_bodies = [(data, "application/octet-stream") for data, _, _ in list(hostile.images().values())[:6]]
    out = faults.soak_trial(capped_server, bodies, hostile_bodies, seconds=8, clients=8)
    assert out["5xx"] == 0 and out["failed"] == 0 and out["ready_after"], out
    assert out["statuses"].get(200, 0) > 50, out
    assert out["rss_after_mb"] - out["rss_before_mb"] < 300, out


def test_a_refused_request_leaves_no_cycle_holding_its_body():
    """A request the batcher answers 499 (504 and model errors come the same way), or a decoding process refuses,
    is freed by reference counting alone: its exception's traceback holds the caller's frame (and its body), and
    a waiting frame that kept the future holding the exception made a cycle only a full collection freed. The
    collector is off here."""
    import gc
    import weakref

    from cnnserve.core.config import DEFAULTS
    from cnnserve.core.preprocess import ImageError
    from cnnserve.core.spec import ModelSpec
    from cnnserve.service.decoding import DecodePool

    class Held:  # beside the body in the handler's frame: it lives exactly as long as that frame
        pass

    async def handler(call):
        body, held = hostile.images()["png with 1.33 M tEXt chunks"][0], Held()
        watch = weakref.ref(held)
        try:
            await call(body)
        except (ClientGone, ImageError):
            pass
        return watch

    async def main():
        b = MicroBatcher(lambda x: x.astype(np.float32), max_batch_size=4, max_queue=100, max_wait_ms=0)
        pool = DecodePool(1, DEFAULTS.limits, 5.0, 16, 28 * 28)
        spec = ModelSpec("lenet5", 1, 28, 28, (0.5,), (0.5,), labels=tuple("0123456789"))
        gone = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        try:
            return [await handler(lambda body: b.submit(np.zeros((1, 1), np.uint8), gone=gone)),
                    await handler(lambda body: pool.decode(body, spec))]
        finally:
            b.close()
            pool.close()

    gc.collect()
    gc.disable()
    try:
        watches = asyncio.run(main())
        assert [w() is None for w in watches] == [True, True]
    finally:
        gc.enable()


def test_refused_bodies_do_not_stay_in_the_worker(stored_default, bodies):
    """A body a decoding process refuses (here 13-20 MB images of too many chunks) is freed once it is answered.
    Its exception held the decoding frame, whose job held the future holding the exception: a cycle only the
    cyclic collector frees, so under load such bodies stayed (150 MB of them in one worker after a 15 s soak; here
    102-134 MB in three runs of four, 1 MB once fixed). The worker's private memory (USS: not the regions it
    shares with its decoding processes) is measured once the decoding processes are up, and again after the soak."""
    import psutil

    big = [(data, "application/octet-stream") for data, _, _ in hostile.images().values() if len(data) > 10 * 2**20]
    assert len(big) == 3, [len(d) for d, _ in big]
    srv = Server("--arg", f"models={stored_default}", "--arg", "workers=1", memory_limit_mb=CAP_MB)
    try:
        (worker,) = faults.worker_pids(srv)
        faults.soak_trial(srv, bodies, big, seconds=3, clients=8)  # the decoding processes started, warm
        time.sleep(1)
        before = psutil.Process(worker).memory_full_info().uss
        out = faults.soak_trial(srv, bodies, big, seconds=10, clients=8)
        time.sleep(1)
        grown = (psutil.Process(worker).memory_full_info().uss - before) / 2**20
    finally:
        srv.stop()
    assert out["5xx"] == 0 and out["statuses"].get(400, 0) > 20, out
    assert grown < 40, f"the worker kept {grown:.0f} MB after the soak: {out}"


# --- bounded labels, idle connections, numbers of any length, shared homes ----------------------------

def _many_requests(port: int, n: int, connections: int = 2) -> dict:
    """``n`` requests to paths and model names never seen before (a fresh uuid each), over kept-alive
    connections: unknown paths, unknown models in every route that takes a name. Returns the statuses."""
    import http.client
    import uuid

    statuses: dict = {}
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
    try:
        for i in range(n):
            u = uuid.uuid4().hex
            method, path, body = [("GET", f"/nope/{u}", None), ("GET", f"/models/{u}", None),
                                  ("POST", f"/v2/models/{u}/infer", b"{}"), ("GET", f"/v2/models/{u}/ready", None),
                                  ("POST", f"/classify?model={u}", b"x")][i % 5]
            c = conns[i % connections]
            c.request(method, path, body=body, headers={"Content-Type": "image/png"} if body else {})
            r = c.getresponse()
            r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
    finally:
        for c in conns:
            c.close()
    return statuses


def test_metric_labels_stay_a_closed_set_whatever_the_paths(capped_server):
    """10,000 requests to made-up paths and model names: /metrics and the workers' memory stay flat (each new
    path once added series to BentoML's request metrics: 21.8 KB of worker memory apiece)."""
    _many_requests(capped_server.port, 1000)  # every kind of answer once, and the allocator warm
    size_before = len(httpx.get(capped_server.url + "/metrics").content)
    rss_before = faults.tree_rss_mb(capped_server.proc.pid)
    statuses = _many_requests(capped_server.port, 10_000)
    text = httpx.get(capped_server.url + "/metrics").text
    rss_after = faults.tree_rss_mb(capped_server.proc.pid)
    assert set(statuses) == {404}, statuses
    assert len(text.encode()) - size_before < 2048, (size_before, len(text.encode()))
    assert rss_after - rss_before < 40, (rss_before, rss_after)  # 10,000 x 21.8 KB = 213 MB before the fix
    assert 'endpoint="other"' in text and 'endpoint="/v2/models/{name}/infer"' in text
    assert "/nope/" not in text


def test_connections_that_never_send_a_byte_are_closed(capped_server):
    """200 connections that never send a byte: each closed after header_timeout_s (2 s here) with a 408,
    and the server answers others meanwhile."""
    socks = [socket.create_connection(("127.0.0.1", capped_server.port)) for _ in range(200)]
    try:
        assert httpx.get(capped_server.url + "/readyz").status_code == 200
        deadline = time.monotonic() + 30
        closed, answers = 0, []
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(4096)
                while data and not data.endswith(b"}"):
                    more = s.recv(4096)
                    if not more:
                        break
                    data += more
            except socket.timeout:
                continue
            closed += 1
            answers.append(data[:12])
        assert closed == 200, closed
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), set(answers)
    finally:
        for s in socks:
            s.close()


def test_numbers_of_any_length_get_4xx(client, digits_test):
    """Every number a client sends, in a header, a query parameter or a JSON field, at 4,301 digits and more
    (Python's ``int`` refuses those: the v2 header answered 500 with a 95-line traceback), as NaN and as
    infinity: a 4xx naming it, never a 5xx."""
    png = encode(digits_test[0][0][0])
    huge = "9" * 4301
    r = client.post("/v2/models/lenet5-digits/infer", content=b"{}",
                    headers={"Inference-Header-Content-Length": huge})
    assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text
    bodies = {"/classify": {"content": png, "headers": {"Content-Type": "image/png"}},
              "/classify/batch": {"files": [("images", ("a.png", png, "image/png"))]},
              "/classify/explain": {"content": png, "headers": {"Content-Type": "image/png"}},
              "/v2/models/lenet5-digits/infer": {"content": json.dumps({"inputs": [{
                  "name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}]})}}
    for route, body in bodies.items():
        for name in ("top_k", "timeout_ms", "target", "patch", "stride"):
            for value in (huge, "-" + huge, "1e999", "nan", "inf", "0x10"):
                r = client.post(route, params={name: value}, **body)
                declared = name in _params_of(client, route)
                assert 400 <= r.status_code < 500 if declared else r.status_code == 200, (route, name, value, r.text)
    r = client.post("/v2/models/lenet5-digits/infer", content=b'{"inputs": [{"name": "pixels", "datatype": "UINT8", '
                    b'"shape": [1, 1, 28, 28], "parameters": {"binary_data_size": 1' + b"0" * 5000 + b"}}]}")
    assert r.status_code == 400 and r.json()["code"] == "bad_json", r.text


_PARAMS: dict = {}


def _params_of(client, route: str) -> set:
    """The query parameters a route declares in the OpenAPI document (others are ignored, as FastAPI does)."""
    if not _PARAMS:
        for path, ops in client.get("/docs.json").json()["paths"].items():
            _PARAMS[path] = {p["name"] for op in ops.values() for p in op.get("parameters", [])}
    return _PARAMS.get(route.replace("lenet5-digits", "{name}"), set())


def test_two_servers_on_one_bentoml_home_keep_their_own_metrics(capped_server, stored_default, digits_test):
    """A second server started on the first one's BENTOML_HOME: the first keeps its counters (BentoML
    empties its shared Prometheus folder when a server starts), and the second does not show them."""
    png = encode(digits_test[0][0][0])
    for _ in range(3):
        assert httpx.post(capped_server.url + "/classify", content=png,
                          headers={"Content-Type": "image/png"}).status_code == 200
    before = metric_sum(capped_server.url, "cnnserve_batch_size_count")
    assert before >= 3
    second = Server("--arg", f"models={stored_default}", "--arg", "workers=1", home=capped_server.home,
                    memory_limit_mb=CAP_MB)
    try:
        assert metric_sum(second.url, "cnnserve_batch_size_count") == 0
        assert metric_sum(capped_server.url, "cnnserve_batch_size_count") == before
        assert httpx.post(second.url + "/classify", content=png, headers={"Content-Type": "image/png"}).status_code == 200
        assert metric_sum(capped_server.url, "cnnserve_batch_size_count") == before
        assert metric_sum(second.url, "cnnserve_batch_size_count") == 1
    finally:
        second.stop()
    assert metric_sum(capped_server.url, "cnnserve_batch_size_count") == before


# --- start-up: refused once, never a crash loop ----------------------------------------------------

def _store_unchecked(path, name: str) -> str:
    """Put a file into the model store past ``cnnserve store``'s checks (as an older cnnserve or a hand
    would have): what a server must refuse on its own."""
    import shutil

    import bentoml

    with bentoml.models.create(name, module="cnnserve") as m:
        shutil.copyfile(path, m.path_of("model.onnx"))
    return str(m.tag)


def _edited(default_onnx, folder, name: str, edit) -> str:
    """The default model with ``edit(model)`` applied, saved as ``folder/name.onnx`` (as it is: onnx's own
    save would refuse what some edits make)."""
    m = onnx.load(str(default_onnx))
    edit(m)
    path = folder / f"{name}.onnx"
    path.write_bytes(m.SerializeToString())
    return str(path)


def _spec_edit(**changes):
    from cnnserve.core.onnxmeta import KEY_SPEC

    def edit(m):
        prop = next(p for p in m.metadata_props if p.key == KEY_SPEC)
        prop.value = json.dumps({**json.loads(prop.value), **changes})
    return edit


def _weights_outside(m):
    """Every initializer's data in a file outside the model's folder (``../weights.bin``)."""
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    for t in m.graph.initializer:  # (the data file itself is never written: the location alone is refused)
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"


@pytest.mark.parametrize("case", ["input 100000x100000 in the metadata", "5 labels for 10 outputs",
                                  "weights outside its folder", "forced precision it lacks"])
def test_a_model_no_worker_could_load_is_refused_once(case, default_onnx, stored_default, tmp_path):
    """`cnnserve store` refuses the file, and a server given it anyway exits 1 once with one message (it once
    restarted its workers forever: 54 tracebacks in 90 s)."""
    from cnnserve.export.store import StoreError, store_model

    if case == "forced precision it lacks":
        tag, args = stored_default, ("--arg", "precision=int8")
        message = "no int8 variant"
    else:
        edit, message = {"input 100000x100000 in the metadata": (_spec_edit(height=100000, width=100000),
                                                                   "1x100000x100000 input"),
                         "5 labels for 10 outputs": (_spec_edit(labels=list("abcde")), "names 5 labels"),
                         "weights outside its folder": (_weights_outside, "weights.bin")}[case]
        path = _edited(default_onnx, tmp_path, "bad", edit)
        with pytest.raises(StoreError, match=message if case != "weights outside its folder" else "other files"):
            store_model(path, "refused")
        tag, args = _store_unchecked(path, "unchecked"), ()
    status, out, seconds = serve_until_exit("--arg", f"models={tag}", *args)
    assert status == 1, out[-2000:]
    assert out.count("cannot be served") == 1 and message in out, out[-2000:]
    assert "Traceback" not in out and "Application startup failed" not in out, out[-3000:]


def test_a_worker_that_fails_to_start_stops_the_server_once(tmp_path):
    """A model whose warm-up at the largest batch asks onnxruntime for a tensor over 4 GiB is refused by the
    first process's trial (which runs that batch in a process of its own); one that passes the trial but cannot
    start in a worker (CUDA required where it does not load) stops the server with the reason and exit status
    1 instead of restarting workers for ever."""
    from cnnserve.core.runtime import cuda_works

    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.core.spec import ModelSpec

    spec = ModelSpec("tiles", 1, 64, 64, (0.5,), (0.5,), labels=("a", "b"))
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["f"], to=T.FLOAT),
         helper.make_node("Tile", ["f", "reps"], ["big"]),  # 576 MiB an image: 4.5 GiB for eight
         helper.make_node("ReduceMean", ["big", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "tiles",
        [helper.make_tensor_value_info("pixels", T.UINT8, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("logits", T.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("probabilities", T.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array([1, 36, 32, 32], np.int64), "reps"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.ones((36, 2), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    for key, value in ModelInfo(spec).to_metadata().items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    path = tmp_path / "tiles.onnx"
    onnx.save(model, str(path))
    tag = _store_unchecked(path, "tiles")
    status, out, seconds = serve_until_exit("--arg", f"models={tag}", "--arg", "workers=1", "--arg", "max_batch_size=8")
    assert status == 1, out[-3000:]
    assert "cannot be served" in out and "4294967296" in out and "stopping the server" not in out, out[-3000:]
    if cuda_works():
        return  # the worker below would start
    status, out, seconds = serve_until_exit("--arg", f"models={tag}", "--arg", "workers=1", "--arg", "max_batch_size=1",
                                            "--arg", "providers=cuda")
    assert status == 1, out[-3000:]
    assert "cnnserve cannot start" in out and "CUDA" in out, out[-3000:]
    assert out.count("stopping the server") <= 2, out[-3000:]  # the worker that failed (and at most one more)


# --- explanations and large images yield to interactive requests ---------------------------------------

def _multipart(field: str, files: list[bytes], content_type: str = "image/png") -> tuple[bytes, str]:
    boundary = "cnnserve-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
             f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def one_worker(stored_default):
    """One worker, so that every request meets the same batcher and decoding processes; bulk slices of a
    tenth of a millisecond of LeNet-5 (a few images), and 500 ms of CPU per image."""
    srv = Server("--arg", f"models={stored_default}", "--arg", "workers=1", "--arg", "bulk_slice_ms=0.1",
                 "--arg", "decode_cpu_ms=500", memory_limit_mb=CAP_MB)
    yield srv
    srv.stop()


def test_interactive_answers_keep_coming_under_an_explanation_flood(one_worker, digits_test):
    """Four clients looping occlusion maps (170 images each, bulk by default, a slice per batch) and one
    interactive client: the interactive client's answers keep coming, many per explanation. The explanations
    once ran at interactive priority and queued ahead of it: a handful of answers in 15 s."""
    png = encode(digits_test[0][0][0])
    out = faults.flood_trial(one_worker, [(png, "image/png")], [(png, "image/png")], "/classify/explain",
                             clients=4, seconds=8)
    victim, flood = out["victim"], out["flood"]
    explained = flood["statuses"].get(200, 0)
    batching = httpx.get(one_worker.url + "/models").json()["models"][0]["batching"]
    assert batching["bulk_slice"] < 170, batching  # an explanation runs in several slices
    assert victim["statuses"] == {200: victim["answered"]} and victim["failed"] == 0, out
    assert set(flood["statuses"]) <= {200, 503} and explained >= 3, out  # shed with 503 past half the queue
    # measured: about 35 interactive answers per explanation; queued behind explanations, fewer than one
    assert victim["answered"] >= 3 * explained, (out, batching)


def test_interactive_images_are_decoded_between_a_flood_of_large_ones(one_worker):
    """Two clients sending 128 legal 7000x7000 grey PNGs at a time (/classify/batch, deadline 3 s), and an
    interactive client with an image that is decoded in a process too: it is decoded between theirs, image
    by image, and answered; theirs end at their deadline with cnnserve's 504 (they once held the decoding
    threads a minute, the victim waited 30-60 s and got BentoML's own 504)."""
    big, ctype = _multipart("images", [hostile.grey_png()] * 128)
    victim = encode(np.kron(np.eye(10, dtype=np.uint8) * 255, np.ones((32, 32), np.uint8)))  # 320x320: not inline
    out = faults.flood_trial(one_worker, [(victim, "image/png")], [(big, ctype)], "/classify/batch?timeout_ms=3000",
                             clients=2, seconds=8, victim_path="/classify?timeout_ms=5000")
    victim_counts, flood = out["victim"], out["flood"]
    assert victim_counts["statuses"] == {200: victim_counts["answered"]} and victim_counts["answered"] >= 5, out
    assert flood["statuses"].get(504, 0) >= 2 and set(flood["statuses"]) <= {504, 503}, out
    r = httpx.post(one_worker.url + "/classify/batch", params={"timeout_ms": 1000},
                   content=big, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded", r.text


def test_costly_images_are_stopped_at_their_cpu_budget(one_worker, digits_test):
    """Files within every limit whose decoding takes seconds (a GIF of 1-byte comment sub-blocks, an RLE4
    BMP, a JPEG repeating one scan 3,000 times): each decoding process is killed at 500 ms of CPU and the
    image refused with 413; one whose deadline comes first gets 504; the server answers on."""
    for name, (data, status, code) in hostile.slow_images().items():
        r = httpx.post(one_worker.url + "/classify", content=data, headers={"Content-Type": "image/png"},
                       timeout=60)
        assert (r.status_code, r.json()["code"]) == (status, code), (name, r.text)
    data = hostile.slow_images()["jpeg 7000x7000 progressive, 3,000 AC scans"][0]
    r = httpx.post(one_worker.url + "/classify", params={"timeout_ms": 300}, content=data,
                   headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded", r.text
    png = encode(np.kron(digits_test[0][0][0], np.ones((20, 20), np.uint8)))  # 560x560: decoded in a process
    assert httpx.post(one_worker.url + "/classify", content=png, headers={"Content-Type": "image/png"}).status_code == 200


def test_decoding_processes_take_interactive_images_first_and_requests_in_turn():
    """One decoding process, real images: a request of five large images at bulk priority, then one of four
    at interactive priority, then a single interactive image: the interactive ones are decoded before the
    bulk ones still waiting, and the single image before the rest of the four (requests take turns)."""
    from cnnserve.core.config import DEFAULTS
    from cnnserve.core.spec import ModelSpec
    from cnnserve.service.decoding import DecodePool

    spec = ModelSpec("m", 1, 28, 28, (0.5,), (0.5,), labels=("a", "b"))
    big = hostile.grey_png(3000)
    done: list[str] = []

    async def one(pool, name, **kw):
        await pool.decode(big, spec, **kw)
        done.append(name)

    async def main():
        pool = DecodePool(1, DEFAULTS.limits, 10.0, 100, 28 * 28)
        await pool.decode(big, spec)  # the process is started and warm
        bulk, four = object(), object()
        tasks = [asyncio.create_task(one(pool, f"bulk{i}", priority="bulk", group=bulk)) for i in range(5)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one(pool, f"four{i}", group=four)) for i in range(4)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(one(pool, "single")))
        await asyncio.gather(*tasks)
        pool.close()

    asyncio.run(main())
    assert done[0] == "bulk0", done  # it was being decoded when the others came
    assert [n for n in done if not n.startswith("bulk")] == done[1:6], done  # interactive before the bulk left
    assert done.index("single") < done.index("four3"), done  # requests in turn, not one request's images first


def test_required_cuda_that_does_not_load_stops_the_server_once(stored_default, default_onnx):
    """`providers=cuda` on a machine where CUDA does not load (every CPU machine, CI): the workers cannot
    start, and the server exits 1 with the reason instead of restarting them for ever."""
    from cnnserve.core.runtime import ModelLoadError, create_session

    try:
        create_session(default_onnx, "cuda")
        pytest.skip("CUDA loads here: the server would start")
    except ModelLoadError:
        pass
    status, out, seconds = serve_until_exit("--arg", f"models={stored_default}", "--arg", "providers=cuda")
    assert status == 1 and "cnnserve cannot start" in out and "CUDA was required" in out, out[-3000:]
