"""Who may call the inference endpoints, and over what: API keys (hashed at rest, checked in constant time,
named in metrics, rotated without a restart) and TLS for HTTP and gRPC from one pair of files, on real servers."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cnnserve.service import apikeys
from tests.conftest import Server, encode, serve_until_exit

pytestmark = pytest.mark.slow


def digit() -> bytes:
    return encode((np.arange(28 * 28).reshape(28, 28) % 255).astype(np.uint8))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("keys")
    path = folder / "keys.txt"
    return {"path": path, "ci": apikeys.new_key("ci", str(path)), "ops": apikeys.new_key("ops", str(path))}


@pytest.fixture(scope="module")
def keyed(stored_default, keys):
    srv = Server("--arg", f"models={stored_default}", "--arg", f"api_keys_file={keys['path']}", "--arg", "workers=1",
                 "--arg", "access_log=true")
    yield srv
    srv.stop()


def test_the_keys_file_holds_hashes_only(keys):
    text = keys["path"].read_text()
    assert keys["ci"] not in text and keys["ops"] not in text
    assert text.splitlines()[0] == f"ci sha256:{apikeys.digest(keys['ci']).hex()}"
    assert keys["path"].stat().st_mode & 0o077 == 0  # the owner's only
    with pytest.raises(apikeys.KeysFileError, match="already"):
        apikeys.new_key("ci", str(keys["path"]))
    with pytest.raises(apikeys.KeysFileError, match="line 1"):
        apikeys.parse("ci plaintext-key\n", "keys.txt")


def test_inference_needs_a_key_and_the_rest_stays_open(keyed, keys):
    png, headers = digit(), {"Content-Type": "image/png"}
    v2 = {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
    calls = {
        "/classify": lambda h: httpx.post(keyed.url + "/classify", content=png, headers={**headers, **h}),
        "/classify/batch": lambda h: httpx.post(keyed.url + "/classify/batch", headers=h,
                                                files=[("images", ("a.png", png, "image/png"))]),
        "/classify/explain": lambda h: httpx.post(keyed.url + "/classify/explain", content=png,
                                                  headers={**headers, **h}, timeout=60),
        "v2 infer": lambda h: httpx.post(keyed.url + "/v2/models/lenet5-digits/infer", json=v2, headers=h),
    }
    for route, call in calls.items():
        for h in ({}, {"Authorization": "Bearer cns_not-a-key"}, {"X-API-Key": keys["ci"][:-1]},
                  {"Authorization": keys["ci"]}):  # no key; a wrong one; one a character short; no "Bearer"
            r = call(h)
            assert r.status_code == 401, (route, h, r.status_code, r.text[:200])
            assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer", route
            assert keys["ci"] not in r.text
        assert call({"Authorization": f"Bearer {keys['ci']}"}).status_code == 200, route
        assert call({"X-API-Key": keys["ops"]}).status_code == 200, route
    for path in ("/readyz", "/livez", "/metrics", "/v2/health/ready", "/v2/models/lenet5-digits", "/models", "/v2"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    metrics = httpx.get(keyed.url + "/metrics").text
    assert 'cnnserve_api_key_requests_total{key="ci",protocol="http"} 4.0' in metrics
    assert 'key="ops"' in metrics and keys["ci"] not in metrics and keys["ops"] not in metrics
    assert 'cnnserve_rejected_requests_total{protocol="http",reason="unauthorized"} 16.0' in metrics
    log = keyed.output()  # the access log names the caller by its key's name, never the key
    assert "POST /classify 200" in log and "key=ci" in log and "key=ops" in log and "POST /classify 401" in log
    assert keys["ci"] not in log and keys["ops"] not in log


def test_keys_are_added_and_revoked_without_a_restart(keyed, keys, tmp_path):
    png, headers = digit(), {"Content-Type": "image/png"}

    def status(key: str) -> int:
        return httpx.post(keyed.url + "/classify", content=png, headers={**headers, "X-API-Key": key}).status_code

    new = apikeys.new_key("late", str(keys["path"]))
    deadline = time.monotonic() + 10
    while status(new) != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert status(new) == 200
    kept = [line for line in keys["path"].read_text().splitlines() if not line.startswith("ops ")]
    keys["path"].write_text("\n".join(kept) + "\n")  # ops revoked
    deadline = time.monotonic() + 10
    while status(keys["ops"]) != 401 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert status(keys["ops"]) == 401 and status(keys["ci"]) == 200
    keys["path"].write_text("this is not a keys file\n")  # a broken edit: the keys read before stay in force
    time.sleep(1.5)
    assert status(keys["ci"]) == 200
    assert "stay in force" in keyed.output()
    keys["path"].write_text("\n".join(kept) + "\n")


def test_an_unusable_keys_file_or_tls_pair_stops_the_server_with_one_line(stored_default, tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text("ci sha256:abc\n")
    for args, words in ((["--arg", f"api_keys_file={bad}"], "line 1"),
                        (["--arg", f"api_keys_file={tmp_path / 'missing'}"], "cannot read"),
                        (["--arg", f"tls_certfile={bad}"], "both"),
                        (["--arg", f"tls_certfile={bad}", "--arg", f"tls_keyfile={bad}"], "not a PEM file")):
        status, out, _ = serve_until_exit("--arg", f"models={stored_default}", *args)
        assert status == 1 and words in out and "Traceback" not in out, (args, out[-2000:])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to serve TLS with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_for_http_from_one_pair_of_files(stored_default, certificate, keys):
    cert, key = certificate
    srv = Server("--arg", f"models={stored_default}", "--arg", f"tls_certfile={cert}", "--arg", f"tls_keyfile={key}",
                 "--arg", "workers=1", "--arg", f"api_keys_file={keys['path']}")
    try:
        assert srv.url.startswith("https://")
        r = httpx.post(srv.url + "/classify", content=digit(), verify=str(cert),
                       headers={"Content-Type": "image/png", "X-API-Key": keys["ci"]})
        assert r.status_code == 200 and r.json()["model"] == "lenet5-digits", r.text
        with pytest.raises(httpx.ConnectError):  # a client that does not know the certificate refuses it
            httpx.get(srv.url + "/readyz")
        with pytest.raises(httpx.HTTPError):  # and the plain-text port answers no plain HTTP
            httpx.get(srv.url.replace("https://", "http://") + "/readyz", timeout=5)
    finally:
        srv.stop()


def test_grpc_needs_the_key_too_and_serves_tls_with_the_same_files(stored_default, certificate, keys):
    import grpc
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    cert, key = certificate
    srv = Server("--arg", f"models={stored_default}", "--arg", f"tls_certfile={cert}", "--arg", f"tls_keyfile={key}",
                 "--arg", "workers=1", "--arg", f"api_keys_file={keys['path']}")
    try:
        x = tg.InferInput("pixels", [1, 1, 28, 28], "UINT8")
        x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
        with tg.InferenceServerClient(srv.grpc_target, ssl=True, root_certificates=str(cert)) as c:
            assert c.is_server_ready()  # health and metadata stay open
            with pytest.raises(InferenceServerException) as e:
                c.infer("lenet5-digits", [x])
            assert e.value.status() == "StatusCode.UNAUTHENTICATED", e.value
            with pytest.raises(InferenceServerException) as e:
                c.infer("lenet5-digits", [x], headers={"x-api-key": "cns_wrong"})
            assert e.value.status() == "StatusCode.UNAUTHENTICATED"
            got = c.infer("lenet5-digits", [x], headers={"authorization": f"Bearer {keys['ci']}"})
            assert got.as_numpy("probabilities").shape == (1, 10)
        channel = grpc.insecure_channel(srv.grpc_target)  # plain text to a TLS port: no answer
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)
        channel.close()
        metrics = httpx.get(srv.url + "/metrics", verify=str(cert)).text
        assert 'cnnserve_api_key_requests_total{key="ci",protocol="grpc"} 1.0' in metrics
    finally:
        srv.stop()
