"""Decoding untrusted images in processes of their own, each image within a CPU-time budget.

Why processes: the limits of ``cnnserve.core.preprocess`` (bytes, pixels, decoded memory, chunks)
bound what an image may be, not what decoding it costs. Files within every limit took seconds of a
core each (measured: a GIF of 1-byte comment sub-blocks, 2.3 s of Python; a 7000x7000 RLE4 BMP,
2.5-5.7 s; a progressive JPEG repeating one scan 3,000 times, 17-23 s), and a thread that decodes
cannot be stopped. A process can: each image runs in a decoding process, and the process is killed
once the image has used ``decode_cpu_ms`` of CPU (measured as CPU, so a busy machine does not turn
a legitimate file into a refusal), whatever the format, including formats and tricks nobody has
thought of yet. The image is answered 413 ``decode_too_costly`` and a new process takes its place.

- **Shared memory**: each decoding process has one memory region shared with the server worker:
  the encoded file goes in, the model's uint8 input comes out, and only a few bytes of header
  travel over its pipes.
- **Priorities and fairness**: images wait in a queue per priority (interactive before bulk), and
  within one the requests take turns, image by image; so one request of 256 large images delays
  an interactive request by at most the images being decoded when it arrives.
- **Deadlines from arrival**: a request's ``timeout_ms`` holds here too. An image still waiting for
  a decoding process when it passes gets 504 at once, and so does one being decoded (its process
  finishes it within the budget and takes the next: replacing it would cost more).
- **Bounded**: at most ``max_queue`` images wait to be decoded per worker (503 beyond).

Only images too small to cost anything (``inline_decode_bytes`` and ``inline_decode_pixels``) are
decoded on the event loop instead (the engine decides); ordinary images pay the hand-off to a
process and back (measured in the README and docs/reliability.md).

One decoding process, its shared region and its pipes, and the process's own loop: ``decoder.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections import deque

import numpy as np

from cnnserve.core.config import Limits
from cnnserve.core.preprocess import ImageError
from cnnserve.core.spec import ModelSpec

from .decoder import Decoder

log = logging.getLogger("cnnserve.decode")


class DecodeFailed(Exception):
    """An image the decoding stage answers for: its HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Job:
    __slots__ = ("data", "spec", "fut", "deadline", "gone", "timer", "group", "queued_at")

    def __init__(self, data, spec, fut, deadline, gone, group) -> None:
        self.data, self.spec, self.fut, self.deadline, self.gone, self.group = data, spec, fut, deadline, gone, group
        self.timer, self.queued_at = None, time.perf_counter()


