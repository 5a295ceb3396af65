"""What scores the images: ``local`` (threads decode while onnxruntime runs the previous batch),
``http`` (a running cnnserve service, bounded concurrency, priority=bulk, retries on 503 and
504), ``grpc`` (the same over the Open Inference Protocol's gRPC: ``grpc_engine.py``), ``ray`` (Ray Data: parallel decode and an actor pool holding onnxruntime sessions; local or
a cluster). Each yields lists of rows in input order; every engine decodes with
``cnnserve.core.preprocess`` and runs the exported graph, so all give the same answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from cnnserve.core.spec import ModelSpec

from cnnserve.core.config import Limits
from cnnserve.core.preprocess import DEFAULT_LIMITS, ImageError, preprocess, read_file
from cnnserve.core.confidence import score_rows
from cnnserve.core.runtime import Model, load_model
from . import ScoreError, row



@dataclass
class Stats:
    scored: int = 0
    failed: int = 0
    decode_s: float = 0.0  # summed over decoding workers
    infer_s: float = 0.0
    nodes: dict = field(default_factory=dict)  # ray: images scored on each node (its address)


def read_and_decode(path: str, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray | None, str, float]:
    """(pixels or None, error message, seconds) for one file, exactly as the service decodes it, under the
    same ``limits`` (``Settings.limits``). Never raises: whatever goes wrong with one file becomes that file's
    error message."""
    t = time.perf_counter()
    try:
        return preprocess(read_file(path, limits.max_bytes), spec, limits), "", time.perf_counter() - t
    except ImageError as e:
        message = str(e)
    except MemoryError:
        message = "not enough memory to decode it"
    except Exception as e:  # a failure nobody foresaw still belongs to this file alone
        message = f"{type(e).__name__}: {e}"
    return None, _without_path(message, path), time.perf_counter() - t


def _without_path(message: str, path: str) -> str:
    prefix = os.fsdecode(path) + ": "  # the row names the file already
    return message[len(prefix):] if message.startswith(prefix) else message


def decode_chunk(paths: list[str], spec: ModelSpec, limits: Limits = DEFAULT_LIMITS) -> list:
    """``read_and_decode`` for each path, in a decoding process."""
    return [read_and_decode(p, spec, limits) for p in paths]


def _decoder_init(parent: int) -> None:
    """A decoding process ignores Ctrl+C (the scorer handles it: it finishes the current batch) and
    dies with the scorer (Linux), so a scorer killed with SIGKILL leaves no decoders behind holding
    its pipes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends them
        pass
    if os.getppid() != parent:  # the scorer died before the line above took effect
        os._exit(1)


#: Fewer files than this decode in threads: starting decoding processes costs about a second, which
#: a small job does not win back (LeNet-5, 2 cores: 2,000 PNGs scored at 1,900 img/s in threads and
#: 1,500 in processes; 12,000 at 1,700-2,060 and 2,890-3,170).
PROCESSES_FROM = 5000




def score_local(paths: list[str], model: Model, top_k: int, batch_size: int, workers: int,
                stats: Stats, decoders: str = "auto", limits: Limits = DEFAULT_LIMITS) -> Iterator[list[dict]]:
    """Decode in ``workers`` processes (Pillow's Python-level work holds the GIL, so threads stop
    scaling at about one core for small images; threads below ``PROCESSES_FROM`` files), each
    taking a whole batch, ``workers + 1`` batches ahead, while the model runs the current one here."""
    import multiprocessing

    spec = model.spec
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    ahead = workers + 1
    if decoders == "threads" or (decoders == "auto" and (len(paths) < PROCESSES_FROM or workers < 2)):
        executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    else:  # spawned: no fork of a process whose onnxruntime threads are running
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_decoder_init, initargs=(os.getpid(),))
    with executor as pool:
        pending: deque = deque((c, pool.submit(decode_chunk, c, spec, limits)) for c in chunks[:ahead])
        nxt = len(pending)
        while pending:
            chunk, future = pending.popleft()
            if nxt < len(chunks):
                pending.append((chunks[nxt], pool.submit(decode_chunk, chunks[nxt], spec, limits)))
                nxt += 1
            decoded = future.result()
            stats.decode_s += sum(d[2] for d in decoded)
            good = [i for i, d in enumerate(decoded) if d[0] is not None]
            preds, oods = {}, {}
            if good:
                t = time.perf_counter()
                probs, ood_rows = score_rows(model, np.stack([decoded[i][0] for i in good]))
                stats.infer_s += time.perf_counter() - t
                preds, oods = dict(zip(good, model.top_k(probs, top_k))), dict(zip(good, ood_rows))
            yield [row(p, preds.get(i), "" if i in preds else decoded[i][1], oods.get(i)) for i, p in enumerate(chunk)]


