"""The BentoML service, started for real (`bentoml serve`) and spoken to over loopback HTTP."""

import asyncio
import io
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.utils as triton_utils
from PIL import Image

from cnnserve.core.onnxmeta import ModelInfo
from tests.conftest import Server, encode

pytestmark = pytest.mark.slow


def png(pixels: np.ndarray) -> bytes:
    return encode(pixels[0])  # 1 x H x W grey


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(default_onnx):
    """The exported model run in-process, for comparison with what the server answers."""
    sess = ort.InferenceSession(str(default_onnx), providers=["CPUExecutionProvider"])
    return sess, ModelInfo.from_metadata(sess.get_modelmeta().custom_metadata_map)


def test_classify_multipart_and_raw_body(client, digits_test, reference):
    x, _ = digits_test
    data = png(x[0])
    a = client.post("/classify", files={"image": ("d.png", data, "image/png")}, params={"top_k": 3})
    b = client.post("/classify", content=data, headers={"Content-Type": "image/png"}, params={"top_k": 3})
    assert a.status_code == b.status_code == 200, a.text
    assert a.json() == b.json()
    body = a.json()
    assert body["model"] == "lenet5-digits" and body["version"]
    preds = body["predictions"]
    assert len(preds) == 3 and set(preds[0]) == {"label", "index", "probability"}
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    expected = reference[0].run(["probabilities"], {"pixels": x[:1]})[0][0]
    assert preds[0]["index"] == int(expected.argmax())
    assert preds[0]["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert preds[0]["label"] == reference[1].spec.labels[preds[0]["index"]]


def test_server_timing_breaks_down_each_request(client, digits_test):
    """Every /classify answer says where its time went (Server-Timing) and feeds the stage histogram."""
    from cnnserve.service.metrics import STAGES

    r = client.post("/classify", content=png(digits_test[0][1]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    stages = {}
    for part in r.headers["Server-Timing"].split(","):
        name, dur = part.strip().split(";dur=")
        stages[name] = float(dur)
    assert list(stages) == [s for s in STAGES if s in stages] and set(stages) == set(STAGES)
    assert all(v >= 0 for v in stages.values())
    assert stages["inference"] > 0 and stages["decode"] > 0
    parts = sum(v for k, v in stages.items() if k != "total")
    assert parts <= stages["total"] + 0.01  # the stages do not overlap; the rest is event-loop time
    text = client.get("/metrics").text
    for stage in STAGES:
        assert f'cnnserve_request_stage_seconds_count{{model="lenet5-digits",stage="{stage}"}}' in text


def test_held_out_digits_over_http_reproduce_exported_accuracy(server, digits_test, reference):
    """All 360 test images, PNG-encoded and sent concurrently, score the accuracy recorded at export."""
    x, y = digits_test

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            sem = asyncio.Semaphore(32)

            async def one(img):
                async with sem:
                    r = await c.post("/classify", files={"image": ("d.png", png(img), "image/png")})
                    assert r.status_code == 200, r.text
                    return r.json()["predictions"][0]["index"]

            return await asyncio.gather(*(one(img) for img in x))

    predicted = np.array(asyncio.run(run()))
    correct = int((predicted == y).sum())  # the recorded accuracy is a float32 mean: compare counts
    assert correct == round(reference[1].metrics["test_accuracy"] * len(y))


def test_batch_endpoint_keeps_order_and_isolates_bad_images(client, digits_test, reference):
    x, _ = digits_test
    files = [("images", (f"{i}.png", png(x[i]), "image/png")) for i in range(4)]
    files.insert(2, ("images", ("bad.png", b"not an image", "image/png")))
    r = client.post("/classify/batch", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == ["0.png", "1.png", "bad.png", "2.png", "3.png"]
    assert results[2]["error"]["status"] == 400 and "not an image" in results[2]["error"]["message"]
    expected = reference[0].run(["probabilities"], {"pixels": x[:4]})[0].argmax(1)
    got = [res["predictions"][0]["index"] for res in results if "predictions" in res]
    assert got == expected.tolist()


def test_models_metadata(client):
    r = client.get("/models")
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m["name"] == "lenet5-digits" and m["version"] and m["precision"] == "fp32"
    assert m["labels"] == list("0123456789") and m["spec"]["height"] == 28
    assert m["providers"][-1] == "CPUExecutionProvider"
    assert m["input"] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}
    assert client.get("/models/lenet5-digits").json()["name"] == "lenet5-digits"


def test_open_inference_protocol_with_tritonclient(server, digits_test, reference):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("lenet5-digits")
    meta = c.get_model_metadata("lenet5-digits")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    x = digits_test[0][:5]
    want = reference[0].run(["logits", "probabilities"], {"pixels": x})
    for binary in (False, True):  # JSON tensors, and the binary tensor extension tritonclient uses by default
        inp = triton.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")]
        res = c.infer("lenet5-digits", [inp], outputs=outs, request_id="r1")
        assert np.allclose(res.as_numpy("logits"), want[0], atol=1e-5)
        assert np.allclose(res.as_numpy("probabilities"), want[1], atol=1e-6)
        assert res.get_response()["id"] == "r1"


def test_tritonclient_http_classification_and_priority(server, digits_test, reference):
    """tritonclient.http's ``class_count`` gets Triton's classification extension (the top k as BYTES
    "probability:index:label", as over gRPC) and its ``priority`` and ``timeout`` request parameters are read
    (an unknown priority refused as gRPC refuses it)."""
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert "classification" in c.get_server_metadata()["extensions"]
    x = digits_test[0][:2]
    want = reference[0].run(["probabilities"], {"pixels": x})[0]
    inp = triton.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    res = c.infer("lenet5-digits", [inp], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
                  priority=2, timeout=60_000_000)
    texts = res.as_numpy("probabilities")
    assert texts.shape == (2, 3)
    for row, probs in zip(texts, want):
        top = np.argsort(-probs)[:3]
        fields = [(t.decode() if isinstance(t, bytes) else t).split(":") for t in row]  # (JSON's data: str)
        assert [int(f[1]) for f in fields] == top.tolist() and [f[2] for f in fields] == [str(i) for i in top]
        assert [float(f[0]) for f in fields] == pytest.approx(probs[top].tolist(), abs=1e-6)
    r = httpx.post(f"{server.url}/v2/models/lenet5-digits/infer", timeout=30, json={
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
        "parameters": {"priority": "urgent"}})
    assert r.status_code == 400 and r.json()["code"] == "bad_priority", r.text


def test_encoded_images_over_the_open_inference_protocol(server, client, digits_test, reference):
    """A BYTES input named ``image``: encoded images decoded by the service's own preprocessing, sent
    by tritonclient with the binary tensor extension and as base64 JSON; the answers equal the model's
    on the same pixels."""
    x = digits_test[0][:5]
    pngs = [png(a) for a in x]
    want = reference[0].run(["logits", "probabilities"], {"pixels": x})
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    inp = triton.InferInput("image", [len(pngs)], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    res = c.infer("lenet5-digits", [inp], outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)])
    assert np.allclose(res.as_numpy("probabilities"), want[1], atol=1e-6)
    import base64

    r = v2(client, [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                     "data": [base64.b64encode(b).decode() for b in pngs[:2]]}])
    assert r.status_code == 200, r.text
    logits = next(o for o in r.json()["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [2, 10] and np.allclose(np.reshape(logits["data"], (2, 10)), want[0][:2], atol=1e-5)
    # one bad image fails the request with its index; a length that overruns the body is refused
    bad = np.array([pngs[0], pngs[1][:40]], dtype=np.object_)
    inp = triton.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(bad, binary_data=True)
    with pytest.raises(triton_utils.InferenceServerException, match="image 1: "):
        c.infer("lenet5-digits", [inp])
    blob = (1000).to_bytes(4, "little") + pngs[0]
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    r = client.post("/v2/models/lenet5-digits/infer", content=head + blob,
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and r.json()["code"] == "bad_binary" and "1000 bytes announced" in r.json()["error"]


def v2(client, inputs, name="lenet5-digits"):
    return client.post(f"/v2/models/{name}/infer", json={"inputs": inputs})


@pytest.mark.parametrize("inputs, code", [
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 32, 32], "data": [0] * 1024}], "bad_shape"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}], "bad_datatype"),
    ([{"name": "picture", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}], "bad_input_name"),
    ([{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}], "bad_datatype"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1, 28], "data": ["aGk="]}], "bad_shape"),
    ([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}], "bad_shape"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}], "bad_data"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [7]}], "bad_request"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}], "not_an_image"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 783}], "bad_data"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [300] * 784}], "bad_data"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0.5] * 784}], "bad_data"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [[0] * 28, [0] * 3]}], "bad_data"),
    ([], "bad_request"),
])
def test_v2_bad_tensors_are_4xx_naming_the_problem(client, inputs, code):
    r = v2(client, inputs)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code and r.json()["error"]


