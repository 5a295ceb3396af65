"""Does graph simplification (onnxslim) make CPU inference faster? Measured, not assumed.

For each architecture (224 px, 1000 classes, random weights: speed does not depend on
the values) the plain export and its onnxslim-simplified twin run on onnxruntime's CPU
provider, interleaved run by run so that machine noise hits both alike. The report gives
the median latency of each and the ratio.

    .venv/bin/python -m bench.simplify [--archs resnet18 vgg16] [--batch 1] [--runs 15]

Writes bench/results/simplify-<date>-<host>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cnnserve.core.onnxmeta import INPUT, LOGITS

RESULTS = Path(__file__).resolve().parent / "results"


def _session(blob: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def measure(arch: str, batch: int, runs: int) -> dict:
    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.export.trace import simplify, to_onnx
    from cnnserve.models.registry import build_classifier, spec_for

    spec = spec_for(arch, [f"class{i}" for i in range(1000)])
    model = build_classifier(spec).eval()
    plain = to_onnx(model, ModelInfo(spec=spec))
    slim = simplify(plain)
    blobs = {"plain": plain.SerializeToString(), "onnxslim": slim.SerializeToString()}
    sessions = {k: _session(b) for k, b in blobs.items()}
    x = np.random.default_rng(0).integers(0, 256, (batch, *spec.input_shape), dtype=np.uint8)
    outs = {k: s.run([LOGITS], {INPUT: x})[0] for k, s in sessions.items()}  # warm-up, and parity
    times = {k: [] for k in sessions}
    for i in range(runs):
        for k in (("plain", "onnxslim") if i % 2 == 0 else ("onnxslim", "plain")):
            t = time.perf_counter()
            sessions[k].run([LOGITS], {INPUT: x})
            times[k].append(time.perf_counter() - t)
        print(f"  {arch}: run {i + 1}/{runs}", end="\r", flush=True)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    row = {
        "arch": arch, "batch": batch, "runs": runs,
        "nodes": {"plain": len(plain.graph.node), "onnxslim": len(slim.graph.node)},
        "median_ms": med,
        "spread_ms": {k: [min(v) * 1000, max(v) * 1000] for k, v in times.items()},
        "speedup_onnxslim": med["plain"] / med["onnxslim"],
        "max_abs_logit_diff": float(np.abs(outs["plain"] - outs["onnxslim"]).max()),
    }
    print(f"  {arch}: plain {med['plain']:.1f} ms, onnxslim {med['onnxslim']:.1f} ms "
          f"(x{row['speedup_onnxslim']:.3f}), nodes {row['nodes']['plain']} -> {row['nodes']['onnxslim']}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args(argv)
    rows = [measure(a, args.batch, args.runs) for a in args.archs]
    doc = {"what": "onnxruntime CPU latency, plain export vs onnxslim", "date": time.strftime("%Y-%m-%d"),
           "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
           "cores": __import__("os").cpu_count(), "onnxruntime": ort.__version__, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"simplify-{doc['date']}-{doc['host']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    lines = ["| model | batch | plain ms | onnxslim ms | speed-up | nodes plain -> slim |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['batch']} | {r['median_ms']['plain']:.1f} | {r['median_ms']['onnxslim']:.1f} | "
              f"x{r['speedup_onnxslim']:.3f} | {r['nodes']['plain']} -> {r['nodes']['onnxslim']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
