"""The time a runtime load costs (``--arg``-default settings): open the ONNX file's sessions, choose the
precision among its verified variants (timed at batch sizes 1 and 64 when there are two candidates), warm up.
What ``POST /v2/repository/models/NAME/load`` spends in each worker before it switches (README, "Models at
runtime")::

    .venv/bin/python -m cnnserve.bench.loadtime runs/lenet5-digits/model.onnx --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from cnnserve.core.config import DEFAULTS
from cnnserve.core.runtime import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnserve.bench.loadtime", description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", help="an exported model file (its variants beside it)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
