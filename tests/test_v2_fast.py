"""The Open Inference Protocol's infer route on the service's fast path (``CnnServeAPI.fast``): the same answers
as FastAPI's route, which serves an app whose fast path is off."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
from hypothesis import strategies as st

from cnnserve.core.runtime import load_model


def infer_cases(name: str, x: np.ndarray, png: bytes) -> list[tuple[str, dict]]:
    """(path, httpx keyword arguments) of each case: answers and refusals."""
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, *x.shape]}
    json_tensor = json.dumps({"inputs": [{**pixels, "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"id": "mine", "inputs": [{**pixels, "parameters": {"binary_data_size": x.size}}]}).encode()
    binary = dict(content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    image = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "data": [base64.b64encode(png).decode()]}]}).encode()
    wrong_shape = json.dumps({"inputs": [{**pixels, "shape": [1, 1, 32, 32], "data": [0] * 1024}]}).encode()
    some_outputs = json.loads(json_tensor) | {"outputs": [{"name": "probabilities"}]}
    infer = f"/v2/models/{name}/infer"
    return [
        (infer, binary),
        (infer, dict(content=json_tensor)),
        (infer, dict(content=image, params={"priority": "bulk", "timeout_ms": "5000", "extra": "x"})),
        (f"/v2/models/{name}/versions/v1/infer", dict(content=json_tensor)),
        (infer, dict(content=json.dumps(some_outputs).encode())),
        (infer, dict(content=json_tensor, headers={"X-Request-ID": "client-chosen-id"})),
        ("/v2/models/nope/infer", dict(content=json_tensor)),
        (f"/v2/models/{name}/versions/7/infer", dict(content=json_tensor)),
        (infer, dict(content=json_tensor, params={"timeout_ms": "soon"})),
        (infer, dict(content=json_tensor, params={"priority": "urgent"})),
        ("/v2/models/nope/infer", dict(content=json_tensor, params={"timeout_ms": "-"})),  # the query first
        (infer, dict(content=b'{"inputs": [')),
        (infer, dict(content=wrong_shape)),
        (infer, dict(content=json.dumps(some_outputs | {"outputs": [{"name": "feelings"}]}).encode())),
        (infer, dict(content=head + x.tobytes(), headers={"Inference-Header-Content-Length": "99999"})),
        # paths no infer route matches, left to FastAPI's routing either way
        (f"/v2/models/{name}/infer/", dict(content=json_tensor)),
        (f"/v2/models/{name}/versions/infer", dict(content=json_tensor)),
        (f"/v2/models/{name}%2Fx/infer", dict(content=json_tensor)),
    ]


def test_v2_infer_fast_path_answers_as_fastapi_route_does(default_onnx, digits_test):
    """The fast path, FastAPI's route and the fast path behind a root_path, and reached from the server's middleware
    past the router (``http_server.FastPaths``): the same status, the same answer (outputs, or the refusal's code
    and words), the same Server-Timing stages, and the request's id (its ``X-Request-ID``, from the telemetry
    middleware) in the answer's ``id`` unless the request names its own."""
    import httpx

    from cnnserve.service.api import create_app
    from cnnserve.service.engine import Engine
    from cnnserve.service.http_server import FastPaths
    from cnnserve.service.telemetry import RequestTelemetry, Telemetry
    from tests.conftest import encode

    m = load_model(default_onnx, version="v1", providers="cpu")
    engine = Engine([m])
    x, _ = digits_test
    cases = infer_cases(m.name, x[5], encode(x[5][0]))

    via_router: dict[tuple, list] = {}  # per run, the endpoint FastAPI's router chose for each case (None: none)

    async def answers(fast: bool, root_path: str = "", front: bool = False) -> list:
        app = create_app(engine)
        app.fast_path = fast
        out = []
        seen = via_router[fast, root_path, front] = []

        async def observed(scope, receive, send):  # (with front: the rest of the server's stack, its router)
            await app(scope, receive, send)
            seen.append(getattr(scope.get("endpoint"), "__name__", None))

        class Direct:  # the API as FastPaths reaches it, past the router
            fast_handler = staticmethod(app.fast_handler)

            async def __call__(self, scope, receive, send, handler=None):
                await app(scope, receive, send, handler)
                seen.append("direct")

        inner = FastPaths(observed, api=Direct()) if front else observed
        transport = httpx.ASGITransport(app=RequestTelemetry(inner, Telemetry()), root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path, kwargs in cases:
                r = await client.post(root_path + path, **kwargs)
                body = r.json() if r.content else {}  # (a redirect's is empty)
                stages = {part.split(";")[0].strip() for part in r.headers.get("Server-Timing", "").split(",") if part}
                error = body.get("error") and body["error"].replace(root_path + "/v2/", "/v2/")  # (as it was sent)
                ids = body.get("id") == r.headers["X-Request-ID"], body.get("id") == "mine"
                out.append((r.status_code, body.get("outputs"), body.get("code"), error, stages, ids,
                            body.get("model_name"), body.get("model_version")))
        return out

    try:
        fast, routed = asyncio.run(answers(True)), asyncio.run(answers(False))
        behind_a_prefix = asyncio.run(answers(True, root_path="/cnn"))
        front, front_off = asyncio.run(answers(True, front=True)), asyncio.run(answers(False, "/cnn", front=True))
    finally:
        engine.close()
    for case, a, b, c, d, e in zip(cases, fast, routed, behind_a_prefix, front, front_off):
        assert a == b == c == d == e, (case[0], case[1].get("params"), a, b, c, d, e)
    # the infer cases took the fast path; the last three (no infer route's path) went to FastAPI's router either way
    routed_endpoints = via_router[False, "", False]
    assert routed_endpoints[:15] == ["infer_route"] * 3 + ["infer_version_route"] + ["infer_route"] * 3 + [
        "infer_version_route"] + ["infer_route"] * 7, via_router
    assert via_router[True, "", False] == via_router[True, "/cnn", False] == [None] * 15 + routed_endpoints[15:]
    # from the middleware: past the router to the API's fast path, the others through the router; all through it
    # where the fast path is off
    assert via_router[True, "", True] == ["direct"] * 15 + routed_endpoints[15:], via_router
    assert via_router[False, "/cnn", True] == routed_endpoints, via_router
    assert [status for status, *_ in fast] == [200] * 6 + [404, 404] + [400] * 7 + [307, 405, 404], fast
    assert [o["name"] for o in fast[0][1]] == ["logits", "probabilities"] and fast[0][5] == (False, True)
    assert [o["name"] for o in fast[4][1]] == ["probabilities"]
    assert all(answer[5] == (True, False) for answer in fast[1:6]), fast  # the request's id, as its header says
    assert fast[8][2:4] == ("bad_parameter", "invalid request: query.timeout_ms: Input should be a valid number, "
                                             "unable to parse string as a number"), fast[8]
    assert [answer[2] for answer in fast[6:15]] == [
        "unknown_model", "unknown_version", "bad_parameter", "bad_priority", "bad_parameter", "bad_json",
        "bad_shape", "bad_output", "bad_request"], fast
    probabilities = np.asarray(fast[0][1][1]["data"])
    assert probabilities.argmax() == digits_test[1][5] and abs(probabilities.sum() - 1) < 1e-4


def test_request_ids_are_unique_across_threads_and_forks():
    """Request ids come from a block of random bytes (``telemetry.new_id``): 32 hex digits each, none twice from
    four threads at once, and a forked worker does not hand out the ids its parent drew and had not used."""
    import os
    import threading

    from cnnserve.service.telemetry import new_id

    new_id()  # the parent has a block under way
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, as its parent would have made them
        os.write(write, "".join(new_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        child = f.read()
    ids: list[list[str]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=lambda out: out.extend(new_id() for _ in range(5000)), args=(out,))
               for out in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drawn = [i for out in ids for i in out] + [child[k:k + 32] for k in range(0, len(child), 32)]
    assert len(child) == 128 and len(set(drawn)) == len(drawn) == 20_004
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in drawn)


def test_v2_infer_needs_its_key_on_either_path(default_onnx, tmp_path):
    """With a keys file, infer answers 401 without a key on the fast path and FastAPI's route alike: by a version,
    behind a root path, and with a final ``%0A`` (a route's ``$`` matches before it: the key check once did not)."""
    import hashlib

    import httpx

    from cnnserve.service.api import create_app
    from cnnserve.service.apikeys import APIKeys
    from cnnserve.service.engine import Engine

    key = "k" * 43
    (tmp_path / "keys").write_text(f"alice sha256:{hashlib.sha256(key.encode()).hexdigest()}\n")
    m = load_model(default_onnx, version="v1", providers="cpu")
    engine = Engine([m])
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                   "data": [0] * 784}]})
    paths = [f"/v2/models/{m.name}/infer", f"/v2/models/{m.name}/versions/v1/infer", f"/v2/models/{m.name}/infer%0A",
             f"/v2/models/{m.name}/versions/v1/infer%0a", "/classify%0A"]

    async def statuses(fast: bool, root_path: str) -> list:
        app = create_app(engine)
        app.fast_path, app.api_keys = fast, APIKeys(str(tmp_path / "keys"))
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [[(await client.post(root_path + path, content=body, headers=headers)).status_code
                     for path in paths] for headers in ({}, {"X-API-Key": key})]

    try:
        for fast in (True, False):
            for root_path in ("", "/cnn"):
                without, with_key = asyncio.run(statuses(fast, root_path))
                assert without == [401] * len(paths), (fast, root_path, without)
                assert with_key == [200] * 4 + [415], (fast, root_path, with_key)  # (/classify: no image sent)
    finally:
        engine.close()


