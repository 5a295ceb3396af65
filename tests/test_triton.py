"""Triton's tools read the service: the model configuration and statistics extensions through tritonclient's own
HTTP and gRPC clients, against a real two-worker server; statistics move by exactly the requests sent, whichever
worker answered them."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.conftest import Server

pytestmark = pytest.mark.slow
NAME = "lenet5-digits"
TOKEN = "test-token-triton"


@pytest.fixture(scope="module")
def srv(stored_default, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN)
    s = Server("--arg", f"models={stored_default}", "--arg", "workers=2", "--arg", "max_wait_ms=2",
               "--arg", "model_control=true", "--arg", f"control_token_file={token}")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv):
    return th.InferenceServerClient(srv.url.removeprefix("http://"))


def pixels(n: int) -> np.ndarray:
    return (np.arange(n * 784).reshape(n, 1, 28, 28) % 251).astype(np.uint8)


def counts(stats: dict) -> tuple[int, int, int, int]:
    s = stats["model_stats"][0]
    return (int(s["inference_stats"]["success"]["count"]), int(s["inference_count"]), int(s["execution_count"]),
            int(s["inference_stats"]["fail"]["count"]))


def settled(read, before: tuple, expected: tuple, timeout: float = 10) -> tuple:
    """The figures once they moved by ``expected`` (each worker writes its own at most every model_sync_s)."""
    deadline = time.monotonic() + timeout
    while True:
        now = counts(read())
        moved = tuple(a - b for a, b in zip(now, before))
        if moved[:2] == expected[:2] or time.monotonic() > deadline:
            return moved
        time.sleep(0.2)


def test_model_config_as_triton_gives_it(http, srv):
    config = http.get_model_config(NAME)
    assert config["name"] == NAME and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 64
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW",
                                "dims": [1, 28, 28]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", [10]), ("probabilities", "TYPE_FP32", [10])]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 2000
    assert batching["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    version = http.get_model_metadata(NAME)["versions"][0]
    assert http.get_model_config(NAME, version)["name"] == NAME
    with pytest.raises(InferenceServerException, match="no model named"):
        http.get_model_config("nope")
    assert set(http.get_server_metadata()["extensions"]) >= {"model_configuration", "statistics", "model_repository"}
    with tg.InferenceServerClient(srv.grpc_target) as g:
        c = g.get_model_config(NAME, as_json=True)["config"]
        assert c["name"] == NAME and int(c["max_batch_size"]) == 64 and c["input"][0]["dims"] == ["1", "28", "28"]
        assert {"model_configuration", "statistics"} <= set(g.get_server_metadata(as_json=True)["extensions"])


def test_statistics_move_by_exactly_the_requests_sent(http, srv):
    """Twelve HTTP infer calls of 4 images and eight gRPC calls of 2, spread over both workers by their
    connections: success +20, inference_count +64, every part of the time counted once per request."""
    before = counts(http.get_inference_statistics(NAME))
    x = th.InferInput("pixels", [4, 1, 28, 28], "UINT8")
    x.set_data_from_numpy(pixels(4))
    for _ in range(12):
        th.InferenceServerClient(srv.url.removeprefix("http://")).infer(NAME, [x])  # a new connection each
    with tg.InferenceServerClient(srv.grpc_target) as g:
        y = tg.InferInput("pixels", [2, 1, 28, 28], "UINT8")
        y.set_data_from_numpy(pixels(2))
        for _ in range(8):
            g.infer(NAME, [y])
        moved = settled(lambda: http.get_inference_statistics(NAME), before, (20, 64))
        assert moved[:2] == (20, 64) and moved[2] >= 1 and moved[3] == 0, moved
        s = g.get_inference_statistics(NAME, as_json=True)["model_stats"][0]
    stats = s["inference_stats"]
    assert int(stats["success"]["count"]) == before[0] + 20
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(stats[part]["count"]) == before[0] + 20 and int(stats[part]["ns"]) > 0, part
    assert int(stats["success"]["ns"]) >= int(stats["compute_infer"]["ns"])
    sizes = {int(b["batch_size"]) for b in s["batch_stats"]}
    assert sizes and sizes <= set(range(1, 65)), sizes
    assert all(v["model_stats"] for v in (http.get_inference_statistics(),))
    every = http.get_inference_statistics()["model_stats"]
    assert [m["name"] for m in every] == [NAME]


def test_requests_that_fail_are_counted_as_failures(http, srv):
    before = counts(http.get_inference_statistics(NAME))
    body = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    r = httpx.post(f"{srv.url}/v2/models/{NAME}/infer", params={"timeout_ms": 0.001}, json=body)
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded", r.text  # passed before it could run
    deadline = time.monotonic() + 10
    while counts(http.get_inference_statistics(NAME))[3] == before[3] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counts(http.get_inference_statistics(NAME))[3] == before[3] + 1


def test_the_repository_over_grpc_with_the_token_as_metadata(srv, stored_default):
    """tritonclient.grpc's repository calls: the index, a load (NAME:VERSION) and an unload of a second model, the
    token as call metadata; without it PERMISSION_DENIED; a bad tag INVALID_ARGUMENT; the last model
    FAILED_PRECONDITION."""
    from cnnserve.export.store import store_model

    import bentoml

    path = bentoml.models.get(stored_default).path_of("model.onnx")
    other = store_model(path, name="digits-grpc").tag.version
    auth = {"authorization": f"Bearer {TOKEN}"}
    with tg.InferenceServerClient(srv.grpc_target) as g:
        with pytest.raises(InferenceServerException) as e:
            g.load_model(f"digits-grpc:{other}")
        assert e.value.status() == "StatusCode.PERMISSION_DENIED", e.value
        g.load_model(f"digits-grpc:{other}", headers=auth)
        assert g.is_model_ready("digits-grpc")
        rows = {(r["name"], r.get("state")) for r in g.get_model_repository_index(as_json=True)["models"]}
        assert ("digits-grpc", "READY") in rows and (NAME, "READY") in rows
        x = tg.InferInput("pixels", [1, 1, 28, 28], "UINT8")
        x.set_data_from_numpy(pixels(1))
        assert g.infer("digits-grpc", [x]).as_numpy("probabilities").shape == (1, 10)
        with pytest.raises(InferenceServerException) as e:
            g.load_model("digits-grpc:a:b", headers=auth)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
        g.unload_model("digits-grpc", headers=auth)
        assert not any(r["name"] == "digits-grpc" and r.get("state") == "READY"
                       for r in g.get_model_repository_index(as_json=True)["models"])
        with pytest.raises(InferenceServerException) as e:
            g.unload_model(NAME, headers=auth)
        assert e.value.status() == "StatusCode.FAILED_PRECONDITION" and "only model" in e.value.message()
