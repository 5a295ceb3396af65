"""The HTTP protocols' own defects, each against the real thing: answers that grew with a request's repeated
names, errors outside the service's refusals (a model that answers NaN, a bug) that went unanswered for BentoML's
60 s timeout or answered in plain text, routes nobody declared answered in plain text that tritonclient cannot
read, and the drift monitor's view of a model while another is swapped."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import onnx
import pytest

from tests.conftest import Server, encode

pytestmark = pytest.mark.slow
CAP_MB = 6144  # per process, as tests/test_reliability.py's servers
#: The corner pixel value on which the broken model below answers NaN (any other image: its usual numbers).
TRIGGER = 7


def nan_on_trigger(src, dst) -> None:
    """The default export with NaN added to both outputs of every image whose top-left pixel is ``TRIGGER``:
    finite on blank images (what a load warms up with), NaN on a real one. The metadata stays, so it loads."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    renamed = {"logits": "test_logits", "probabilities": "test_probabilities"}
    for node in g.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = renamed.get(name, name)
    g.initializer.extend([numpy_helper.from_array(np.array(v, dtype), name) for v, dtype, name in (
        ([0, 0, 0], np.int64, "t_starts"), ([1, 1, 1], np.int64, "t_ends"), ([1, 2, 3], np.int64, "t_axes"),
        ([-1, 1], np.int64, "t_shape"), (float(TRIGGER), np.float32, "t_trigger"), (1.0, np.float32, "t_one"))])
    g.node.extend([
        helper.make_node("Cast", ["pixels"], ["t_f"], to=T.FLOAT),
        helper.make_node("Slice", ["t_f", "t_starts", "t_ends", "t_axes"], ["t_corner"]),  # pixels[:, :1, :1, :1]
        helper.make_node("Reshape", ["t_corner", "t_shape"], ["t_c"]),
        helper.make_node("Sub", ["t_c", "t_trigger"], ["t_d"]),
        helper.make_node("Abs", ["t_d"], ["t_ad"]),
        helper.make_node("Sub", ["t_one", "t_ad"], ["t_e"]),
        helper.make_node("Relu", ["t_e"], ["t_r"]),  # 1 where the corner is TRIGGER, else 0
        helper.make_node("Neg", ["t_r"], ["t_n"]),
        helper.make_node("Sqrt", ["t_n"], ["t_mask"]),  # NaN there, 0 elsewhere
        helper.make_node("Add", [renamed["logits"], "t_mask"], ["logits"]),
        helper.make_node("Add", [renamed["probabilities"], "t_mask"], ["probabilities"])])
    onnx.save(m, str(dst))


@pytest.fixture(scope="module")
def nan_onnx(default_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "model.onnx"
    nan_on_trigger(default_onnx, path)
    return path


@pytest.fixture(scope="module")
def nan_tag(nan_onnx) -> str:
    from cnnserve.export.store import store_model

    return str(store_model(nan_onnx, "digits-nan").tag)


@pytest.fixture(scope="module")
def srv(stored_default, nan_tag):
    """One worker (one log, one drift monitor), under the memory cap, serving the default model and the broken one."""
    s = Server("--arg", f"models={stored_default} {nan_tag}", "--arg", "workers=1", memory_limit_mb=CAP_MB)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    # a hang (an error left for BentoML's 60 s timeout) fails as a read timeout, well before it
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        yield c


def digit(digits_test, corner: int | None = None) -> np.ndarray:
    x = digits_test[0][0].copy()  # 1 x 28 x 28
    if corner is not None:
        x[0, 0, 0] = corner
    return x


def v2_body(x: np.ndarray, outputs: list | None = None) -> bytes:
    req = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, *x.shape], "data": x.ravel().tolist()}]}
    if outputs is not None:
        req["outputs"] = outputs
    return json.dumps(req).encode()


# --- duplicated outputs -------------------------------------------------------------------------------------

