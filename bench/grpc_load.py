"""gRPC against HTTP on one server, same run: closed-loop clients sending the same Open Inference Protocol
request (a uint8 pixels tensor, binary) over HTTP (``POST /v2/models/NAME/infer`` with the binary tensor
extension, aiohttp, one kept-alive connection per client) and over gRPC (``ModelInfer`` with
``raw_input_contents``, grpc.aio, one channel per client: SO_REUSEPORT spreads connections, not calls, so
clients sharing one channel would all land on one worker). Loopback only, bounded in time::

    python -m bench.grpc_load --http 127.0.0.1:3000 --grpc 127.0.0.1:3001 --model lenet5-digits \\
        --shape 1 28 28 --clients 1 64 --duration 10

Prints one JSON object: per protocol and client count, requests, req/s, latency percentiles, failures.
Run it as its own process, so its CPU use is not the server's (on a 2-core machine it shares the cores
with the server all the same: the figures are of this machine, client included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from cnnserve.core.onnxmeta import INPUT, PROBABILITIES

from .load import percentiles


def http_request(model: str, pixels: np.ndarray) -> tuple[str, bytes, dict]:
    head = json.dumps({"inputs": [{"name": INPUT, "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": pixels.nbytes}}],
                       "outputs": [{"name": PROBABILITIES}]}).encode()
    return (f"/v2/models/{model}/infer", head + pixels.tobytes(),
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})


async def run_http(target: str, model: str, pixels: np.ndarray, clients: int, warmup: float, duration: float):
    import aiohttp

    path, body, headers = http_request(model, pixels)
    url = f"http://{target}{path}"
    return await _closed_loop(clients, warmup, duration, lambda: aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1)), lambda s: _http_call(s, url, body, headers))


async def _http_call(session, url, body, headers) -> bool:
    import aiohttp

    try:
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):  # a failure to count, as gRPC's are
        return False


async def run_grpc(target: str, model: str, pixels: np.ndarray, clients: int, warmup: float, duration: float):
    import grpc

    from cnnserve.core.grpc_proto import path, pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=INPUT, datatype="UINT8", shape=list(pixels.shape))
    req.raw_input_contents.append(pixels.tobytes())
    req.outputs.add(name=PROBABILITIES)
    body = req.SerializeToString()

    class Channel:
        def __init__(self) -> None:
            self.channel = grpc.aio.insecure_channel(target)
            self.call = self.channel.unary_unary(path("ModelInfer"))

        async def close(self) -> None:
            await self.channel.close()

    async def call(c: Channel) -> bool:
        try:
            await c.call(body, timeout=30)
            return True
        except grpc.aio.AioRpcError:
            return False

    return await _closed_loop(clients, warmup, duration, Channel, call)


async def _closed_loop(clients: int, warmup: float, duration: float, connect, call) -> dict:
    latencies: list[float] = []
    failed = 0
    t_start = time.perf_counter()
    t_record, t_end = t_start + warmup, t_start + warmup + duration

    async def client() -> None:
        nonlocal failed
        conn = connect()
        try:
            while True:
                t = time.perf_counter()
                if t >= t_end:
                    return
                ok = await call(conn)
                if t >= t_record:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        failed += 1
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"clients": clients, "requests": len(latencies), "failed": failed,
            "req_per_s": round(len(latencies) / duration, 1),
            **{k: round(v, 2) for k, v in percentiles(latencies).items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", required=True, help="HOST:PORT of the service's HTTP")
    p.add_argument("--grpc", required=True, help="HOST:PORT of its gRPC")
    p.add_argument("--model", required=True)
    p.add_argument("--shape", type=int, nargs=3, required=True, help="C H W of the model's input")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1, help="alternate the protocols this many times")
    a = p.parse_args(argv)
    for host in (a.http, a.grpc):
        if not host.split(":")[0] in ("127.0.0.1", "localhost", "[::1]"):
            p.error("loopback targets only")
    pixels = np.random.default_rng(0).integers(0, 256, (1, *a.shape), dtype=np.uint8)
    results = []
    for n in a.clients:
        for _ in range(a.rounds):
            for name, fn, target in (("http", run_http, a.http), ("grpc", run_grpc, a.grpc)):
                out = asyncio.run(fn(target, a.model, pixels, n, a.warmup, a.duration))
                results.append({"protocol": name, **out})
    print(json.dumps({"model": a.model, "shape": a.shape, "duration_s": a.duration, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- the harness's ``grpc`` section (``cnnserve bench --sections grpc``) -----------------------------------

def section(w: dict, srv, clients, duration: float, warmup: float, rounds: int, log=print) -> dict:
    """HTTP against gRPC on ``srv`` (the service with the workload's settings), same run: this module as its
    own process, the protocols alternated ``rounds`` times at each client count. Per protocol and count:
    the median req/s over the rounds, their spread, the median p50/p99, failures. One process's grpc.aio
    channels limit large tensors at many clients (ResNet-18's 150 KB at 64: ~120 calls/s, docs/grpc.md)."""
    import statistics
    import subprocess
    import sys

    name = w["tag"].split(":")[0]
    argv = [sys.executable, "-m", __name__, "--http", srv.url.removeprefix("http://"), "--grpc", srv.grpc_target,
            "--model", name, "--shape", *map(str, w["spec"].input_shape), "--clients", *map(str, clients),
            "--duration", str(duration), "--warmup", str(warmup), "--rounds", str(rounds)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
                         timeout=len(clients) * rounds * 2 * (duration + warmup + 60))  # `-m bench...` from the checkout
    runs = json.loads(out.stdout)["results"]
    rows = []
    for n in clients:
        for protocol in ("http", "grpc"):
            mine = [r for r in runs if r["protocol"] == protocol and r["clients"] == n]
            rates = [r["req_per_s"] for r in mine]
            rows.append({"protocol": protocol, "clients": n, "rounds": len(mine), "duration_s": duration,
                         "throughput_rps": statistics.median(rates), "spread": [min(rates), max(rates)],
                         # no answer in a run: its latency is not measured (NaN), not 0
                         "p50_ms": statistics.median(r.get("p50", float("nan")) for r in mine),
                         "p99_ms": statistics.median(r.get("p99", float("nan")) for r in mine),
                         "failures": sum(r["failed"] for r in mine)})
            x = rows[-1]
            log(f"{w['name']}: {protocol} infer x{n}: {x['throughput_rps']:.0f} req/s (median of {len(mine)}, "
                f"{x['spread'][0]:.0f}-{x['spread'][1]:.0f}), p99 {x['p99_ms']:.1f} ms, failures {x['failures']}")
    return {"model": name, "input": list(w["spec"].input_shape), "rows": rows}


def report_lines(name: str, g: dict) -> list[str]:
    lines = [f"{name} (`{g['model']}`, a uint8 tensor of {'x'.join(map(str, g['input']))} per call):", "",
             "| clients | protocol | rounds x s | req/s (median) | spread | p50 ms | p99 ms | failures | gRPC / HTTP |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(x["clients"], x["protocol"]): x for x in g["rows"]}
    for x in g["rows"]:
        http = by.get((x["clients"], "http"))
        ratio = (f"{x['throughput_rps'] / http['throughput_rps']:.2f}"
                 if x["protocol"] == "grpc" and http and http["throughput_rps"] else "")
        lines.append(f"| {x['clients']} | {x['protocol']} | {x['rounds']} x {x['duration_s']:.0f} | "
                     f"{x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | {x['p50_ms']:.1f} | "
                     f"{x['p99_ms']:.1f} | {x['failures']} | {ratio} |")
    return lines + [""]