def test_v2_infer_refuses_json_nested_too_deep(default_onnx):
    """A JSON part nested deeper than ``max_json_depth`` is refused (400 ``bad_json``) before the parser sees it,
    the brackets in the binary part not counted; one at the limit goes on to the protocol's own checks (the scan
    runs only where there are more opening brackets than the limit)."""
    import httpx

    from cnnserve.core.config import Settings
    from cnnserve.service.api import create_app
    from cnnserve.service.engine import Engine

    limit = Settings().max_json_depth
    engine = Engine([load_model(default_onnx, version="v1", providers="cpu")])
    infer = f"/v2/models/{engine.registry.default}/infer"

    def nested(depth: int, spare: int = 0) -> bytes:  # and ``spare`` bracket pairs side by side at depth 3
        pad = b'"pad": [' + b"[], " * spare + b"0], " if spare else b""
        return b"{" + pad + b'"inputs": ' + b"[" * (depth - 1) + b"0" + b"]" * (depth - 1) + b"}"

    async def answers() -> list:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            out = []
            for body, headers in ((nested(limit + 1), {}), (nested(limit + 5), {}), (nested(limit), {}),
                                  (nested(limit, spare=40), {}),
                                  (b'{"inputs": []}' + b"[" * 100, {"Inference-Header-Content-Length": "14"})):
                r = await client.post(infer, content=body, headers=headers)
                out.append((r.status_code, r.json()["code"], "nests deeper" in r.json()["error"]))
            return out

    try:
        deep, deeper, at_limit, wide, binary = asyncio.run(answers())
    finally:
        engine.close()
    assert deep == deeper == (400, "bad_json", True), (deep, deeper)
    assert at_limit[2] is False and wide[2] is False and binary[2] is False, (at_limit, wide, binary)
    assert at_limit[:2] == wide[:2] == binary[:2] == (400, "bad_request"), (at_limit, wide, binary)


