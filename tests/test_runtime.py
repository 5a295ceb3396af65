"""The runtime and the micro-batcher, in-process on real ONNX files (no server)."""

import asyncio
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from cnnserve.service.batching import MicroBatcher, Overloaded
from cnnserve.core.runtime import CPU, CUDA, ModelLoadError, load_model, requested_providers


def test_provider_choice():
    assert requested_providers("cpu") == [CPU]
    auto = requested_providers("auto")
    assert auto[-1] == CPU
    # onnxruntime-gpu lists CUDA even on machines without a GPU: "auto" then asks for it first
    assert (auto[0][0] == CUDA) == (CUDA in ort.get_available_providers())
    with pytest.raises(ValueError, match="providers must be one of"):
        requested_providers("tpu")


def test_load_model_reports_providers_really_used(default_onnx):
    m = load_model(default_onnx, providers="auto")
    assert m.providers == m.session.get_providers() and m.providers[-1] == CPU
    assert m.warmup_ms > 0 and m.spec.labels == tuple("0123456789")
    cpu = load_model(default_onnx, providers="cpu")
    assert cpu.providers == [CPU]


def test_forcing_cuda_without_a_gpu_fails_clearly(default_onnx):
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider at all")
    try:
        load_model(default_onnx, providers="cuda", warm_up=False)
    except ModelLoadError as e:
        assert "CUDA was required" in str(e)
    else:
        pytest.skip("CUDA really loaded here: a GPU machine")


def test_top_k(default_onnx):
    m = load_model(default_onnx)
    probs = m.predict(np.zeros((2, 1, 28, 28), np.uint8))
    top = m.top_k(probs, 3)
    assert len(top) == 2 and [len(t) for t in top] == [3, 3]
    assert top[0][0]["probability"] >= top[0][1]["probability"] >= top[0][2]["probability"]


def test_batcher_forms_batches_under_concurrency():
    seen, gate = [], threading.Event()

    def fn(x):
        gate.wait(5)  # the first batch blocks until everything else is queued
        seen.append(len(x))
        return x.reshape(len(x), -1).sum(1, keepdims=True).astype(np.float32)

    async def main():
        b = MicroBatcher(fn, max_batch_size=16, max_queue=100, max_wait_ms=0)
        tasks = [asyncio.create_task(b.submit(np.full((1, 2), i, np.uint8))) for i in range(40)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks)
        b.close()
        return out

    out = asyncio.run(main())
    assert [float(o[0, 0]) for o in out] == [2.0 * i for i in range(40)]  # each caller gets its own rows
    assert seen == [16, 16, 8]  # queued requests share runs, up to the cap


