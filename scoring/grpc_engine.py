"""The ``grpc`` engine of batch scoring: each image to a running cnnserve service over the Open Inference
Protocol's gRPC (``ModelInfer``, the file as a one-element BYTES input named ``image``, Triton's
classification extension for the top k with labels), ``concurrency`` calls at a time on one HTTP/2
connection, priority ``bulk``; RESOURCE_EXHAUSTED (overloaded: after the server's retry hint),
DEADLINE_EXCEEDED and UNAVAILABLE are retried with backoff, like the ``http`` engine's 503 and 504."""

from __future__ import annotations

import asyncio
from typing import Iterator

from cnnserve.core.grpc_proto import path, pb
from cnnserve.core.onnxmeta import PROBABILITIES
from cnnserve.core.preprocess import DEFAULT_LIMITS, ImageError, read_file

from . import row
from .engines import rows_in_order

RETRIED = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def target_of(url: str) -> str:
    """``grpc://host:port`` or ``host:port`` as gRPC's target."""
    return url.removeprefix("grpc://").rstrip("/")


def served_classes(url: str, model_name: str | None) -> int:
    """The model's number of classes, from its metadata (the probabilities' last dimension)."""
    import grpc

    with grpc.insecure_channel(target_of(url)) as channel:
        call = channel.unary_unary(path("ModelMetadata"), request_serializer=pb.ModelMetadataRequest.SerializeToString,
                                   response_deserializer=pb.ModelMetadataResponse.FromString)
        meta = call(pb.ModelMetadataRequest(name=model_name or ""), timeout=30)
    return int(next(o.shape[-1] for o in meta.outputs if o.name == PROBABILITIES))


def predictions(response) -> list[dict]:
    """The classification output ("value:index:label" elements) as the rows' predictions."""
    raw, preds, pos = response.raw_output_contents[0], [], 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "little")
        value, index, label = raw[pos + 4:pos + 4 + n].decode().split(":", 2)
        preds.append({"label": label, "index": int(index), "probability": float(value)})
        pos += 4 + n
    return preds


def score_grpc(paths: list[str], url: str, model_name: str | None, top_k: int, batch_size: int,
               concurrency: int, stats, max_retries: int = 8, timeout_s: float = 120.0,
               limits=DEFAULT_LIMITS) -> Iterator[list[dict]]:
    """Rows in input order, ``batch_size`` at a time (see the module's docstring)."""
    import grpc

    async def one(infer, sem: asyncio.Semaphore, file: str) -> dict:
        try:
            data = read_file(file, limits.max_bytes)
        except ImageError as e:
            return row(file, None, str(e).replace(file, "").strip(": ") or str(e))
        req = pb.ModelInferRequest(model_name=model_name or "")
        req.inputs.add(name="image", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
        req.parameters["priority"].string_param = "bulk"
        req.outputs.add(name=PROBABILITIES).parameters["classification"].int64_param = top_k
        delay, last = 0.2, ""
        for attempt in range(max_retries + 1):
            async with sem:
                try:
                    return row(file, predictions(await infer(req, timeout=timeout_s)))
                except grpc.aio.AioRpcError as e:
                    code, details = e.code().name, e.details() or ""
                    last = f"{code}: {details}"
                    hint = dict(e.trailing_metadata() or ()).get("retry-after")
            if code not in RETRIED:
                return row(file, None, details or last)
            if attempt < max_retries:
                await asyncio.sleep(min(float(hint) if hint else delay, 30.0))
                delay = min(delay * 2, 10.0)
        return row(file, None, f"gave up after {max_retries} retries: {last}")

    async def run_chunk(infer, sem, chunk):
        return await asyncio.gather(*(one(infer, sem, p) for p in chunk))

    async def connect():
        channel = grpc.aio.insecure_channel(target_of(url), options=[("grpc.max_send_message_length", -1)])
        return channel, channel.unary_unary(path("ModelInfer"), request_serializer=pb.ModelInferRequest.SerializeToString,
                                            response_deserializer=pb.ModelInferResponse.FromString)

    loop = asyncio.new_event_loop()
    try:
        channel, infer = loop.run_until_complete(connect())
        sem = asyncio.Semaphore(concurrency)
        yield from rows_in_order(loop, lambda chunk: run_chunk(infer, sem, chunk), paths, batch_size, concurrency,
                                 stats)
        loop.run_until_complete(channel.close())
    finally:
        loop.close()