def test_v2_unknown_model_and_bad_json(client):
    r = v2(client, [], name="nope")
    assert r.status_code == 404 and "serving: lenet5-digits" in r.json()["error"]
    r = client.post("/v2/models/lenet5-digits/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "bad_json"


def truncated(fmt: str) -> bytes:
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(content=b"this is text, not an image", headers={"Content-Type": "image/png"}), 400, "not_an_image"),
    (dict(content=truncated("PNG"), headers={"Content-Type": "image/png"}), 400, "truncated"),
    (dict(content=truncated("JPEG"), headers={"Content-Type": "image/jpeg"}), 400, "truncated"),
    (dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
    (dict(files={"picture": ("d.png", b"x", "image/png")}), 400, "missing_field"),
    (dict(content=b"x", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    (dict(content=b"x", headers={"Content-Type": "image/png"}, params={"model": "nope"}), 404, "unknown_model"),
    (dict(content=b"x", headers={"Content-Type": "image/png"}, params={"top_k": 0}), 400, "bad_top_k"),
    (dict(content=b"x", headers={"Content-Type": "image/png"}, params={"top_k": 11}), 400, "bad_top_k"),
    (dict(content=b"x", headers={"Content-Type": "image/png"}, params={"top_k": "many"}), 400, "bad_parameter"),
])
def test_bad_input_is_4xx_with_json_reason(client, kwargs, status, code):
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["error"]


def test_limits_over_http(client):
    big = b"\x00" * (21 * 1024 * 1024)  # over the 20 MB default
    r = client.post("/classify", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    buf = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buf, "PNG")  # 100 M pixels in a few kB
    r = client.post("/classify", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and r.json()["code"] == "too_many_pixels"
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, "PPM")  # Pillow reads it, the service does not accept it
    r = client.post("/classify", content=buf.getvalue(), headers={"Content-Type": "image/x-portable-anymap"})
    assert r.status_code == 415 and "PPM" in r.json()["error"]


def test_concurrent_burst_with_bad_requests_mixed_in(server, digits_test, reference):
    """64 good and 8 bad requests at once: every good one succeeds with the right answer."""
    x, _ = digits_test
    good = list(range(64))
    expected = reference[0].run(["probabilities"], {"pixels": x[good]})[0].argmax(1)
    bad = [truncated("PNG"), b"", b"garbage", truncated("JPEG")] * 2

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=80)) as c:
            async def post(data):
                return await c.post("/classify", content=data, headers={"Content-Type": "image/png"})

            jobs = [post(png(x[i])) for i in good]
            for j, b in enumerate(bad):
                jobs.insert(j * 9, post(b))
            return await asyncio.gather(*jobs)

    responses = asyncio.run(run())
    good_resp = [r for r in responses if r.status_code == 200]
    bad_resp = [r for r in responses if r.status_code != 200]
    assert len(good_resp) == 64 and len(bad_resp) == 8
    assert all(400 <= r.status_code < 500 and "error" in r.json() for r in bad_resp)
    order = [i for i, r in enumerate(responses) if r.status_code == 200]
    got = [responses[i].json()["predictions"][0]["index"] for i in order]
    assert got == expected.tolist()