def test_batcher_sheds_load_and_survives_failures():
    def fn(x):
        time.sleep(0.05)
        if (x == 99).any():
            raise RuntimeError("boom")
        return x.astype(np.float32)

    async def main():
        b = MicroBatcher(fn, max_batch_size=1, max_queue=3, max_wait_ms=0)
        jobs = [b.submit(np.array([[i]], np.uint8)) for i in range(10)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        shed = [r for r in results if isinstance(r, Overloaded)]
        ok = [r for r in results if isinstance(r, np.ndarray)]
        bad = await asyncio.gather(b.submit(np.array([[99]], np.uint8)), return_exceptions=True)
        after = await b.submit(np.array([[5]], np.uint8))  # a failing batch does not stop the batcher
        b.close()
        return shed, ok, bad, after

    shed, ok, bad, after = asyncio.run(main())
    # submitted at once: the queue takes the first max_queue=3, each gets its own row back, the rest are shed
    assert [float(o[0, 0]) for o in ok] == [0.0, 1.0, 2.0] and len(shed) == 7
    assert all(s.retry_after >= 1 for s in shed)
    assert isinstance(bad[0], RuntimeError) and float(after[0, 0]) == 5.0


def test_default_top_k_is_clamped_explicit_is_refused(default_onnx):
    """A model with fewer classes than the default top-k answers with all its classes."""
    import copy

    from cnnserve.service.engine import Engine
    from cnnserve.service.errors import APIError

    m = load_model(default_onnx)
    few = copy.copy(m)
    few.info = copy.copy(m.info)
    object.__setattr__(few.info, "spec", m.spec.with_labels(("a", "b", "c")))
    few.name = "few"
    engine = Engine([m, few])
    assert engine.call(few.name).top_k == 3 and engine.call(m.name).top_k == 5
    with pytest.raises(APIError, match="between 1 and 3"):
        engine.call(few.name, top_k=4)
    engine.close()


def test_engine_decodes_inline_or_in_processes_alike(default_onnx, digits_test):
    """Small images decode on the event loop, large ones in decoding processes: same answers, all stages
    timed; a broken image fails alone on either path. The expected answers come from the held-out pixels
    themselves, never through the decoding under test."""
    from cnnserve.core.config import Settings
    from cnnserve.service.engine import Engine
    from cnnserve.service.errors import APIError
    from cnnserve.service.metrics import STAGES
    from tests.conftest import encode

    m = load_model(default_onnx)
    x, y = digits_test
    small = encode(x[3][0])  # 28x28, as the test split holds it (PNG: lossless)
    large = encode(np.kron(x[3][0], np.ones((40, 40), np.uint8)))  # 1120x1120, the same digit
    probs = m.predict(x[3:4])[0]  # the model on the very pixels the small PNG holds
    order = np.argsort(-probs)[:5]
    want = [(m.spec.labels[i], int(i)) for i in order]
    assert m.spec.labels[order[0]] == m.spec.labels[y[3]]  # a digit the model gets right
    answers = {}

    async def classify(engine, data):
        timings = {}
        out = await engine.classify(engine.call(), data, timings=timings)
        return out["predictions"], timings

    for limit in (0, 128 * 128):  # always processes; the default
        engine = Engine([m], Settings(inline_decode_pixels=limit))
        try:
            for size, data in (("small", small), ("large", large)):
                preds, timings = asyncio.run(classify(engine, data))
                assert set(timings) == set(STAGES) - {"read", "total"}
                assert all(v >= 0 for v in timings.values())
                answers[limit, size] = preds
            for data in (small, large):
                with pytest.raises(APIError) as err:
                    asyncio.run(engine.classify(engine.call(), data[: len(data) // 2]))
                assert err.value.status == 400 and err.value.code in ("truncated", "bad_image")
        finally:
            engine.close()
    for limit in (0, 128 * 128):
        small_answer, large_answer = answers[limit, "small"], answers[limit, "large"]
        assert [(p["label"], p["index"]) for p in small_answer] == want, small_answer
        assert [p["probability"] for p in small_answer] == pytest.approx(probs[order].tolist(), abs=1e-6)
        assert large_answer[0]["label"] == m.spec.labels[y[3]], large_answer  # resized down to the same digit
    assert answers[0, "small"] == answers[128 * 128, "small"]  # decoded in a process, then on the event loop
    assert answers[0, "large"] == answers[128 * 128, "large"]


def test_classify_fast_path_answers_as_fastapi_route_does(default_onnx, digits_test):
    """``POST /classify`` skips FastAPI's routing and dependencies in the service (the fast path). The
    same app without it goes through FastAPI's route: both give the same predictions, the same stage
    timings and the same 4xx codes, for raw and multipart bodies and every query parameter."""
    import httpx

    from cnnserve.service.api import create_app
    from cnnserve.service.engine import Engine
    from cnnserve.service.metrics import STAGES
    from tests.conftest import encode

    m = load_model(default_onnx)
    engine = Engine([m])
    x, _ = digits_test
    png = encode(x[5][0])
    cases = [
        dict(content=png, headers={"Content-Type": "image/png"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"top_k": "3", "priority": "bulk",
                                                                          "timeout_ms": "5000", "extra": "x"}),
        dict(files={"image": ("d.png", png, "image/png")}, params={"model": m.name}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"top_k": "many"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"timeout_ms": "soon"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"timeout_ms": "-1"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"priority": "urgent"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"top_k": "11"}),
        dict(content=png, headers={"Content-Type": "image/png"}, params={"model": "nope"}),
        dict(content=png[:40], headers={"Content-Type": "image/png"}),
        dict(content=png, headers={"Content-Type": "text/plain"}),
        dict(files={"picture": ("d.png", png, "image/png")}),
    ]

    async def answers(fast: bool, root_path: str = "") -> list:
        app = create_app(engine)
        app.fast_path = fast
        out = []
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for kwargs in cases:
                r = await client.post(root_path + "/classify", **kwargs)
                body = r.json()
                stages = {part.split(";")[0].strip() for part in r.headers.get("Server-Timing", "").split(",") if part}
                # the whole answer: predictions, or the refusal's code and its words
                out.append((r.status_code, body.get("predictions"), body.get("code"), body.get("error"), stages))
        return out

    try:
        fast, routed = asyncio.run(answers(True)), asyncio.run(answers(False))
        behind_a_prefix = asyncio.run(answers(True, root_path="/cnn"))  # the fast path under a root_path
    finally:
        engine.close()
    assert fast == routed == behind_a_prefix
    assert [status for status, *_ in fast] == [200, 200, 200, 400, 400, 400, 400, 400, 404, 400, 415, 400]
    assert fast[0][4] == set(STAGES) and len(fast[1][1]) == 3
    assert fast[3][3] == ("invalid request: query.top_k: Input should be a valid integer, unable to parse string "
                          "as an integer"), fast[3][3]


def test_classify_params_parse():
    from cnnserve.service.errors import APIError
    from cnnserve.service.incoming import ClassifyParams

    p = ClassifyParams.from_query(b"top_k=2&model=a%20b&timeout_ms=1.5e3&priority=bulk&top_k=3&other=1")
    assert (p.top_k, p.model, p.timeout_ms, p.priority) == (3, "a b", 1500.0, "bulk")  # the last top_k counts
    assert ClassifyParams.from_query(b"").top_k is None
    with pytest.raises(APIError, match="query.top_k: Input should be a valid integer") as e:
        ClassifyParams.from_query(b"top_k=2.5")
    assert e.value.status == 400 and e.value.code == "bad_parameter"