def test_an_output_named_twice_is_refused_before_the_model_runs(client, srv, digits_test):
    """One image and the same output named 20,000 times (a 353 KB request once got a 70 MB answer, built on the
    event loop for 8 s): 400 ``duplicate_output``, a short message, over HTTP and gRPC alike."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    x = digit(digits_test)
    for outputs in ([{"name": "logits"}] * 20_000, [{"name": "probabilities"}, {"name": "logits"},
                                                     {"name": "probabilities"}]):
        r = client.post("/v2/models/lenet5-digits/infer", content=v2_body(x, outputs))
        assert r.status_code == 400 and r.json()["code"] == "duplicate_output", r.text[:300]
        assert len(r.content) < 400, len(r.content)
    r = client.post("/v2/models/lenet5-digits/infer", content=v2_body(x, [{"name": f"o{i}"} for i in range(20_000)]))
    assert r.status_code == 400 and r.json()["code"] == "bad_output" and len(r.content) < 400, r.text[:300]
    # each output once: exactly the N x K numbers of each
    r = client.post("/v2/models/lenet5-digits/infer", content=v2_body(x, [{"name": "probabilities"},
                                                                          {"name": "logits"}]))
    assert r.status_code == 200, r.text
    assert [(o["name"], o["shape"], len(o["data"])) for o in r.json()["outputs"]] == [
        ("probabilities", [1, 10], 10), ("logits", [1, 10], 10)]

    with tg.InferenceServerClient(srv.grpc_target) as c:
        inp = tg.InferInput("pixels", [1, *x.shape], "UINT8")
        inp.set_data_from_numpy(x[None])
        with pytest.raises(InferenceServerException, match="more than once"):
            c.infer("lenet5-digits", [inp], outputs=[tg.InferRequestedOutput("logits", class_count=3)] * 500)
        got = c.infer("lenet5-digits", [inp], outputs=[tg.InferRequestedOutput("logits", class_count=3)])
        assert got.as_numpy("logits").shape == (1, 3)  # the classification extension: the top 3, once


def test_output_names_are_checked_once_each():
    from cnnserve.service.errors import APIError
    from cnnserve.service.kserve import output_names

    assert output_names([]) == ["logits", "probabilities"]
    assert output_names(["probabilities"]) == ["probabilities"]
    for names, code in ((["logits", "logits"], "duplicate_output"), (["x"] * 100_000, "bad_output"),
                        ([None], "bad_output"), (["logits"] * 100_000, "duplicate_output")):
        with pytest.raises(APIError) as e:
            output_names(names)
        assert e.value.code == code and len(e.value.message) < 200, e.value.message


# --- a model that answers NaN; errors nobody expected -----------------------------------------------------

def test_a_model_answering_nan_gets_a_json_500_naming_it_at_once(client, srv, digits_test):
    """A model finite on blank images and NaN on some real one: every route answers that request at once with a
    JSON 500 naming the model (``/classify`` once waited 60 s for BentoML's timeout; the others answered
    "Internal Server Error"); its other requests, the drift monitor and the other model go on."""
    bad, good = digit(digits_test, TRIGGER), digit(digits_test, 0)
    png, ok_png = encode(bad[0]), encode(good[0])
    headers = {"Content-Type": "image/png"}
    params = {"model": "digits-nan"}
    answers = {
        "/classify": client.post("/classify", params=params, content=png, headers=headers),
        "/classify/batch": client.post("/classify/batch", params=params,
                                       files=[("images", ("a.png", ok_png, "image/png")),
                                              ("images", ("b.png", png, "image/png"))]),
        "/classify/explain": client.post("/classify/explain", params=params, content=png, headers=headers),
        "/v2/models/digits-nan/infer": client.post("/v2/models/digits-nan/infer", content=v2_body(bad)),
    }
    batch = answers.pop("/classify/batch")  # one image of several fails alone, as a bad image does
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert "predictions" in first and second["error"]["code"] == "model_output_not_finite", batch.text
    assert second["error"]["status"] == 500 and "digits-nan" in second["error"]["message"], batch.text
    for route, r in answers.items():
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", (route, r.text)
        body = r.json()
        assert body["code"] == "model_output_not_finite" and "digits-nan" in body["error"], (route, body)
    assert client.post("/classify", params=params, content=ok_png, headers=headers).status_code == 200
    assert client.post("/classify", content=png, headers=headers).status_code == 200  # the default model
    monitor = client.get("/models/digits-nan/monitor")
    assert monitor.status_code == 200 and monitor.json()["not_finite"] >= 3, monitor.text
    assert client.get("/readyz").status_code == 200
    log = srv.output()
    assert "answered NaN or infinity" in log and "Traceback" not in log, log[-3000:]


class Broken:
    """An engine whose every method fails as a bug would (not a refusal)."""

    metrics, monitor, default = None, None, "m"

    def __init__(self) -> None:
        from cnnserve.core.config import Settings

        self.config = Settings()

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"a bug in {name}")
        return fail


def test_every_unexpected_error_is_a_json_500_at_once_logged_once(caplog):
    """Every route of the app, its ``/classify`` fast path included (which once left the error to BentoML's 60 s
    timer), over an engine that fails as a bug would: a JSON 500 ``internal`` with the exception's type only, and
    one traceback in the log per request."""
    from cnnserve.service.api import create_app

    app = create_app(Broken())
    png = encode(np.zeros((28, 28), np.uint8))
    calls = [("POST", "/classify", png), ("POST", "/classify/explain", png), ("GET", "/models", None),
             ("GET", "/models/m", None), ("GET", "/models/m/samples", None), ("GET", "/models/m/monitor", None),
             ("GET", "/v2/models/m", None), ("GET", "/v2/models/m/ready", None),
             ("POST", "/v2/models/m/infer", b"{}"), ("POST", "/v2/repository/index", b"{}")]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            out = []
            for method, path, body in calls:
                r = await asyncio.wait_for(c.request(method, path, content=body,
                                                     headers={"Content-Type": "image/png"} if body else {}), 20)
                out.append((method, path, r))
            return out

    caplog.set_level(logging.ERROR, logger="cnnserve")
    for method, path, r in asyncio.run(main()):
        assert r.status_code == 500, (method, path, r.status_code, r.text)
        body = r.json()
        assert body["code"] == "internal" and body["error"].startswith("the server failed on this request ("), body
        assert "a bug in" not in body["error"]  # its words stay in the log
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == len(calls), [rec.getMessage() for rec in caplog.records]


def test_an_app_that_fails_before_answering_is_not_waited_for():
    """BentoML's timeout middleware (as ``http_server.timeout_call`` patches it) passes an error raised before
    the answer starts on at once; it waited for its 60 s timer, then answered 504 for it."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from cnnserve.service.http_server import timeout_call

    async def failing(scope, receive, send):
        raise RuntimeError("failed before answering")

    async def main():
        mw = TimeoutMiddleware(failing, timeout=60)
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        with pytest.raises(RuntimeError, match="failed before answering"):
            await asyncio.wait_for(timeout_call(mw, {"type": "http", "path": "/", "method": "GET", "headers": []},
                                                receive, send), 10)
        return sent

    assert asyncio.run(main()) == []  # the server above answers it (uvicorn: 500)


