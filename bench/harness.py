"""The benchmark harness: cnnserve measured side by side with what users would run instead.

``cnnserve bench`` (or ``python -m bench.harness``) runs, on one machine and in one go,
for LeNet-5 (28x28 PNGs) and ResNet-18 (224x224 JPEGs):

1. PyTorch eager in-process (what a user who skips ONNX would run), batches 1, 8, 32;
2. onnxruntime in-process on pre-decoded tensors, batches 1, 8, 32, 128 (the serving ceiling);
3. the cnnserve service over HTTP (real ``bentoml serve``, load from a separate process,
   loopback, one-image multipart uploads): throughput, p50/p95/p99, errors and 503s, mean
   batch size formed, and where each request's time went (its Server-Timing header);
4. the naive BentoML service of ``bench/naive_service.py`` (the baseline users would copy)
   under the same load;
5. TorchServe (``bench/torchserve/``, installed into bench/work on first use) serving the same
   checkpoint as TorchScript, under the same load; reported as not run, with the reason,
   where it cannot start;
6. batch scoring (``cnnserve score``) with each engine on the same folder;
7. fault trials (``bench/faults.py``): drain on SIGTERM under load, kill -9 of a worker, a soak
   with hostile images mixed in: requests lost, recovery times, server memory.

Each HTTP concurrency runs ``--http-repeats`` times (``--duration`` seconds at the highest,
``--short`` at the others) and reports the median and the spread; in-process timings are
the median of ``--repeats`` runs. Writes bench/results/<date>-<host>.json, .md (also
printed) and .png; the ratios and the project's targets, met or missed, come first. This file
is the command: its options and the sections run in turn for each workload. The sections measure in
modules of their own (``workloads.py`` makes the models and images ready, ``in_process.py``,
``http_sections.py``, ``floor_section.py``, ``scoring_section.py``, ``faults.py`` and the others
named in ``--sections``); ``bench/report.py`` writes the Markdown and ``bench/report_plots.py`` the PNG.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .floor_section import bench_floor
from .http_sections import bench_http, start
from .in_process import bench_int8, bench_ort, bench_torch
from .report import report
from .report_plots import plot
from .scoring_section import bench_batch
from .workloads import ROOT, WORK, WORKLOADS, log, machine, prepare, prepare_stored

RESULTS = ROOT / "bench" / "results"


def command(argv: list[str]) -> str:
    """The command line for the report, with the paths given to --work and --out left out."""
    words = [f"<{argv[i - 1][2:]}>" if i and argv[i - 1] in ("--work", "--out") else a for i, a in enumerate(argv)]
    return " ".join(["cnnserve bench", *words])


def build_parser() -> argparse.ArgumentParser:
    """``cnnserve bench``'s options (also read by docs/cli.md's generator and the docs' flag test)."""
    ap = argparse.ArgumentParser(prog="cnnserve bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), metavar="MODEL",
                    help=f"workloads ({', '.join(WORKLOADS)}) or store:TAG for any stored model (fine-tuned, "
                         "a library's, imported); those have no PyTorch or TorchServe sections")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64],
                    help="clients in flight for the HTTP sections")
    ap.add_argument("--duration", type=float, default=30, help="seconds per run at the highest concurrency")
    ap.add_argument("--short", type=float, default=10, help="seconds per run at the other concurrencies")
    ap.add_argument("--http-repeats", type=int, default=3, help="runs at each concurrency (median reported)")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of load before each HTTP measurement")
    ap.add_argument("--seconds", type=float, default=2, help="per in-process measurement")
    ap.add_argument("--repeats", type=int, default=3, help="in-process measurements (median reported)")
    ap.add_argument("--sections", nargs="+",
                    default=["pytorch", "onnxruntime", "service", "floor", "naive", "torchserve", "batch", "faults",
                             "calibration"],
                    choices=["pytorch", "onnxruntime", "service", "floor", "naive", "torchserve", "batch", "faults",
                             "int8", "calibration", "grpc", "drift", "telemetry", "shadow", "peers"],
                    help="naive: the baseline BentoML service of bench/naive_service.py; torchserve: TorchServe "
                         "(bench/torchserve/) on the same checkpoint; both under the same load as cnnserve; grpc: "
                         "the same infer call over HTTP and gRPC, alternated (bench/grpc_load.py); drift: the service with and "
                         "without its drift monitor, interleaved (bench/overhead.py); telemetry: access lines, "
                         "JSON logs and tracing at 0, 1%% and 100%% against the service as it ships, interleaved "
                         "(bench/overhead.py); shadow: the primary with and without a shadow at rate 1.0 on a second "
                         "version of the same model, interleaved, and the share the shadow ran "
                         "(bench/shadow_section.py); "
                         "peers: Triton, KServe, Ray Serve and MLServer beside cnnserve on the "
                         "same model.onnx under wrk (bench/peers/), written to STEM-peers.{json,md,png}")
    ap.add_argument("--peers", nargs="+", default=["triton", "kserve", "rayserve", "mlserver"],
                    choices=["triton", "kserve", "rayserve", "mlserver"], help="the peers section's peers")
    ap.add_argument("--peers-concurrency", nargs="+", type=int, default=[1, 8, 64, 256],
                    help="the peers section's connections (wrk)")
    ap.add_argument("--peers-tune-min", type=float, default=5.0,
                    help="minutes of tuning per peer and model, start-ups included (0: documented settings only)")
    ap.add_argument("--engines", nargs="+", default=["local", "http", "ray"], choices=["local", "http", "ray"],
                    help="batch-scoring engines to measure")
    ap.add_argument("--score-images", type=int, default=10000,
                    help="files per batch-scoring run (from 5,000 the local engine decodes in processes)")
    g = ap.add_argument_group("the GPU mode (bench/gpu.py, docs/gpu.md)")
    g.add_argument("--gpu", action="store_true",
                   help="run the GPU measurements of docs/gpu.md instead (correctness, in-process onnxruntime plain / IO binding "
                        "/ CUDA graphs and PyTorch eager, the service); without a working CUDA provider, a small "
                        "rehearsal on the CPU provider")
    g.add_argument("--gpu-prepare", action="store_true",
                   help="only write the weightless graphs the GPU machine needs (where torch and the exporter are)")
    g.add_argument("--gpu-arches", nargs="+", default=["resnet50", "resnet18"], help="models measured")
    g.add_argument("--gpu-size", type=int, default=None, help="input side in px (default 224; 64 in a rehearsal)")
    g.add_argument("--gpu-batches", nargs="+", type=int, default=None,
                   help="batch sizes (default 1 8 32 64 128 256; 1 4 in a rehearsal)")
    g.add_argument("--gpu-sections", nargs="+", default=["correctness", "in_process", "pytorch", "service"],
                   choices=["correctness", "in_process", "pytorch", "service"], help="what to run")
    g.add_argument("--gpu-clients", nargs="+", type=int, default=[64, 256], help="clients for the service runs")
    g.add_argument("--gpu-load-procs", type=int, default=4, help="load processes the clients are spread over")
    g.add_argument("--gpu-serve", nargs="+", default=None, metavar="KEY=VALUE",
                   help="the service's arguments (default: the GPU settings of docs/gpu.md)")
    g.add_argument("--gpu-trained", default=None,
                   help="the trained export for correctness (default runs/resnet18-shapes-64/model.onnx)")
    g.add_argument("--gpu-skeletons", default=None, help="where --gpu-prepare wrote the graphs (default bench/work/gpu/skeletons)")
    ap.add_argument("--out", default=None, help="result stem (default bench/results/DATE-HOST)")
    ap.add_argument("--work", default=None, help="keep the trained models, images and scores here "
                                                 "(default: runs/ and bench/work/ in the repository)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.gpu or args.gpu_prepare:
        from .gpu import main as gpu_main

        return gpu_main(args, command(argv if argv is not None else sys.argv[1:]))
    work = Path(args.work).resolve() if args.work else WORK
    runs = work if args.work else ROOT  # the workloads' runs/ (``--work`` moves them too)
    os.chdir(ROOT)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "command": command(argv if argv is not None else sys.argv[1:]),
           "http_repeats": args.http_repeats, "workloads": {}}
    for name in args.models:
        if name not in WORKLOADS and not name.startswith("store:"):
            ap.error(f"--models: {name!r} is neither a workload ({', '.join(WORKLOADS)}) nor store:TAG")
    for name in args.models:
        w = prepare_stored(name.removeprefix("store:"), work) if name.startswith("store:") else prepare(name, runs, work)
        r = {"input": "x".join(map(str, w["spec"].input_shape)), "format": w["format"],
             "serve": w["serve"], "serve_from": w["serve_from"], "model": w["tag"]}
        if "pytorch" in args.sections and w["run"]:
            r["pytorch"] = bench_torch(w, (1, 8, 32), args.seconds, args.repeats)
        if "onnxruntime" in args.sections:
            r["onnxruntime"] = bench_ort(w, (1, 8, 32, 128), args.seconds, args.repeats)
        for section in ("service", "naive", "torchserve"):
            if section == "torchserve" and not w["run"]:
                continue  # TorchServe is given the PyTorch checkpoint; a stored model has none
            if section in args.sections:
                try:
                    r[section] = bench_http(w, section, sorted(args.concurrency), args.duration, args.short,
                                            args.warmup, args.http_repeats)
                except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                    if section == "service":
                        raise
                    r[f"{section}_error"] = f"{type(e).__name__}: {str(e)[-500:]}"
                    log(f"{name}: {section} could not run: {r[f'{section}_error']}")
        if "floor" in args.sections:
            try:
                r["floor"] = bench_floor(w, max(args.concurrency), args.duration, args.http_repeats)
            except RuntimeError as e:  # no wrk here: reported, the other sections still run
                r["floor_error"] = str(e)
                log(f"{name}: floor could not run: {e}")
        if "grpc" in args.sections:
            from .grpc_load import section as grpc_section

            srv, _, _ = start(w, "service")
            try:
                r["grpc"] = grpc_section(w, srv, sorted({1, max(args.concurrency)}), args.duration, args.warmup,
                                         args.http_repeats, log)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:  # reported; the rest runs
                r["grpc_error"] = f"{type(e).__name__}: {(e.stderr or '')[-2000:]}"
                log(f"{name}: grpc could not run: {r['grpc_error']}")
            finally:
                srv.stop()
        # the sections that compare the service with itself under wrk, one setting changed, rounds interleaved
        for key, module, fn in (("drift", "overhead", "section"), ("telemetry", "overhead", "telemetry_section"),
                                ("shadow", "shadow_section", "section")):
            if key not in args.sections:
                continue
            measure = getattr(importlib.import_module(f"{__package__}.{module}"), fn)
            try:
                r[key] = measure(w, max(args.concurrency), args.duration, args.warmup, args.http_repeats, log)
            except RuntimeError as e:  # no wrk here: reported, the other sections still run
                r[f"{key}_error"] = str(e)
                log(f"{name}: {key} could not run: {e}")
        if "peers" in args.sections:  # bench/peers/: the servers users would pick instead, side by side
            from .peers.section import section as peers_section

            r["peers"] = peers_section(w, work, sorted(args.peers_concurrency), args.duration, args.short, args.warmup,
                                       args.http_repeats, args.peers, args.peers_tune_min, log=log)
        if "int8" in args.sections and w["run"]:
            r["int8"] = bench_int8(w, (1, 8, 32), args.seconds, args.repeats, max(args.concurrency), args.duration,
                                   args.warmup)
        if "batch" in args.sections:
            r["batch"] = bench_batch(w, args.engines, args.score_images, 64)
        if "faults" in args.sections:
            from .faults import section as faults_section

            r["faults"] = faults_section(w)
        if "calibration" in args.sections:  # the export's own figures (bench/calibration.py)
            from .calibration import section

            r["calibration"] = section(w["onnx"])
        doc["workloads"][name] = r
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"{time.strftime('%Y-%m-%d')}-{doc['machine']['host']}"
    stem.parent.mkdir(parents=True, exist_ok=True)  # an --out in a folder not made yet loses no measurement
    if "peers" in args.sections:
        from .peers.report import write as write_peers

        print(write_peers(doc, stem.with_name(stem.name + "-peers")))
        log(f"wrote {stem}-peers.json, .md and .png")
        if set(args.sections) == {"peers"}:  # nothing else measured: the day's main report stays as it is
            return 0
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    text = report(doc, stem)
    plot(doc, stem)
    print(text)
    log(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
