"""The runtime and the micro-batcher, in-process on real ONNX files (no server)."""

import asyncio
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from service.batching import MicroBatcher, Overloaded
from service.runtime import CPU, CUDA, ModelLoadError, load_model, requested_providers


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
        b = MicroBatcher(fn, max_batch_size=16, max_queue=100)
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
        b = MicroBatcher(fn, max_batch_size=1, max_queue=3)
        jobs = [b.submit(np.array([[i]], np.uint8)) for i in range(10)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        shed = [r for r in results if isinstance(r, Overloaded)]
        ok = [r for r in results if isinstance(r, np.ndarray)]
        bad = await asyncio.gather(b.submit(np.array([[99]], np.uint8)), return_exceptions=True)
        after = await b.submit(np.array([[5]], np.uint8))  # a failing batch does not stop the batcher
        b.close()
        return shed, ok, bad, after

    shed, ok, bad, after = asyncio.run(main())
    assert len(shed) >= 1 and shed[0].retry_after >= 1 and len(ok) >= 3
    assert isinstance(bad[0], RuntimeError) and float(after[0, 0]) == 5.0


def test_default_top_k_is_clamped_explicit_is_refused(default_onnx):
    """A model with fewer classes than the default top-k answers with all its classes."""
    import copy

    from service.engine import APIError, Engine

    m = load_model(default_onnx)
    few = copy.copy(m)
    few.info = copy.copy(m.info)
    object.__setattr__(few.info, "spec", m.spec.with_labels(("a", "b", "c")))
    engine = Engine([m])
    assert engine.top_k(few, None) == 3 and engine.top_k(m, None) == 5
    with pytest.raises(APIError, match="between 1 and 3"):
        engine.top_k(few, 4)
    engine.close()
