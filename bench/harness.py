"""The benchmark harness: cnnserve measured side by side with what users would run instead.

``cnnserve bench`` (or ``python -m bench.harness``) runs, on one machine and in one go,
for LeNet-5 (28x28 PNGs) and ResNet-18 (224x224 JPEGs):

1. PyTorch eager in-process (what a user who skips ONNX would run), batches 1, 8, 32;
2. onnxruntime in-process on pre-decoded tensors, batches 1, 8, 32, 128 (the serving ceiling);
3. the cnnserve service over HTTP (real ``bentoml serve``, load from a separate process,
   loopback): throughput, p50/p95/p99, errors and 503s, mean batch size formed, at each
   concurrency (64 clients for the full ``--duration``, the others for ``--short``).

Writes bench/results/<date>-<host>.json, .md (also printed) and PNG plots. Timings in
process are the median of ``--repeats`` runs, with min and max as the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"  # models and images the harness makes (ignored by git)

WORKLOADS = {
    # name: how to make the model, the image format sent, the service's batching settings
    "lenet5": {"run": "runs/lenet5-digits", "tag": "lenet5-digits", "format": "PNG",
               "train": ["lenet5", "--data", "digits"],
               # per-request Python work dominates: one server process per core, one onnxruntime thread each
               "serve": {"max_batch_size": 64, "workers": 2, "threads": 1}},
    "resnet18": {"run": "runs/resnet18-shapes-224", "tag": "resnet18-shapes", "format": "JPEG",
                 "train": ["resnet18", "--data", "shapes", "--img-size", "224", "--epochs", "1", "--limit", "128",
                           "--batch-size", "16"],
               # the model dominates: one process, onnxruntime on every core
               "serve": {"max_batch_size": 32, "workers": 1, "threads": 0}},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    versions = {}
    for mod in ("torch", "onnxruntime", "bentoml", "numpy", "PIL", "fastapi"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is simply not listed
            pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "versions": versions}


# --- preparation ------------------------------------------------------------------------------

def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cnnserve.cli", *args], cwd=ROOT, check=True)


def prepare(name: str) -> dict:
    """Train (if needed), export and store the workload's model; write its request images."""
    from export.store import read_info, store_model
    from models.checkpoint import load_checkpoint
    from models.data import load_dataset

    w = WORKLOADS[name]
    run = ROOT / w["run"]
    if not (run / "model.pt").is_file():
        log(f"{name}: training {' '.join(w['train'])} (speed does not depend on accuracy)")
        cli("train", *w["train"], "--out", str(run))
    onnx_path = run / "model.onnx"
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < (run / "model.pt").stat().st_mtime:
        cli("export", str(run / "model.pt"))
    info = read_info(onnx_path)
    tag = str(store_model(onnx_path, w["tag"]).tag)
    images = WORK / "images" / name
    if not images.is_dir() or not any(images.iterdir()):
        images.mkdir(parents=True, exist_ok=True)
        ckpt = load_checkpoint(run / "model.pt")
        cfg = ckpt["train_config"]
        test = load_dataset(cfg["data"], ckpt["spec"], cfg.get("data_dir")).test
        from PIL import Image

        for i in range(min(len(test), 200)):
            x = test[i][0].numpy()
            img = Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
            img.save(images / f"{i:03d}.{w['format'].lower().replace('jpeg', 'jpg')}", w["format"], quality=90)
    return {"name": name, "tag": tag, "onnx": str(onnx_path), "images": str(images), "spec": info.spec,
            "format": w["format"], "serve": w["serve"], "run": str(run)}


# --- in-process -----------------------------------------------------------------------------

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


def bench_ort(w: dict, batches, seconds: float, repeats: int) -> list[dict]:
    from service.runtime import load_model

    m = load_model(w["onnx"], providers="cpu")
    rows = []
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, *w["spec"].input_shape), dtype=np.uint8)
        rows.append(timed(lambda: m.predict(x), b, seconds, repeats))
        log(f"{w['name']}: onnxruntime batch {b}: {rows[-1]['images_per_s']:.0f} img/s")
    return rows


