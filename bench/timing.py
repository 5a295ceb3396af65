"""In-process timing shared by the harness's sections and its GPU mode."""

from __future__ import annotations

import statistics
import time


def timed(fn, batch: int, seconds: float, repeats: int) -> dict:
    """Images/s of ``fn()`` processing ``batch`` images: median of ``repeats`` runs of ~``seconds``."""
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            fn()
            n += 1
        rates.append(n * batch / elapsed)
    return {"batch": batch, "images_per_s": statistics.median(rates), "spread": [min(rates), max(rates)],
            "latency_ms": 1000 * batch / statistics.median(rates)}
