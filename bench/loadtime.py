"""The time a runtime load costs (``--arg``-default settings): open the ONNX file's sessions, choose the
precision among its verified variants (timed at batch sizes 1 and 64 when there are two candidates), warm up.
What ``POST /v2/repository/models/NAME/load`` spends in each worker before it switches (README, "Models at
runtime")::

    .venv/bin/python -m bench.loadtime runs/lenet5-digits/model.onnx --rounds 5
    .venv/bin/python -m bench.loadtime runs/lenet5-digits/model.onnx --swaps 60

``--swaps N``: N hot swaps through the model registry as a worker does them (a request holding the old
version runs on it across the swap; the worker's memory settings and sweep), and the process's resident
memory as it goes: what a replaced version leaves behind.
"""

from __future__ import annotations

import argparse
import statistics
import time

from cnnserve.core.config import DEFAULTS
from cnnserve.core.runtime import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadtime", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", help="an exported model file (its variants beside it)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--swaps", type=int, default=0, help="hot swaps through the model registry instead")
    args = p.parse_args(argv)
    if args.swaps:
        return swaps(args.onnx, args.swaps)
    seconds, chosen = [], None
    for _ in range(args.rounds):
        t = time.perf_counter()
        model = load_model(args.onnx, providers=DEFAULTS.providers, threads=DEFAULTS.intra_op_threads,
                           precision=DEFAULTS.precision, batch_sizes=(1, DEFAULTS.max_batch_size))
        seconds.append(time.perf_counter() - t)
        chosen = model.choice.get("chosen", model.info.precision)
        del model
    print(f"{args.onnx}: load, precision choice ({chosen} chosen) and warm-up: median "
          f"{statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, max {max(seconds):.2f} s "
          f"over {args.rounds} rounds")
    return 0


def swaps(path: str, n: int) -> int:
    import asyncio

    import numpy as np

    from cnnserve.service.budget import rss_bytes
    from cnnserve.service.engine import Engine
    from cnnserve.service.registry import request_scope
    from cnnserve.service.memory import return_freed_memory

    return_freed_memory()  # as a server worker does at start
    engine = Engine([load_model(path, name="m", version="0", providers="cpu")])
    registry = engine.registry
    pixels = np.zeros((4, *registry.newest("m").spec.input_shape), np.uint8)

    async def run() -> None:
        for i in range(1, n + 1):
            with request_scope():
                held = engine.call("m")
                await asyncio.to_thread(registry.load, "m", str(i), path)
                await engine.run(held, pixels)  # the old version answers across the swap
            del held
            await asyncio.to_thread(registry.sweep)  # the worker's sync thread does this every 0.5 s
            if i in (1, 10) or i % 20 == 0 or i == n:
                print(f"swap {i}: resident {rss_bytes() / 2**20:.0f} MB, versions open "
                      f"{sum(map(len, registry.served.values())) + len(registry.retiring)}")

    asyncio.run(run())
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