def test_a_draining_worker_says_its_models_are_not_ready_over_both_protocols(default_onnx):
    """Once a drain begins (the server's SIGTERM), a model's readiness is false over REST as over gRPC (HTTP's once
    still said ready), and true again where no drain is under way."""
    import httpx

    from cnnserve.core.grpc_proto import pb
    from cnnserve.service.api import create_app
    from cnnserve.service.engine import Engine
    from cnnserve.service.grpc_service import InferenceService

    m = load_model(default_onnx, version="v1", providers="cpu")
    draining = [False]
    engine = Engine([m], draining=lambda: draining[0])

    async def both() -> tuple:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rest = (await client.get(f"/v2/models/{m.name}/ready")).json()["ready"]
        service = InferenceService.__new__(InferenceService)
        service.engine = engine
        grpc_ready = (await service.ModelReady(pb.ModelReadyRequest(name=m.name), None)).ready
        return rest, grpc_ready

    try:
        assert asyncio.run(both()) == (True, True)
        draining[0] = True
        assert asyncio.run(both()) == (False, False)
    finally:
        engine.close()


def _plain(obj):
    """``obj`` with each ndarray as the list json.loads would have made."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _outcome(parse, body: bytes):
    try:
        return "parsed", _plain(parse(body))
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


_JSON_SPACE = st.sampled_from(["", " ", "  ", "\n", "\t", "\r\n "])
_NUMBERS = st.one_of(st.integers(0, 255), st.integers(0, 255), st.integers(-5, 10 ** 20),
                     st.floats(allow_nan=False, allow_infinity=False), st.booleans())
# what could make a list of digits read otherwise than JSON reads it, put anywhere in the body's text
_SNIPPETS = st.sampled_from(["0", "00", " ", ",", ",,", "-", ".", "e5", '"', "[", "]", "1 2", "\\", "\u00e9",
                             str(-(10 ** 30)), str(-(10 ** 30) - 1), '"data": [1, 2]', '"data":[',
                             "99999999999999999999"])


@st.composite
def _bodies(draw) -> bytes:
    """An infer request's JSON as clients write it (any spacing, any key order, extra keys, data lists of
    integers and sometimes of anything), sometimes with a few characters put in or taken out anywhere."""
    def array(values: list) -> str:
        gap = draw(_JSON_SPACE)
        texts = [json.dumps(v) for v in values]
        if texts and draw(st.integers(0, 3)) == 0:  # one number not quite JSON's, or just past a limit
            i = draw(st.integers(0, len(texts) - 1))
            texts[i] = draw(st.sampled_from(["0{}", "{} 1", "{}0000000000000000000", "-{}", "{}.0", "{}e0"])).format(
                texts[i])
        return "[" + gap + ("," + draw(_JSON_SPACE)).join(texts) + gap + "]"

    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        values = draw(st.lists(st.integers(0, 255) if draw(st.booleans()) else _NUMBERS, max_size=40))
        data = array(values) if draw(st.integers(0, 5)) else json.dumps(draw(st.sampled_from(
            [[values], "text", {"data": values}, None, [-(10 ** 30)], [-(10 ** 30) - 1]])))  # (marks, as data)
        fields = ['"name": "pixels"', '"datatype": "UINT8"', f'"shape": [1, {len(values)}]',
                  f'"data"{draw(_JSON_SPACE)}:{draw(_JSON_SPACE)}{data}']
        if draw(st.integers(0, 9)) == 0:
            fields.append(f'"data": {array(values)}')  # a key twice: JSON keeps the last
        inputs.append("{" + ", ".join(draw(st.permutations(fields))) + "}")
    extra = draw(st.sampled_from(['', '"id": "x", ', '"id": "\\"data\\": [1, 2, 3]", ', '"x": {"data": [7, 8]}, ',
                                  '"outputs": [{"name": "probabilities"}], ']))
    text = "{" + extra + '"inputs"' + draw(_JSON_SPACE) + ":" + "[" + ", ".join(inputs) + "]}"
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_SNIPPETS) + text[at + draw(st.integers(0, 2)):]
    return text.encode("utf-8" if draw(st.integers(0, 9)) else "utf-16")


def test_json_tensors_read_by_numpy_are_what_json_reads(monkeypatch):
    """A big JSON tensor's integers are read by numpy (``kserve.loads``), not as Python ints: for any body, the
    request is exactly what ``json.loads`` makes of it (the data as an ndarray of the same numbers), or the same
    error with the same message. Every array is a candidate here (the size from which numpy reads is set to one
    byte); at the real size, a ResNet-18 body takes the numpy path."""
    from hypothesis import HealthCheck, given, settings

    from cnnserve.service import kserve

    taken = []
    real = kserve.integers

    def counted(text: bytes):
        out = real(text)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(kserve, "NUMPY_ARRAY_BYTES", 1)
    monkeypatch.setattr(kserve, "integers", counted)

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_bodies())
    def search(body: bytes):
        assert _outcome(kserve.loads, body) == _outcome(json.loads, body), body

    search()
    assert sum(taken) > 500, sum(taken)  # the numpy path ran, and often

    monkeypatch.undo()
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224))
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    data = kserve.loads(body)["inputs"][0]["data"]
    assert isinstance(data, np.ndarray) and np.array_equal(data, x.ravel())
