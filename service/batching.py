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

PRIORITIES = ("interactive", "bulk")


class Overloaded(Exception):
    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the server is at capacity ({queued} images waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch could start; it was not run."""


class ClientGone(Exception):
    """The request's client disconnected while it waited; it was not run."""


class MicroBatcher:
    """Greedy dynamic batches over two queues: ``interactive`` requests fill a batch first, ``bulk``
    ones (batch scoring, explanations) take the room left. Each request may carry a deadline
    (``time.perf_counter()`` seconds) by which its batch must start, and a ``gone`` future that is
    done once its client has disconnected; neither kind is ever run."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_queue: int,
                 max_wait_ms: float, on_batch: Callable[[int, float], None] | None = None, name: str = "model",
                 on_depth: Callable[[int], None] | None = None):
        """``on_batch(images, seconds)`` after each run; ``on_depth(images)`` with the images waiting for or in
        the model, as each batch starts and ends (the autoscaling metric: cheap, and fresh under load)."""
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000
        self.max_queue, self.on_batch, self.on_depth, self.name = max_queue, on_batch, on_depth, name
        self._queues: dict[str, deque] = {p: deque() for p in PRIORITIES}
        self._queued = 0  # images waiting (not yet in a running batch)
        self._bulk_queued = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._rate = 0.0  # images per second, smoothed, for Retry-After

    async def submit(self, pixels: np.ndarray, timings: dict | None = None, *, deadline: float | None = None,
                     priority: str = "interactive", gone: asyncio.Future | None = None) -> np.ndarray:
        """Run ``pixels`` (N x C x H x W) in a shared batch; returns this request's N result rows.

        ``timings``, if given, gets ``queue`` (seconds waiting for a batch to start) and
        ``inference`` (seconds of the run that carried these images). Raises ``Overloaded`` when the
        queue is full (bulk requests may fill half of it, so interactive ones always find room) and
        ``DeadlineExceeded`` when ``deadline`` passes before the batch starts."""
        n = len(pixels)
        bulk = priority == "bulk"
        if self._queued + n > self.max_queue or (bulk and self._bulk_queued + n > self.max_queue // 2):
            raise Overloaded(self._queued, self.retry_after())
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded()
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._drain(), name=f"batcher-{self.name}")
        fut = loop.create_future()
        timer = None
        if deadline is not None:  # answer 504 as soon as the deadline passes, not when the batch forms
            timer = loop.call_later(deadline - now, _expire, fut)
        self._queues[priority if bulk else "interactive"].append((pixels, fut, now, deadline, gone, timer))
        self._queued += n
        if bulk:
            self._bulk_queued += n
        self._wake.set()
        try:
            rows, waited, seconds = await fut
        finally:
            if timer is not None:
                timer.cancel()
        if timings is not None:
            timings["queue"], timings["inference"] = waited, seconds
        return rows

    def retry_after(self) -> int:
        return max(1, math.ceil(self._queued / self._rate)) if self._rate > 0 else 1

    def _take(self) -> list:
        items, n, now = [], 0, time.perf_counter()
        for priority in PRIORITIES:
            queue = self._queues[priority]
            while queue and (not items or n + len(queue[0][0]) <= self.max_batch_size):
                item = queue.popleft()
                pixels, fut, _, deadline, gone, timer = item
                self._queued -= len(pixels)
                if priority == "bulk":
                    self._bulk_queued -= len(pixels)
                if fut.done():  # cancelled (the handler went away) or already expired
                    continue
                if gone is not None and gone.done():  # the client disconnected while waiting
                    fut.set_exception(ClientGone())
                    continue
                if deadline is not None and now >= deadline:
                    _expire(fut)
                    continue
                if timer is not None:
                    timer.cancel()  # it runs now: its answer comes whatever the clock says
                items.append(item)
                n += len(pixels)
        return items

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queued:
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait and self._queued < self.max_batch_size:
                await asyncio.sleep(self.max_wait)
            items = self._take()
            if not items:
                continue
            batch = items[0][0] if len(items) == 1 else np.concatenate([it[0] for it in items])
            if self.on_depth:
                self.on_depth(self._queued + len(batch))
            t = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._pool, self.fn, batch)
            except Exception as e:  # fail this batch's requests only
                for it in items:
                    if not it[1].done():
                        it[1].set_exception(e)
                continue
            finally:
                if self.on_depth:
                    self.on_depth(self._queued)
            seconds = time.perf_counter() - t
            rate = len(batch) / max(seconds, 1e-6)
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            if self.on_batch:
                self.on_batch(len(batch), seconds)
            start = 0
            for pixels, fut, queued_at, *_ in items:
                if not fut.done():
                    fut.set_result((out[start:start + len(pixels)], t - queued_at, seconds))
                start += len(pixels)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded())
