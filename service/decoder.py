"""One decoding process (``decoding.py`` says why there are processes): the worker's handle on it (its
shared memory region, the jobs and answers over its pipes, its CPU time) and, run as
``python -m cnnserve.service.decoder LIMITS FD SIZE ...``, the process's own loop. The worker starts them;
nothing else should.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from cnnserve.core.config import Limits
from cnnserve.core.preprocess import ImageError, preprocess
from cnnserve.core.spec import ModelSpec

#: A job (worker -> decoding process): its number, the image's bytes in the shared region, the spec's length.
JOB = struct.Struct("<QII")
#: An answer (decoding process -> worker): the job's number, 0 or an HTTP status, the message's length, the
#: process's CPU seconds so far, and the seconds spent decoding and resizing.
ANSWER = struct.Struct("<QHIddd")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Decoder:
    """One decoding process, its shared region and its pipes: ``send`` hands it an image, ``answers`` reads
    what it said."""

    def __init__(self, limits: Limits, input_bytes: int, output_bytes: int, memory_bytes: int) -> None:
        self.input_bytes, self.size = input_bytes, input_bytes + output_bytes
        self.fd = _shared_fd(self.size)
        try:
            self.region = mmap.mmap(self.fd, self.size)
            # the same modules as this process (the checkout's or the installed ones), one thread for any library
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps({**asdict(limits), "formats": sorted(limits.formats)}),
                 str(self.fd), str(self.size), str(input_bytes), str(memory_bytes), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self.fd,), env=env, cwd=os.getcwd())
        except BaseException:
            os.close(self.fd)
            raise
        self.ready = False  # its first answer (job 0) says it has started and how much CPU that took
        self.cpu_before = 0.0  # the process's CPU seconds when its current job began (from its last answer)
        self.job = None  # the decoding.DecodePool job being decoded
        self.started_at = 0.0
        self.numbers = 0
        self.buffer = b""
        self.watch: asyncio.TimerHandle | None = None
        self.specs: dict = {}

    def send(self, data: bytes, spec: ModelSpec) -> None:
        """Hand the process its next image: the bytes into the shared region, the job and what decoding needs of
        ``spec`` over its pipe. ``OSError`` where the process has died."""
        key = self.specs.get(spec)
        if key is None:  # what decoding needs of it (not the labels)
            key = self.specs[spec] = replace(spec, labels=()).to_json().encode()
        n = len(data)
        self.region[:n] = data
        self.numbers += 1
        os.write(self.proc.stdin.fileno(), JOB.pack(self.numbers, n, len(key)) + key)

    def answers(self) -> list[tuple] | None:
        """The answers complete on the process's pipe so far, each (number, status, message, CPU seconds,
        decode and resize seconds); None once the pipe is closed (the process is gone)."""
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            return None
        self.buffer += chunk
        answers = []
        while len(self.buffer) >= ANSWER.size:
            number, status, length, cpu, decode_s, resize_s = ANSWER.unpack_from(self.buffer)
            if len(self.buffer) < ANSWER.size + length:
                break
            message = self.buffer[ANSWER.size:ANSWER.size + length].decode("utf-8", "replace")
            self.buffer = self.buffer[ANSWER.size + length:]
            answers.append((number, status, message, cpu, decode_s, resize_s))
        return answers

    def cpu_seconds(self) -> float | None:
        """CPU the process has used (user + system), from /proc; None where there is none."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            return (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            return None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.region.close()
        except (BufferError, ValueError):
            pass
        os.close(self.fd)


def _shared_fd(size: int) -> int:
    """A file descriptor of ``size`` bytes of shared memory that a child process can map (memfd on Linux,
    else an unlinked temporary file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cnnserve-decode")  # passed to the decoding process by pass_fds alone
    else:  # pragma: no cover
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    os.ftruncate(fd, size)
    return fd


# -- the decoding process's side -------------------------------------------------------------------------

def _serve(limits: Limits, fd: int, size: int, input_bytes: int, memory_bytes: int, parent: int) -> None:
    """Decode the jobs that arrive on stdin until it closes; answer on stdout (nothing else is written
    there: prints and warnings go to stderr)."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl+C; this process dies with it
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed pipe ends it
        pass
    if os.getppid() != parent:
        os._exit(1)
    try:  # what decoding may allocate past the checks stays in this process
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ValueError, OSError):
        pass
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    jobs = os.fdopen(0, "rb", buffering=0)
    region = mmap.mmap(fd, size)
    specs: dict[bytes, ModelSpec] = {}
    out.write(ANSWER.pack(0, 0, 0, time.process_time(), 0.0, 0.0))  # started

    def read(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = jobs.read(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    while True:
        try:
            number, n, spec_length = JOB.unpack(read(JOB.size))
            key = read(spec_length)
        except EOFError:
            return
        spec = specs.get(key)
        if spec is None:
            spec = specs[key] = ModelSpec.from_json(key.decode())
        timings: dict = {}
        status, message = 0, ""
        try:
            pixels = preprocess(bytes(region[:n]), spec, limits, timings)
            region[input_bytes:input_bytes + pixels.nbytes] = pixels.tobytes()
        except ImageError as e:
            status, message = e.status, f"{e.code}\t{e}"
        except MemoryError:
            status, message = 413, "too_large_decoded\tnot enough memory to decode the image"
        except Exception as e:  # noqa: BLE001 - whatever goes wrong with one image is that image's answer
            status, message = 400, f"bad_image\tthe image cannot be decoded: {type(e).__name__}: {str(e)[:200]}"
        text = message.encode("utf-8", "replace")
        out.write(ANSWER.pack(number, status, len(text), time.process_time(), timings.get("decode", 0.0),
                              timings.get("resize", 0.0)) + text)


if __name__ == "__main__":
    _limits = json.loads(sys.argv[1])
    _limits["formats"] = frozenset(_limits["formats"])
    _serve(Limits(**_limits), *map(int, sys.argv[2:7]))
