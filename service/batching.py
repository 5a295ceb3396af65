"""An in-process micro-batcher: concurrent requests share one onnxruntime run.

Why not BentoML's adaptive batching: on these machines (``shared/FACTS.md``) its
dispatcher answered 503 at 8 concurrent clients for LeNet-5, and routing decoded images
to a batchable method through the service's self-proxy answered 500 to 400 of 960
requests at 64 clients. This batcher is an asyncio queue drained by one task that runs
the model in a worker thread:

- greedy dynamic batching: when the model is free, everything queued (up to
  ``max_batch_size`` images) becomes the next batch. Under light load a request runs
  at once (no added latency); under heavy load batches grow by themselves while the
  previous batch runs. ``max_wait_ms`` optionally holds a batch open to fill it.
- bounded: more than ``max_queue`` images waiting and ``submit`` raises ``Overloaded``
  with a Retry-After estimate from the measured throughput (the service answers 503),
  so overload sheds quickly instead of queueing into time-outs.
- a request whose client went away is dropped from its batch's results; a failing run
  fails only the requests in that batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class Overloaded(Exception):
    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the server is at capacity ({queued} images waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher:
    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 64, max_wait_ms: float = 0.0,
                 max_queue: int = 512, on_batch: Callable[[int, float], None] | None = None, name: str = "model"):
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000
        self.max_queue, self.on_batch, self.name = max_queue, on_batch, name
        self._queue: deque = deque()
        self._queued = 0  # images waiting (not yet in a running batch)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._rate = 0.0  # images per second, smoothed, for Retry-After
        self.batches = self.images = 0

    @property
    def queued(self) -> int:
        return self._queued

    async def submit(self, pixels: np.ndarray, timings: dict | None = None) -> np.ndarray:
        """Run ``pixels`` (N x C x H x W) in a shared batch; returns this request's N result rows.

        ``timings``, if given, gets ``queue`` (seconds waiting for a batch to start) and
        ``inference`` (seconds of the run that carried these images)."""
        n = len(pixels)
        if self._queued + n > self.max_queue:
            raise Overloaded(self._queued, self.retry_after())
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._drain(), name=f"batcher-{self.name}")
        fut = loop.create_future()
        self._queue.append((pixels, fut, time.perf_counter()))
        self._queued += n
        self._wake.set()
        rows, waited, seconds = await fut
        if timings is not None:
            timings["queue"], timings["inference"] = waited, seconds
        return rows

    def retry_after(self) -> int:
        return max(1, math.ceil(self._queued / self._rate)) if self._rate > 0 else 1

    def _take(self) -> list:
        items, n = [], 0
        while self._queue and (not items or n + len(self._queue[0][0]) <= self.max_batch_size):
            pixels, fut, queued_at = self._queue.popleft()
            self._queued -= len(pixels)
            if fut.cancelled():  # the client went away while waiting
                continue
            items.append((pixels, fut, queued_at))
            n += len(pixels)
        return items

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait and self._queued < self.max_batch_size:
                await asyncio.sleep(self.max_wait)
            items = self._take()
            if not items:
                continue
            batch = items[0][0] if len(items) == 1 else np.concatenate([p for p, _, _ in items])
            t = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._pool, self.fn, batch)
            except Exception as e:  # fail this batch's requests only
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            seconds = time.perf_counter() - t
            self.batches += 1
            self.images += len(batch)
            rate = len(batch) / max(seconds, 1e-6)
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            if self.on_batch:
                self.on_batch(len(batch), seconds)
            start = 0
            for pixels, fut, queued_at in items:
                if not fut.done():
                    fut.set_result((out[start:start + len(pixels)], t - queued_at, seconds))
                start += len(pixels)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