class DecodePool:
    """Decoding processes of one server worker (started on first use, ``size`` of them) and the queue
    of images waiting for them."""

    def __init__(self, size: int, limits: Limits, cpu_budget_s: float, max_queue: int, output_bytes: int) -> None:
        self.size, self.limits, self.budget, self.max_queue = size, limits, cpu_budget_s, max_queue
        self.output_bytes = self.memory_bytes = 0
        self.grow(output_bytes)
        self.idle: deque[Decoder] = deque()
        self.busy: set[Decoder] = set()
        self.started = 0
        self.queues = {"interactive": deque(), "bulk": deque()}  # of groups; a group is a deque of jobs
        self.groups: dict = {}
        self.waiting = 0
        self.killed = 0  # processes killed past their budget or their image's deadline (for the log and tests)
        self.loop: asyncio.AbstractEventLoop | None = None

    def grow(self, output_bytes: int) -> None:
        """Room for a model input of ``output_bytes`` (a larger model loaded at runtime): decoding processes
        started from now on have a region that holds it, and those with a smaller one are replaced when they are
        next picked (``_free_decoder``). Safe from a load's thread: the event loop reads the two numbers at its
        next dispatch, and the model is served only after this returns."""
        if output_bytes <= self.output_bytes:
            return
        # what a decoding process may map: its own code and libraries, the shared region, and room for
        # a few copies of the largest decoded image (the limit decoding is checked against)
        self.memory_bytes = 1024 * 2**20 + self.limits.max_bytes + output_bytes + 4 * self.limits.max_decoded_bytes
        self.output_bytes = output_bytes

    # -- the worker's side --------------------------------------------------------------------------

    async def decode(self, data: bytes, spec: ModelSpec, *, deadline: float | None = None,
                     priority: str = "interactive", gone: asyncio.Future | None = None, group=None,
                     timings: dict | None = None) -> np.ndarray:
        """``data`` decoded into ``spec``'s uint8 C x H x W in a decoding process. Raises ``ImageError``
        for a bad image (413 ``decode_too_costly`` past the budget) and ``DecodeFailed`` for 503 (too
        many waiting), 504 (deadline) and 499 (client gone). ``group``: images of one request, which take
        turns with other requests' (default: this image alone). ``timings`` gets ``decode``, ``resize``
        and ``thread`` (waiting for a process and the hand-off)."""
        if len(data) > self.limits.max_bytes:  # (the request's own limit is checked before; this is the region's)
            raise ImageError(f"the image is {len(data):,} bytes; the limit is {self.limits.max_bytes:,} "
                             "(max_request_mb)", 413, "too_large")
        if self.waiting >= self.max_queue:
            raise DecodeFailed(503, "overloaded", f"the server is at capacity ({self.waiting} images waiting to be "
                                                  "decoded); retry after 1 s", {"Retry-After": "1"})
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            raise _deadline()
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # (a server has one loop; a caller of asyncio.run a new one each time)
            self.close()
            self.loop = loop
        job = _Job(data, spec, loop.create_future(), deadline, gone, group if group is not None else object())
        if deadline is not None:
            job.timer = loop.call_later(deadline - now, self._expire, job)
        self._enqueue(job, "bulk" if priority == "bulk" else "interactive")
        self._dispatch()
        try:
            pixels, decode_s, resize_s = await job.fut
        finally:
            if job.timer is not None:
                job.timer.cancel()
            # A refused image's exception holds this frame (its traceback), and the frame held the job, whose
            # future holds the exception: a cycle that only the cyclic collector frees, so each refused body (up
            # to max_request_mb) stayed in the worker until a full collection (150 MB of them seen after a soak)
            job = data = None
        if timings is not None:
            timings["decode"], timings["resize"] = decode_s, resize_s
            timings["thread"] = max(0.0, time.perf_counter() - now - decode_s - resize_s)
        return pixels

    def _enqueue(self, job: _Job, priority: str) -> None:
        group = self.groups.get(id(job.group))
        if group is None:
            group = self.groups[id(job.group)] = deque()
            self.queues[priority].append((id(job.group), group))
        group.append(job)
        self.waiting += 1

    def _next_job(self) -> _Job | None:
        """Interactive first; within a priority, requests in turn (round robin), each image in order."""
        for priority in ("interactive", "bulk"):
            queue = self.queues[priority]
            while queue:
                key, group = queue.popleft()
                job = group.popleft()
                self.waiting -= 1
                if group:
                    queue.append((key, group))
                else:
                    del self.groups[key]
                if job.fut.done():  # expired or cancelled while it waited
                    continue
                if job.gone is not None and job.gone.done():
                    job.fut.set_exception(DecodeFailed(499, "client_closed", "the client closed the connection "
                                                       "while the image waited to be decoded; it was not decoded"))
                    continue
                return job
        return None

    def _dispatch(self) -> None:
        while self.waiting:
            decoder = self._free_decoder()
            if decoder is None:
                return
            job = self._next_job()
            if job is None:
                self.idle.append(decoder)
                return
            self._start(decoder, job)

    def _free_decoder(self) -> Decoder | None:
        while self.idle:
            decoder = self.idle.popleft()
            if decoder.size - decoder.input_bytes >= self.output_bytes:
                return decoder
            self._drop(decoder)  # its region predates a larger model (``grow``): a new process takes its place
        if self.started < self.size:
            try:
                decoder = Decoder(self.limits, self.limits.max_bytes, self.output_bytes, self.memory_bytes)
            except (OSError, ValueError) as e:  # out of memory or processes: say so, never a 500
                log.error("cannot start a decoding process: %s", e)
                if not self.started:  # none running to take the images that wait: they are answered now
                    self._fail_waiting(DecodeFailed(503, "overloaded", "the server cannot start a decoding process "
                                                    f"now ({e}); retry later", {"Retry-After": "5"}))
                return None
            self.started += 1
            self._listen(decoder)
            return decoder
        return None

    def _fail_waiting(self, error: DecodeFailed) -> None:
        while (job := self._next_job()) is not None:
            job.fut.set_exception(error)

    def _listen(self, decoder: Decoder) -> None:
        fd = decoder.proc.stdout.fileno()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable, decoder)

    def _start(self, decoder: Decoder, job: _Job) -> None:
        if job.timer is not None:  # it runs now: the deadline is watched by the budget's timer below
            job.timer.cancel()
            job.timer = None
        try:
            decoder.send(job.data, job.spec)
        except OSError:  # the process died between jobs: the image goes first to the next one
            key = object()
            self.groups[id(key)] = deque([job])
            self.queues["interactive"].appendleft((id(key), self.groups[id(key)]))
            self.waiting += 1
            self._replace(decoder, None)
            return
        decoder.job, decoder.started_at = job, time.perf_counter()
        self.busy.add(decoder)
        decoder.watch = asyncio.get_running_loop().call_later(self._wait(job, time.perf_counter()), self._check,
                                                              decoder)

    def _check(self, decoder: Decoder) -> None:
        """The job's wall-clock share is up: kill its process if its CPU budget or its deadline is spent,
        else look again when the budget could next be spent."""
        job = decoder.job
        if job is None:
            return
        now = time.perf_counter()
        if job.deadline is not None and now >= job.deadline and not job.fut.done():
            # answered now; the process finishes the image (within its budget) rather than being replaced,
            # which would cost more than the rest of most images (a new process takes a few tenths of a second)
            job.fut.set_exception(_deadline())
        if not decoder.ready:  # still starting: its budget counts from its first answer
            decoder.watch = asyncio.get_running_loop().call_later(self._wait(job, now), self._check, decoder)
            return
        cpu = decoder.cpu_seconds()
        used = (now - decoder.started_at) if cpu is None else cpu - decoder.cpu_before
        if used >= self.budget:
            self._replace(decoder, ImageError(
                f"decoding the image took more than {self.budget * 1000:,.0f} ms of CPU (decode_cpu_ms); it was "
                "stopped", 413, "decode_too_costly"))
            return
        decoder.watch = asyncio.get_running_loop().call_later(self._wait(job, now, used), self._check, decoder)

    def _wait(self, job: _Job, now: float, used: float = 0.0) -> float:
        """Until the image's budget could next be spent, or its deadline passes (if still awaited)."""
        wait = self.budget - used
        if job.deadline is not None and not job.fut.done():
            wait = min(wait, job.deadline - now)
        return max(wait, 0.01)

    def _replace(self, decoder: Decoder, error: Exception | None) -> None:
        """Kill a decoding process (past its budget or its image's deadline, or dead), fail its image with
        ``error`` (a process that died of the image: 400), and let a new process take its place."""
        self.killed += 1
        job, decoder.job = decoder.job, None
        self._drop(decoder)
        if job is not None and not job.fut.done():
            if error is None:
                error = ImageError("decoding the image ended its decoding process (the system may have killed it, "
                                   "for memory)", 400, "bad_image")
            job.fut.set_exception(error)
        self._dispatch()

    def _drop(self, decoder: Decoder) -> None:
        self.busy.discard(decoder)
        try:
            self.idle.remove(decoder)
        except ValueError:
            pass
        watch = getattr(decoder, "watch", None)
        if watch is not None:
            watch.cancel()
        try:
            asyncio.get_running_loop().remove_reader(decoder.proc.stdout.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        decoder.close()
        self.started -= 1
        # reap it without waiting here (a killed process is gone in a moment)
        asyncio.get_running_loop().run_in_executor(None, decoder.proc.wait)

    def _readable(self, decoder: Decoder) -> None:
        answers = decoder.answers()
        if answers is None:  # the process is gone (killed by the system, out of memory...)
            self._replace(decoder, None)
            return
        for answer in answers:
            self._answered(decoder, *answer)

    def _answered(self, decoder, number, status, message, cpu, decode_s, resize_s) -> None:
        decoder.cpu_before = cpu
        if number == 0:  # started: an image it already holds has its clock start now
            decoder.ready, decoder.started_at = True, time.perf_counter()
            return
        job, decoder.job = decoder.job, None
        if decoder.watch is not None:
            decoder.watch.cancel()
        if job is not None and number == decoder.numbers and not job.fut.done():
            if status == 0:
                c, h, w = job.spec.input_shape
                offset = decoder.input_bytes
                pixels = np.frombuffer(decoder.region, np.uint8, c * h * w, offset).reshape(c, h, w).copy()
                job.fut.set_result((pixels, decode_s, resize_s))
            else:
                code, _, text = message.partition("\t")
                job.fut.set_exception(ImageError(text, status, code))
        self.busy.discard(decoder)
        self.idle.append(decoder)
        self._dispatch()

    def _expire(self, job: _Job) -> None:
        """A waiting image's deadline passed (one being decoded is watched by ``_check``)."""
        if not job.fut.done():
            job.fut.set_exception(_deadline())

    def close(self) -> None:
        """Stop every decoding process; images still waiting fail (a new ``decode`` starts afresh)."""
        for decoder in [*self.idle, *self.busy]:
            if self.loop is not None and not self.loop.is_closed():
                try:
                    self.loop.remove_reader(decoder.proc.stdout.fileno())
                except (ValueError, OSError, RuntimeError):
                    pass
            decoder.close()
            try:
                decoder.proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
            if decoder.job is not None and not decoder.job.fut.done() and not decoder.job.fut.get_loop().is_closed():
                decoder.job.fut.set_exception(DecodeFailed(503, "overloaded", "the server is stopping"))
        self.idle.clear()
        self.busy.clear()
        self.started, self.waiting = 0, 0
        self.queues = {"interactive": deque(), "bulk": deque()}
        self.groups = {}


def _deadline() -> DecodeFailed:
    return DecodeFailed(504, "deadline_exceeded", "the request's deadline (timeout_ms) passed before its image "
                                                  "was decoded; the model did not run it")