def score_http(paths: list[str], url: str, model_name: str | None, top_k: int, batch_size: int,
               concurrency: int, stats: Stats, max_retries: int = 8,
               limits: Limits = DEFAULT_LIMITS) -> Iterator[list[dict]]:
    """Send each image to a running service (raw body, priority=bulk), ``concurrency`` at a time,
    retrying 503, 504 and connection failures with backoff (honouring Retry-After); yields rows in
    input order."""
    import httpx

    # bulk: the service fills its batches with interactive requests first, so scoring never starves them
    params = {"top_k": top_k, "priority": "bulk", **({"model": model_name} if model_name else {})}

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore, path: str) -> dict:
        try:
            data = read_file(path, limits.max_bytes)
        except ImageError as e:
            return row(path, None, _without_path(str(e), path))
        delay = 0.2
        for attempt in range(max_retries + 1):
            async with sem:
                try:
                    r = await client.post("/classify", content=data, params=params,
                                          headers={"Content-Type": "application/octet-stream"})
                except httpx.TransportError as e:
                    r, err = None, f"{type(e).__name__}: {e}"
            if r is not None and r.status_code == 200:
                return row(path, r.json()["predictions"], ood=r.json())
            if r is not None and r.status_code not in (503, 504):  # 504: a bulk request's deadline passed
                try:
                    return row(path, None, r.json().get("error", r.text))
                except ValueError:
                    return row(path, None, f"HTTP {r.status_code}: {r.text[:200]}")
            if attempt < max_retries:
                wait = float(r.headers.get("Retry-After", delay)) if r is not None else delay
                await asyncio.sleep(min(wait, 30.0))
                delay = min(delay * 2, 10.0)
        return row(path, None, f"gave up after {max_retries} retries: " +
                   (f"HTTP {r.status_code} (overloaded or past its deadline)" if r is not None else err))

    async def run_chunk(client, sem, chunk):
        return await asyncio.gather(*(one(client, sem, p) for p in chunk))

    loop = asyncio.new_event_loop()
    try:
        client = httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency))
        sem = asyncio.Semaphore(concurrency)
        yield from rows_in_order(loop, lambda chunk: run_chunk(client, sem, chunk), paths, batch_size, concurrency,
                                 stats)
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()


def rows_in_order(loop, run_chunk, paths: list[str], batch_size: int, concurrency: int,
                  stats: Stats) -> Iterator[list[dict]]:
    """A remote engine's rows, ``batch_size`` at a time, in input order: ``run_chunk(paths)`` answers a chunk
    several times the concurrency at once (so every connection stays busy) on ``loop``."""
    step = max(batch_size, 4 * concurrency)
    for i in range(0, len(paths), step):
        t = time.perf_counter()
        rows = loop.run_until_complete(run_chunk(paths[i:i + step]))
        stats.infer_s += time.perf_counter() - t
        for j in range(0, len(rows), batch_size):
            yield rows[j:j + batch_size]


class _RayScorer:
    """A Ray actor holding one onnxruntime session (one GPU per actor when CUDA is present)."""

    def __init__(self, model_bytes, providers: str, top_k: int):
        import ray

        from cnnserve.core.onnxmeta import ModelInfo

        from cnnserve.core.runtime import create_session

        if isinstance(model_bytes, ray.ObjectRef):  # the model travels through the object store
            model_bytes = ray.get(model_bytes)

        self.session = create_session(model_bytes, providers, source="ray actor")
        info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.model = Model(name=info.spec.arch, version="", info=info, session=self.session)
        self.top_k = top_k
        self.node = ray.get_runtime_context().get_node_id()  # whose batches these are: Stats.nodes

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]])
        preds = ["[]"] * len(ok)
        if ok.any():
            probs, ood_rows = score_rows(self.model, batch["pixels"][ok])
            for i, p, o in zip(np.flatnonzero(ok), self.model.top_k(probs, self.top_k), ood_rows):
                preds[i] = json.dumps({"predictions": p, **o})
        return {"path": batch["path"], "preds": np.array(preds, dtype=object), "error": batch["error"],
                "node": np.full(len(ok), self.node, dtype=object)}


def score_ray(paths: list[str], model_path: str, top_k: int, batch_size: int, workers: int, providers: str,
              address: str | None, stats: Stats, limits: Limits = DEFAULT_LIMITS) -> Iterator[list[dict]]:
    """Ray Data: read and decode in parallel tasks, an actor pool of onnxruntime sessions, results in order.
    Without ``address`` a local Ray starts with ``workers`` CPUs; with it, the run joins that cluster."""
    try:
        import ray
    except ImportError:
        raise ScoreError("the ray engine needs Ray Data: pip install 'cnnserve[scale]' (ray[data])") from None
    from cnnserve.core.runtime import CUDA, requested_providers

    model_bytes = Path(model_path).read_bytes()
    spec = load_model(model_path, providers="cpu", warm_up=False).spec
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        gpus = 1 if requested_providers(providers)[0][0] == CUDA and ray.cluster_resources().get("GPU") else 0

        def decode(batch: dict) -> dict:
            out = [read_and_decode(p, spec, limits) for p in batch["path"]]
            zeros = np.zeros(spec.input_shape, np.uint8)
            return {"path": batch["path"], "pixels": np.stack([o[0] if o[0] is not None else zeros for o in out]),
                    "error": np.array([o[1] for o in out], dtype=object)}

        # one actor (Ray Data fuses decoding into it) per GPU; on CPUs, one per CPU of a cluster joined with
        # --ray-address, so every node takes a share, or half the local CPUs (the rest decode and drive)
        resources = ray.cluster_resources()
        actors = (int(resources["GPU"]) if gpus else int(resources.get("CPU", 1)) if address
                  else workers // 2)
        actors = max(1, actors)
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(decode, batch_size=batch_size, batch_format="numpy")
        ds = ds.map_batches(_RayScorer, fn_constructor_args=(ray.put(model_bytes), providers, top_k),
                            batch_size=batch_size, batch_format="numpy", num_gpus=gpus,
                            concurrency=actors)
        names = {n["NodeID"]: f'{n["NodeManagerAddress"]}:{n["NodeManagerPort"]}' for n in ray.nodes()}
        for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            for node, count in zip(*np.unique(b["node"].astype(str), return_counts=True)):
                name = names.get(node, node[:12])
                stats.nodes[name] = stats.nodes.get(name, 0) + int(count)
            answers = [json.loads(pr) if not e else {} for pr, e in zip(b["preds"], b["error"])]
            yield [row(str(p), a.get("predictions"), str(e), a)
                   for p, a, e in zip(b["path"], answers, b["error"])]
    finally:
        if started_here:
            ray.shutdown()