def test_health_metrics_and_openapi(client, digits_test):
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    ok = client.post("/classify", content=png(digits_test[0][0]), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200  # one answer and one rejection, whatever ran before
    client.post("/classify", content=b"", headers={"Content-Type": "image/png"})
    text = client.get("/metrics").text
    for name in ("cnnserve_batch_size_bucket", "cnnserve_inference_seconds_bucket",
                 "cnnserve_request_stage_seconds_bucket", 'cnnserve_rejected_requests_total{protocol="http",reason="empty"}'):
        assert name in text
    # the autoscaling metric (deploy/kubernetes): nothing waits once the answer is back
    queued = [line for line in text.splitlines() if line.startswith("cnnserve_queued_images{")]
    assert queued and all(float(line.rsplit(" ", 1)[1]) == 0 for line in queued), queued
    # what runs: library versions and the patches' outcomes
    runtime = client.get("/v2").json()["runtime"]
    from cnnserve.service.patches import PATCHES, WORKER_SOCKET

    # every patch, and the worker's reading of its socket (gRPC listens on HTTP's address)
    assert runtime["versions"]["bentoml"]
    assert set(runtime["patches"]) == {p.name for p in PATCHES} | {WORKER_SOCKET.name}
    assert runtime["patches"][WORKER_SOCKET.name].startswith("reads bentoml"), runtime["patches"]
    # one name per module in the running worker (as bentofile.yaml names the service)
    assert runtime["modules_with_two_names"] == []
    paths = client.get("/docs.json").json()["paths"]
    for p in ("/classify", "/classify/batch", "/models", "/v2/models/{name}/infer", "/v2/health/ready"):
        assert p in paths
    assert "multipart/form-data" in json.dumps(paths["/classify"])
    # the document names cnnserve and its version (BentoML wrote version "None" and its own read-me)
    from cnnserve import __version__

    info = client.get("/docs.json").json()["info"]
    assert info["title"] == "cnnserve" and info["version"] == __version__, info
    assert "POST /classify" in info["description"] and "BentoML Slack" not in info["description"]
    assert "contact" not in info
    home = client.get("/")  # BentoML's browsable API page, over the same document
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")


def test_overload_sheds_with_503_and_retry_after(stored_default, digits_test):
    """A tiny queue and batch: a burst past capacity gets 503 + Retry-After quickly, never a hang;
    also: providers forced to CPU by configuration."""
    srv = Server("--arg", f"models={stored_default}", "--arg", "max_queue=2", "--arg", "max_batch_size=1",
                 "--arg", "providers=cpu")
    try:
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/models").json()["models"][0]["providers"] == ["CPUExecutionProvider"]
        data = png(digits_test[0][0])

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30,
                                         limits=httpx.Limits(max_connections=200)) as c:
                return await asyncio.gather(*(c.post("/classify", content=data, headers={"Content-Type": "image/png"})
                                              for _ in range(200)))

        responses = asyncio.run(run())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1
        shed = next(r for r in responses if r.status_code == 503)
        assert int(shed.headers["Retry-After"]) >= 1 and shed.json()["code"] == "overloaded"
    finally:
        srv.stop()


def test_missing_model_fails_start_with_its_name():
    with pytest.raises(RuntimeError, match="no-such-model"):
        Server("--arg", "models=no-such-model:latest", ready_timeout=60)