# --- routes nobody declared -------------------------------------------------------------------------------

def test_unknown_routes_and_methods_answer_the_services_json(client, srv):
    """A path no route has, BentoML's own included, and a method a path does not take: 404 ``not_found`` and 405
    ``method_not_allowed`` as ``{"error", "code"}`` (they were Starlette's plain text "Not Found", which
    tritonclient failed to parse, and FastAPI's ``{"detail"}``); BentoML's routes answer as before."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    with th.InferenceServerClient(srv.url.removeprefix("http://")) as c:
        # Triton's configuration and statistics are served now (tests/test_triton.py): an unknown model's 404 is
        # the server's own words, which the client reads
        for call in (lambda: c.get_model_config("nope"), lambda: c.get_inference_statistics("nope")):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "404" and e.value.message().startswith("no model"), e.value.message()
        assert c.is_server_live() and c.is_model_ready("lenet5-digits")
    for method, path, status, code in (
            ("GET", "/nope", 404, "not_found"), ("POST", "/nope/deeper?x=1", 404, "not_found"),
            ("GET", "/v2/models/lenet5-digits/nothing", 404, "not_found"),
            ("GET", "/demo/no-such-file.js", 404, "not_found"), ("GET", "/static_content/nothing", 404, "not_found"),
            ("GET", "/classify", 405, "method_not_allowed"), ("DELETE", "/models", 405, "method_not_allowed"),
            ("POST", "/readyz", 405, "method_not_allowed"), ("PUT", "/docs.json", 405, "method_not_allowed"),
            ("GET", "/v2/repository/index", 405, "method_not_allowed")):
        r = client.request(method, path)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (method, path, r.text)
        # (and the request's id, service/telemetry.py)
        assert set(r.json()) == {"error", "code", "request_id"} and r.json()["code"] == code, (method, path, r.text)
        if status == 405:
            assert r.headers.get("allow"), (method, path, r.headers)
    for path in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/", "/demo/", "/v2/health/ready"):
        assert client.get(path).status_code == 200, path
    assert client.head("/nope").status_code == 404


# --- the drift monitor while models are swapped --------------------------------------------------------------

def test_the_monitor_reads_one_view_while_another_model_is_swapped():
    """``/models/A/monitor`` (``Monitor.snapshot``) while model B is unloaded and loaded again in a tight loop, as
    the registry does it (``newest`` is the monitor's view of the served set): never an error. The snapshot
    looked B up again after checking it was served, and answered 500 (1 in 47,602 over HTTP; about 1 in 40 here
    before the fix)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.core.spec import ModelSpec
    from cnnserve.service.answers import Monitor

    reg = CollectorRegistry()
    metrics = SimpleNamespace(class_psi=Gauge("psi", "", ["model"], registry=reg),
                              top1_probability=Histogram("top1", "", ["model"], registry=reg),
                              ood_score=Histogram("ood", "", ["model"], registry=reg),
                              predicted_class=Counter("predicted", "", ["model", "label"], registry=reg),
                              out_of_distribution=Counter("outside", "", ["model"], registry=reg))
    spec = ModelSpec("lenet5", 1, 28, 28, (0.5,), (0.5,), labels=tuple("0123456789"))
    info = ModelInfo(spec, ood={"test_class_mix": [0.1] * 10, "threshold": 1.0})
    a, b = (SimpleNamespace(name=n, version="1", spec=spec, info=info) for n in ("A", "B"))
    models = {"A": a, "B": b}
    monitor = Monitor(models.get, list(models), metrics, interval=3600)
    stop, failures = threading.Event(), []

    def swap() -> None:
        while not stop.is_set():
            models.pop("B", None)  # the registry retires B's last version
            models["B"] = b  # and loads it again

    out = np.zeros((1, 20), np.float32)
    out[0, 13] = 1.0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave at every few bytecodes
    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    try:
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:
            monitor.record(b, out[:, :10], out[:, 10:], np.zeros(1))
            monitor.record(a, out[:, :10], out[:, 10:], np.zeros(1))
            try:
                snap = monitor.snapshot("A")
            except Exception as e:  # noqa: BLE001 - what the route answered 500 for
                failures.append(repr(e))
            n += 1
    finally:
        stop.set()
        swapper.join()
        sys.setswitchinterval(switch)
        monitor.close()
    assert not failures, (len(failures), n, failures[:3])
    assert snap["answers"] == n and snap["class_psi"] is not None and n > 100, (n, snap)
    # a row of NaN is counted apart, never into the figures
    monitor = Monitor({"A": a}.get, ["A"], metrics, interval=3600)
    monitor.record(a, np.full((2, 10), np.nan, np.float32), np.full((2, 10), np.nan, np.float32), np.zeros(2))
    monitor.record(a, out[:, :10], out[:, 10:], np.zeros(1))
    snap = monitor.snapshot(a)
    monitor.close()
    assert snap["not_finite"] == 2 and snap["answers"] == 1 and snap["mean_top1_probability"] == 1.0, snap
