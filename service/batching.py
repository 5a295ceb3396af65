"""An in-process micro-batcher: concurrent requests share one onnxruntime run.

Not BentoML's adaptive batching, which answered 503 and 500 under load here (docs/serving.md says
how). This batcher is an asyncio queue drained by one task that runs the model in a worker thread:

- greedy dynamic batching: when the model is free, everything queued (up to
  ``max_batch_size`` images) becomes the next batch. Under light load a request runs
  at once (no added latency); under heavy load batches grow by themselves while the
  previous batch runs. ``max_wait_ms`` optionally holds a batch open to fill it. A request
  of more images than a batch holds is run in several batches, in order.
- two priorities: ``interactive`` requests fill a batch first; ``bulk`` work (batch scoring,
  explanations: an occlusion map is up to ``max_occlusions`` images) takes what room is left,
  **and never more than one slice**: ``bulk_slice()`` images, as many as the model runs in
  ``bulk_slice_ms`` by its measured time per image (at least one in a batch of bulk work alone,
  possibly none beside interactive requests). Batches run one at a time (``in_flight`` at a
  time where asked, on a GPU), so an interactive request that arrives while bulk work runs
  waits for at most one slice (per run in flight) before it is in the next batch; bulk work
  yields between slices instead of holding the model for the whole of a large request (a
  64-image occlusion batch of a 224-px model once held its model for seconds, and interactive
  requests waited behind it).
- jobs: a request may name another function than the model's usual run (a CAM pass, which
  asks for feature maps); it shares the queue, priorities, limits and deadlines, and is
  batched only with requests of the same job.
- bounded: more than ``max_queue`` images waiting and ``submit`` raises ``Overloaded``
  with a Retry-After estimate from the measured throughput (the service answers 503),
  so overload sheds quickly instead of queueing into time-outs. Bulk work may fill half.
- a request whose client went away, or whose deadline passed, is dropped before its next
  slice runs; a failing run fails only the requests in that batch.
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
    """The request's deadline passed before its batch could start; it was not run (or not all of it)."""


class ClientGone(Exception):
    """The request's client disconnected while it waited; it was not run (or not all of it)."""


class _Item:
    """One request in the queue: its images, how many have been handed to a batch (``sent``) and the
    results of those that ran, in order."""

    __slots__ = ("pixels", "fut", "queued_at", "deadline", "gone", "timer", "job", "bulk", "sent", "parts",
                 "done", "started", "seconds", "marks")

    def __init__(self, pixels, fut, queued_at, deadline, gone, timer, job, bulk) -> None:
        self.pixels, self.fut, self.queued_at, self.deadline, self.gone = pixels, fut, queued_at, deadline, gone
        self.timer, self.job, self.bulk = timer, job, bulk
        # parts: (first row, rows) of each run that carried some of it (runs in flight may end out of order)
        self.sent, self.parts, self.done, self.started, self.seconds = 0, [], 0, None, 0.0
        self.marks = None  # a traced request's times (service/telemetry.py)

    @property
    def left(self) -> int:
        return len(self.pixels) - self.sent