def bench_torch(w: dict, batches, seconds: float, repeats: int) -> list[dict]:
    import torch

    from models.checkpoint import classifier_from_checkpoint, load_checkpoint

    model = classifier_from_checkpoint(load_checkpoint(Path(w["run"]) / "model.pt"))
    rows = []
    for b in batches:
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, *w["spec"].input_shape), dtype=np.uint8))

        def run():
            with torch.inference_mode():
                model(x)

        rows.append(timed(run, b, seconds, repeats))
        log(f"{w['name']}: PyTorch eager batch {b}: {rows[-1]['images_per_s']:.0f} img/s")
    return rows


# --- over HTTP ------------------------------------------------------------------------------

def batch_metrics(url: str, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("cnnserve_batch_size_sum") and f'model="{model}"' in line:
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("cnnserve_batch_size_count") and f'model="{model}"' in line:
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def load(url: str, files: str, concurrency: int, duration: float, warmup: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.load", url, "--files", files, "--concurrency",
                          str(concurrency), "--duration", str(duration), "--warmup", str(warmup)],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=duration + warmup + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_service(w: dict, concurrencies, duration: float, short: float, warmup: float) -> list[dict]:
    from .server import Server

    settings = [a for k, v in w["serve"].items() for a in ("--arg", f"{k}={v}")]
    srv = Server("--arg", f"models={w['tag']}", *settings)
    rows = []
    try:
        ext = "png" if w["format"] == "PNG" else "jpg"
        files = f"{w['images']}/*.{ext}"
        name = w["tag"].split(":")[0]
        for c in concurrencies:
            secs = duration if c == max(concurrencies) else short
            before = batch_metrics(srv.url, name)
            r = load(srv.url + "/classify", files, c, secs, warmup)
            after = batch_metrics(srv.url, name)
            runs = after[1] - before[1]
            r["mean_batch_size"] = (after[0] - before[0]) / runs if runs else 0.0
            rows.append(r)
            lat = r["latency_ms"]
            log(f"{w['name']}: HTTP x{c}: {r['throughput_rps']:.0f} req/s, p50 {lat.get('p50', 0):.1f} ms, "
                f"p99 {lat.get('p99', 0):.1f} ms, 503s {r['n_503']}, other failures "
                f"{r['n_non_200'] - r['n_503']}, mean batch {r['mean_batch_size']:.1f}")
    finally:
        srv.stop()
    return rows


# --- batch scoring --------------------------------------------------------------------------

def scoring_folder(w: dict, n: int) -> Path:
    """``n`` request images (the workload's, repeated under new names) for a steady-state scoring run."""
    folder = WORK / "scoring" / w["name"]
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = sorted(Path(w["images"]).iterdir())
    for i in range(n):
        shutil.copyfile(src[i % len(src)], folder / f"{i:05d}{src[i % len(src)].suffix}")
    return folder


def bench_batch(w: dict, engines, n: int, batch: int) -> dict:
    """Each engine on the same ``n`` files, against onnxruntime alone on pre-decoded tensors at the same
    batch size (with spinning off, as the engines run it)."""
    from service.runtime import load_model

    from .server import Server

    folder = scoring_folder(w, n)
    m = load_model(w["onnx"], providers="cpu")
    x = np.random.default_rng(0).integers(0, 256, (batch, *w["spec"].input_shape), dtype=np.uint8)
    ceiling = timed(lambda: m.predict(x), batch, 3, 3)
    out = {"images": n, "batch": batch, "onnxruntime": ceiling, "engines": {}}
    log(f"{w['name']}: onnxruntime alone, batch {batch}: {ceiling['images_per_s']:.0f} img/s")
    for engine in engines:
        kw = {"model": w["onnx"]}
        srv = None
        if engine == "http":
            settings = [a for k, v in w["serve"].items() for a in ("--arg", f"{k}={v}")]
            srv = Server("--arg", f"models={w['tag']}", *settings)
            kw = {"url": srv.url, "concurrency": 32}
        try:
            # each run in a process of its own, as users run `cnnserve score` (in the harness's process,
            # after the other sections, the same run measured 0.73 of onnxruntime instead of 1.0)
            result = WORK / f"scores-{w['name']}-{engine}.jsonl"
            call = (f"import json; from service.batch import score; print(json.dumps(score({[str(folder)]!r}, "
                    f"{str(result)!r}, engine={engine!r}, batch_size={batch}, overwrite=True, progress=False, "
                    f"providers='cpu', **{kw!r})))")
            proc = subprocess.run([sys.executable, "-c", call], cwd=ROOT, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"score --engine {engine} failed:\n{proc.stderr[-2000:]}")
            s = json.loads(proc.stdout.strip().splitlines()[-1])
            s["out"] = str(Path(s["out"]).relative_to(ROOT))  # reports name no machine's paths
        finally:
            if srv:
                srv.stop()
        s["ratio_to_onnxruntime"] = s["images_per_s"] / ceiling["images_per_s"]
        out["engines"][engine] = s
        log(f"{w['name']}: score --engine {engine}: {s['images_per_s']:.0f} img/s "
            f"({s['ratio_to_onnxruntime']:.2f} of onnxruntime alone); decode {s['decode_s']}s summed, "
            f"inference {s['inference_s']}s, wall {s['seconds']}s")
    return out


# --- report ---------------------------------------------------------------------------------

def report(doc: dict, stem: Path) -> str:
    lines = [f"# cnnserve benchmark, {doc['date']}", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, GPU: {doc['machine']['gpu']}; "
             f"Python {doc['machine']['python']}; "
             + ", ".join(f"{k} {v}" for k, v in doc["machine"]["versions"].items()) + ".",
             "The load generator runs on the same machine (loopback), so it takes CPU from the server.", ""]
    lines += ["## Ratios", "", "| model | service / onnxruntime in-process (best batch) | onnxruntime / PyTorch eager "
              "(best batch each) | 503 rate at 64 clients | failures at 64 clients | batch scoring (local) / onnxruntime "
              "(same batch) |", "|---|---|---|---|---|---|"]
    for name, r in doc["workloads"].items():
        ort_best = max(x["images_per_s"] for x in r["onnxruntime"]) if r.get("onnxruntime") else 0
        torch_best = max(x["images_per_s"] for x in r["pytorch"]) if r.get("pytorch") else 0
        http = {x["concurrency"]: x for x in r.get("service", [])}
        best_http = max((x["throughput_rps"] for x in http.values()), default=0)
        at64 = http.get(64)
        lines.append(f"| {name} | {best_http / ort_best:.2f} ({best_http:.0f} / {ort_best:.0f} img/s) | "
                     f"{ort_best / torch_best:.2f} | "
                     + (f"{at64['n_503'] / max(1, at64['requests']):.2%} ({at64['n_503']} of {at64['requests']}) | "
                        f"{at64['n_non_200'] - at64['n_503']} |" if at64 else "- | - |")
                     + (f" {r['batch']['engines']['local']['ratio_to_onnxruntime']:.2f} |"
                        if r.get("batch", {}).get("engines", {}).get("local") else " - |")
                     if ort_best and torch_best else f"| {name} | - | - | - | - | - |")
    for name, r in doc["workloads"].items():
        settings = ", ".join(f"{k}={v}" for k, v in r["serve"].items())
        lines += ["", f"## {name} ({r['input']}, {r['format']} requests; service {settings})", "",
                  "| in-process | batch | images/s (median) | spread |", "|---|---|---|---|"]
        for kind in ("pytorch", "onnxruntime"):
            for x in r.get(kind, []):
                lines.append(f"| {kind} | {x['batch']} | {x['images_per_s']:.0f} | "
                             f"{x['spread'][0]:.0f}-{x['spread'][1]:.0f} |")
        if r.get("service"):
            lines += ["", "| HTTP clients | seconds | requests | req/s | p50 ms | p95 ms | p99 ms | 503s | "
                          "other failures | mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
            for x in r["service"]:
                lat = x["latency_ms"]
                lines.append(f"| {x['concurrency']} | {x['duration_s']:.0f} | {x['requests']} | "
                             f"{x['throughput_rps']:.0f} | {lat.get('p50', 0):.1f} | {lat.get('p95', 0):.1f} | "
                             f"{lat.get('p99', 0):.1f} | {x['n_503']} | {x['n_non_200'] - x['n_503']} | "
                             f"{x['mean_batch_size']:.1f} |")
    scoring = {n: r["batch"] for n, r in doc["workloads"].items() if r.get("batch")}
    if scoring:
        lines += ["", "## Batch scoring (`cnnserve score`), same files for every engine", "",
                  "| model | engine | images | img/s | / onnxruntime alone (same batch) | decode s (summed over threads) "
                  "| inference s | wall s |", "|---|---|---|---|---|---|---|---|"]
        for name, b in scoring.items():
            lines.append(f"| {name} | onnxruntime alone, batch {b['batch']} | - | "
                         f"{b['onnxruntime']['images_per_s']:.0f} | 1.00 | - | - | - |")
            for engine, e in b["engines"].items():
                lines.append(f"| {name} | {engine} | {b['images']} | {e['images_per_s']:.0f} | "
                             f"{e['ratio_to_onnxruntime']:.2f} | {e['decode_s'] if engine == 'local' else '-'} | "
                             f"{e['inference_s'] if engine == 'local' else '-'} | {e['seconds']} |")
    lines += ["", f"Reproduce: `{doc['command']}`", ""]
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text)
    plot(doc, stem)
    return text


def plot(doc: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in doc["workloads"].items() if r.get("service")]
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for j, name in enumerate(names):
        r = doc["workloads"][name]
        cs = [x["concurrency"] for x in r["service"]]
        ax = axes[0][j]
        ax.plot(cs, [x["throughput_rps"] for x in r["service"]], marker="o", label="cnnserve over HTTP")
        if r.get("onnxruntime"):
            ax.axhline(max(x["images_per_s"] for x in r["onnxruntime"]), color="g", ls="--",
                       label="onnxruntime in-process, best batch")
        if r.get("pytorch"):
            ax.axhline(max(x["images_per_s"] for x in r["pytorch"]), color="r", ls=":",
                       label="PyTorch eager in-process, best batch")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="images / s", title=f"{name}: throughput")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        for q in ("p50", "p95", "p99"):
            ax.plot(cs, [x["latency_ms"].get(q, 0) for x in r["service"]], marker="o", label=q)
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency, ms",
               title=f"{name}: latency percentiles")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"cnnserve on {doc['machine']['cpu']} ({doc['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cnnserve bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--duration", type=float, default=60, help="seconds at the highest concurrency")
    ap.add_argument("--short", type=float, default=15, help="seconds at the other concurrencies")
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--seconds", type=float, default=2, help="per in-process measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", nargs="+", default=["pytorch", "onnxruntime", "service", "batch"],
                    choices=["pytorch", "onnxruntime", "service", "batch"])
    ap.add_argument("--engines", nargs="+", default=["local", "http", "ray"], choices=["local", "http", "ray"])
    ap.add_argument("--score-images", type=int, default=1000, help="files per batch-scoring run")
    ap.add_argument("--out", default=None, help="result stem (default bench/results/DATE-HOST)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "command": "cnnserve bench " + " ".join(argv if argv is not None else sys.argv[1:]), "workloads": {}}
    for name in args.models:
        w = prepare(name)
        r = {"input": "x".join(map(str, w["spec"].input_shape)), "format": w["format"],
             "serve": w["serve"], "model": w["tag"]}
        if "pytorch" in args.sections:
            r["pytorch"] = bench_torch(w, (1, 8, 32), args.seconds, args.repeats)
        if "onnxruntime" in args.sections:
            r["onnxruntime"] = bench_ort(w, (1, 8, 32, 128), args.seconds, args.repeats)
        if "service" in args.sections:
            r["service"] = bench_service(w, sorted(args.concurrency), args.duration, args.short, args.warmup)
        if "batch" in args.sections:
            r["batch"] = bench_batch(w, args.engines, args.score_images, 64)
        doc["workloads"][name] = r
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"{time.strftime('%Y-%m-%d')}-{doc['machine']['host']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    print(report(doc, stem))
    log(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
