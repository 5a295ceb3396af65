"""The GPU's code paths, run on the CPU (docs/gpu.md): the CUDA provider's options from the settings, IO
binding, batches padded to fixed buckets with their own bound buffers (what CUDA graphs replay), the
fall-back when binding cannot serve, and more than one batch in flight per model. The figures on a real
GPU are the harness's ``--gpu`` mode; here every path answers exactly as a plain ``session.run``."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from cnnserve.core import binding, onnxmeta
from cnnserve.core.config import DeviceOptions, Settings
from cnnserve.core.runtime import CPU, CUDA, create_session, cuda_works, load_model, requested_providers
from cnnserve.service.batching import MicroBatcher

from tests.conftest import Server, encode

OUTPUTS = list(onnxmeta.OUTPUTS)


def _images(n: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_the_cuda_providers_options_come_from_the_settings():
    s = Settings(device_id=1, cudnn_conv_algo_search="EXHAUSTIVE", gpu_mem_limit_mb=512, cuda_graphs=True,
                 max_batch_size=48)
    opts = binding.cuda_options(s.device)
    assert opts["device_id"] == "1" and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert opts["gpu_mem_limit"] == str(512 * 1024 * 1024) and opts["enable_cuda_graph"] == "1"
    assert opts["cudnn_conv_use_max_workspace"] == "1"
    assert s.device.buckets == (1, 2, 4, 8, 16, 32, 48)  # powers of two, then the largest batch itself
    plain = binding.cuda_options(Settings().device)
    assert "gpu_mem_limit" not in plain and "enable_cuda_graph" not in plain and plain["device_id"] == "0"
    assert requested_providers("cpu", s.device) == [CPU]
    if CUDA in ort.get_available_providers():  # onnxruntime-gpu lists CUDA even where it cannot load
        assert requested_providers("auto", s.device) == [(CUDA, opts), CPU]


def test_bucket_settings_that_cannot_hold_a_batch_are_refused():
    assert Settings(batch_buckets="64 1 8").device.buckets == (1, 8, 64)
    for bad in ("1 8", "0 64", "eight 64"):
        with pytest.raises(ValidationError, match="batch_buckets"):
            Settings(batch_buckets=bad, max_batch_size=64)


def test_buckets_pad_slice_and_answer_as_a_plain_run(default_onnx):
    """Batches of every size from 1 to past the largest bucket, on host buffers: each answer equals
    session.run's on the same images, a batch runs in the smallest bucket that holds it, a batch larger
    than the largest runs in slices, other outputs go around the buckets, and answers handed out are
    copies (the next run of a bucket does not change them)."""
    sess = create_session(default_onnx, "cpu")
    shape = tuple(sess.get_inputs()[0].shape[1:])
    runner = binding.Buckets(sess, shape, OUTPUTS, (1, 2, 4, 8))
    assert [runner.bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    kept = []
    for n in (1, 3, 5, 8, 19):
        x = _images(n, shape, n)
        got, want = runner.run(x, OUTPUTS), sess.run(OUTPUTS, {onnxmeta.INPUT: x})
        assert [a.shape for a in got] == [(n, 10), (n, 10)]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        kept.append((got, want))
    for got, want in kept:  # unchanged by the runs after them
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert runner.describe()["runs"] == {"1": 1, "4": 2, "8": 4}  # 3 and 19 % 8 in 4; 5, 8 and 19 // 8 in 8
    probs = runner.run(_images(3, shape, 7), [onnxmeta.PROBABILITIES])
    assert len(probs) == 1 and probs[0].shape == (3, 10)


def test_bucket_runs_are_one_at_a_time_and_each_thread_gets_its_own_rows(default_onnx):
    """Eight threads share a bucket runner (its buffers are shared: one run at a time), each asking for
    batches of random sizes: every answer is its own images', never another thread's."""
    sess = create_session(default_onnx, "cpu")
    shape = tuple(sess.get_inputs()[0].shape[1:])
    runner = binding.Buckets(sess, shape, OUTPUTS, (1, 4, 16))
    wrong = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(15):
            x = _images(int(rng.integers(1, 17)), shape, int(rng.integers(1 << 30)))
            if not np.allclose(runner.run(x, OUTPUTS)[1], sess.run(OUTPUTS, {onnxmeta.INPUT: x})[1], atol=1e-6):
                wrong.append(seed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_load_model_binds_where_asked_and_says_so(default_onnx, digits_test):
    x, _ = digits_test
    plain = load_model(default_onnx, providers="cpu", device=Settings().device)
    assert plain.runner is None and plain.choice["runner"].startswith("session.run (io_binding=auto, on CPU)")
    bound = load_model(default_onnx, providers="cpu", device=Settings(io_binding="on").device)
    assert isinstance(bound.runner, binding.Bound) and bound.choice["runner"] == "io_binding on cpu:0"
    np.testing.assert_array_equal(bound.predict(x[:50]), plain.predict(x[:50]))
    # CUDA graphs asked for where the session runs on the CPU: said, and served without them
    graphs = load_model(default_onnx, providers="cpu", device=Settings(cuda_graphs=True).device)
    assert graphs.runner is None and graphs.choice["runner"].startswith("no CUDA graphs on CPUExecutionProvider")
    assert graphs.describe()["precision_choice"]["runner"] == graphs.choice["runner"]


@pytest.mark.skipif(CUDA not in ort.get_available_providers() or cuda_works(),
                    reason="needs onnxruntime-gpu (it lists CUDA) on a machine where CUDA does not load")
def test_graph_buffers_on_a_device_that_cannot_load_are_refused_in_words(default_onnx):
    """onnxruntime-gpu on a machine without CUDA's libraries: a bucket's buffers on the CUDA device cannot be
    made, and ``runner_for`` says so (``BindingError``, which ``attach_runner`` answers by serving without
    graphs) instead of failing a request later."""
    sess = create_session(default_onnx, "cpu")
    shape = tuple(sess.get_inputs()[0].shape[1:])
    with pytest.raises(binding.BindingError, match="CUDA"):
        binding.runner_for(sess, shape, OUTPUTS, DeviceOptions(cuda_graphs=True, buckets=(1, 8)), device="cuda")


def test_two_batches_in_flight_overlap_and_every_request_gets_its_rows_in_order():
    """``in_flight=2``: two runs at once (never three), each request's rows in order even when its slices
    end out of order (a later slice of a request finishing first)."""
    lock, running, peak = threading.Lock(), [0], [0]

    def fn(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.03 if int(x[0, 0]) % 2 == 0 else 0.005)  # some batches slower: they end out of order
        with lock:
            running[0] -= 1
        return x.astype(np.float32) * 2

    async def main():
        b = MicroBatcher(fn, max_batch_size=3, max_queue=1000, max_wait_ms=0, in_flight=2)
        requests = [np.arange(10 * i, 10 * i + 1 + i, dtype=np.uint8)[:, None] for i in range(10)]
        out = await asyncio.gather(*(b.submit(r) for r in requests))
        b.close()
        return requests, out

    requests, out = asyncio.run(main())
    for r, o in zip(requests, out):
        assert o[:, 0].tolist() == (r[:, 0].astype(np.float32) * 2).tolist()
    assert peak[0] == 2


def test_the_service_binds_and_runs_two_batches_in_flight(stored_default, digits_test, default_onnx):
    """A real server with IO binding on, two runs in flight per model and CUDA graphs asked for (refused on
    this CPU, in words in /models): 48 concurrent requests get the plain model's answers."""
    x, _ = digits_test
    want = load_model(default_onnx, providers="cpu", warm_up=False).predict(x[:48])
    srv = Server("--arg", f"models={stored_default}", "--arg", "io_binding=on", "--arg", "runs_in_flight=2",
                 "--arg", "cuda_graphs=true", "--arg", "batch_buckets=1 4 16 64", "--arg", "workers=1")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            runner = client.get("/models").json()["models"][0]["precision_choice"]["runner"]
            assert runner == "no CUDA graphs on CPUExecutionProvider; io_binding on cpu:0"

        async def ask(client, img):
            r = await client.post("/classify", content=encode(img[0]), params={"top_k": 10},
                                  headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            return {p["index"]: p["probability"] for p in r.json()["predictions"]}

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*(ask(client, img) for img in x[:48]))

        got = asyncio.run(main())
    finally:
        srv.stop()
    for probs, row in zip(got, want):
        assert np.allclose([probs[i] for i in range(10)], row, atol=1e-5)