class MicroBatcher:
    """Greedy dynamic batches over two queues: ``interactive`` requests fill a batch first, ``bulk``
    ones take the room left, at most ``bulk_slice()`` images a batch. Each request may carry a deadline
    (``time.perf_counter()`` seconds) by which its (next) batch must start, and a ``gone`` future that is
    done once its client has disconnected; neither kind is run further."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_queue: int,
                 max_wait_ms: float, on_batch: Callable[[int, float], None] | None = None, name: str = "model",
                 on_depth: Callable[[int], None] | None = None, bulk_slice_ms: float = 50.0,
                 seconds_per_image: float = 0.0, fixed_slice: int | None = None, in_flight: int = 1,
                 on_execution: Callable[[int, float, float, float], None] | None = None):
        """``on_batch(images, seconds)`` after each run; ``on_execution(images, stacking, seconds, splitting)``
        too, with the seconds spent stacking the requests' images into the batch and splitting its rows back; ``on_depth(images)`` with the images waiting for or in
        the model, as each batch starts and ends (the autoscaling metric: cheap, and fresh under load).
        ``bulk_slice_ms``: see ``bulk_slice``; ``seconds_per_image``: the model's time per image measured in
        its warm-up (the first estimate); ``fixed_slice``: a slice of that many images whatever the time.
        ``in_flight``: batches run at once (each in its own thread; on a GPU, one batch's copies overlap
        another's compute); the next batch is taken only when a run is free, so it is as full as it can be."""
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000
        self.max_queue, self.on_batch, self.on_depth, self.name = max_queue, on_batch, on_depth, name
        self.on_execution = on_execution
        self.bulk_slice_s, self.fixed_slice = bulk_slice_ms / 1000, fixed_slice
        self._queues: dict[str, deque] = {p: deque() for p in PRIORITIES}
        self._queued, self._bulk_queued = 0, 0  # images waiting (not yet in a running batch), and bulk ones
        self._wake, self._task = None, None  # asyncio.Event and the drain's task, made on first use
        self.in_flight = in_flight
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix=f"infer-{name}")
        self._running = 0  # images in runs now
        self._runs: set[asyncio.Task] = set()  # runs in flight beside the drain (in_flight > 1)
        self._rate = 0.0  # images per second, smoothed, for Retry-After
        self._per_image = seconds_per_image  # seconds per image, smoothed (warm-up's figure at first)
        self._bulk_blocked = False  # the bulk queue's head waits for a batch of its own job

    async def submit(self, pixels: np.ndarray, timings: dict | None = None, *, deadline: float | None = None,
                     priority: str = "interactive", gone: asyncio.Future | None = None,
                     job: Callable | None = None, marks: dict | None = None):
        """Run ``pixels`` (N x C x H x W) in shared batches; returns this request's N result rows (for a
        ``job`` returning several arrays, the N rows of each).

        ``timings``, if given, gets ``queue`` (seconds until its first batch started) and ``inference``
        (seconds of the runs that carried these images). Raises ``Overloaded`` when the queue is full
        (bulk requests may fill half of it, so interactive ones always find room) and ``DeadlineExceeded``
        when ``deadline`` passes before its (next) batch starts. ``marks`` (a traced or JSON-logged request's,
        ``telemetry.RequestRecord.marks``) gets ``queued`` and ``started``, and from each run that carries it
        ``run`` (the first start), ``ran`` (the last end) and ``batch`` (the largest batch's images)."""
        n = len(pixels)
        bulk = priority == "bulk"
        self.check_room(n, priority)
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
        item = _Item(pixels, fut, now, deadline, gone, timer, job, bulk)
        if marks is not None:
            item.marks = marks
            marks.setdefault("queued", now)
        self._queues["bulk" if bulk else "interactive"].append(item)
        self._queued += n
        if bulk:
            self._bulk_queued += n
        self._wake.set()
        try:
            rows = await fut
        finally:
            if timer is not None:
                timer.cancel()
            if item.left:  # failed or cancelled part-way: its images still queued are not counted
                self._forget(item)
            if marks is not None and item.started is not None:
                marks.setdefault("started", item.started)
            # a failed request's exception holds every frame it passed (its body's too): no cycle (decoding.py)
            started, seconds, fut, item, timer = item.started, item.seconds, None, None, None
        if timings is not None:
            timings["queue"], timings["inference"] = started - now, seconds
        return rows

    def check_room(self, n: int, priority: str = "interactive") -> None:
        """``Overloaded`` unless ``n`` more images of ``priority`` fit in the queue now (a request that will
        make its images asks before it spends anything on them)."""
        if self._queued + n > self.max_queue or (priority == "bulk" and self._bulk_queued + n > self.max_queue // 2):
            raise Overloaded(self._queued, self.retry_after())

    def retry_after(self) -> int:
        return max(1, math.ceil(self._queued / self._rate)) if self._rate > 0 else 1

    def bulk_slice(self, beside_interactive: bool = False) -> int:
        """Images of bulk work one batch may carry: what the model runs in ``bulk_slice_ms`` at its measured
        time per image, at most ``max_batch_size``; at least 1 in a batch of its own (so bulk work goes on),
        possibly 0 beside interactive requests (a model slower than that per image then never makes an
        interactive request wait for a bulk image in its own batch)."""
        if self.fixed_slice:
            return min(self.fixed_slice, self.max_batch_size)
        if self._per_image <= 0:
            return self.max_batch_size
        fits = min(self.max_batch_size, int(self.bulk_slice_s / self._per_image))
        return fits if beside_interactive else max(1, fits)

    def describe(self) -> dict:
        """How batches are formed now (``/models``): the bulk slice and the measurement it comes from."""
        return {"max_batch_size": self.max_batch_size, "bulk_slice": self.bulk_slice(),
                "bulk_slice_ms": self.bulk_slice_s * 1000, "ms_per_image": round(self._per_image * 1000, 4),
                "queued": self._queued}

    def _forget(self, item: _Item) -> None:
        """Take what is left of a request that will not run further off the counts (it stays in its
        queue until ``_take`` meets it, and is skipped there)."""
        left, item.sent = item.left, len(item.pixels)
        self._queued -= left
        if item.bulk:
            self._bulk_queued -= left

    def _take(self) -> list[tuple[_Item, int, int]]:
        """The next batch: (request, first image, end) pieces, interactive first, then bulk up to a slice;
        all of one job. A request larger than the room left gives a piece and stays at its queue's head."""
        pieces: list = []
        n, now, job = 0, time.perf_counter(), ...
        # bulk work of another job than the interactive batches (a CAM pass among classifications) got no
        # room last time: this batch is its own, or it would wait for a moment without interactive work
        order = PRIORITIES[::-1] if self._bulk_blocked else PRIORITIES
        self._bulk_blocked = False
        for priority in order:
            queue = self._queues[priority]
            room = self.max_batch_size - n
            if priority == "bulk":  # a slice; beside interactive requests only what fits in bulk_slice_ms
                room = min(room, self.bulk_slice() if n == 0 else self.bulk_slice(beside_interactive=True))
            while queue and room > 0:
                item = queue[0]
                if item.left == 0 or item.fut.done():  # finished with, failed, cancelled or expired
                    queue.popleft()
                    if item.left:
                        self._forget(item)
                    continue
                if item.gone is not None and item.gone.done():  # the client disconnected while it waited
                    queue.popleft()
                    self._forget(item)
                    item.fut.set_exception(ClientGone())
                    continue
                if item.deadline is not None and now >= item.deadline:
                    queue.popleft()
                    self._forget(item)
                    _expire(item.fut)
                    continue
                if job is not ... and item.job is not job:
                    self._bulk_blocked |= priority == "bulk"
                    break  # another job: it starts a batch of its own, in its turn
                job = item.job
                take = min(item.left, room)
                pieces.append((item, item.sent, item.sent + take))
                item.sent += take
                self._queued -= take
                if item.bulk:
                    self._bulk_queued -= take
                if item.started is None:
                    item.started = now
                    if item.timer is not None:
                        item.timer.cancel()  # it runs now: its answer comes whatever the clock says
                        item.timer = None
                n += take
                room -= take
                if item.left == 0:
                    queue.popleft()
        return pieces

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.in_flight)
        while True:
            if not self._queued:
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait and self._queued < self.max_batch_size:
                await asyncio.sleep(self.max_wait)
            await free.acquire()  # a run is free: only now is the batch formed, from everything queued
            pieces = self._take()
            if not pieces:
                free.release()
                continue
            formed = time.perf_counter()
            if len(pieces) == 1:
                item, a, b = pieces[0]
                batch = item.pixels if (a, b) == (0, len(item.pixels)) else item.pixels[a:b]
            else:
                batch = np.concatenate([item.pixels[a:b] for item, a, b in pieces])
            run = self._run(loop, pieces, batch, free, time.perf_counter() - formed)
            if self.in_flight == 1:
                await run
            else:
                task = loop.create_task(run)
                self._runs.add(task)
                task.add_done_callback(self._runs.discard)

    async def _run(self, loop, pieces: list, batch: np.ndarray, free: asyncio.Semaphore,
                   stacking: float = 0.0) -> None:
        """Run one batch in the pool and hand each request its rows; a failing run fails its requests only."""
        fn = pieces[0][0].job or self.fn
        self._running += len(batch)
        if self.on_depth:
            self.on_depth(self._queued + self._running)
        t = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._pool, fn, batch)
        except Exception as e:  # fail this batch's requests only
            for item, _, _ in pieces:
                if not item.fut.done():
                    item.fut.set_exception(e)
            return
        finally:
            self._running -= len(batch)
            free.release()
            if self.on_depth:
                self.on_depth(self._queued + self._running)
        done = time.perf_counter()
        seconds = done - t
        self._measured(len(batch), seconds)
        start = 0
        for item, a, b in pieces:
            if not item.fut.done():
                item.seconds += seconds
                if item.marks is not None:
                    _mark(item.marks, t, done, len(batch))
                item.parts.append((a, _rows(out, start, start + b - a)))
                item.done += b - a
                if item.done == len(item.pixels):
                    item.fut.set_result(_joined([rows for _, rows in sorted(item.parts, key=lambda p: p[0])]))
            start += b - a
        if self.on_execution:
            self.on_execution(len(batch), stacking, seconds, time.perf_counter() - done)

    def _measured(self, n: int, seconds: float) -> None:
        rate = n / max(seconds, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        per_image = seconds / max(n, 1)
        self._per_image = per_image if self._per_image == 0 else 0.8 * self._per_image + 0.2 * per_image
        if self.on_batch:
            self.on_batch(n, seconds)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._runs):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _mark(marks: dict, start: float, end: float, n: int) -> None:
    marks.setdefault("run", start)
    marks["ran"] = end
    marks["batch"] = max(marks.get("batch", 0), n)


def _rows(out, a: int, b: int):
    """Rows ``a:b`` of a run's output (one array, or a list of arrays for a job with several outputs)."""
    return [o[a:b] for o in out] if isinstance(out, (list, tuple)) else out[a:b]


def _joined(parts: list):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], list):
        return [np.concatenate(column) for column in zip(*parts)]
    return np.concatenate(parts)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded())
