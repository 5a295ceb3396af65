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
measures; ``bench/report.py`` formats.
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

from cnnserve.core.config import DEFAULTS
from cnnserve.core.onnxmeta import MODEL_FILE

from .report import best, report
from .timing import timed
from .tune_measure import batch_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"  # default: images, scoring folders and scores the harness makes (ignored by git)

WORKLOADS = {
    # name: how to make the model, the image format sent, the service's settings where `cnnserve tune` has not
    # chosen them (bench/tuned/NAME.yaml, ``serve_settings``)
    "lenet5": {"run": "runs/lenet5-digits", "tag": "lenet5-digits", "format": "PNG",
               "train": ["lenet5", "--data", "digits"],
               # per-request Python work dominates: one server process per core
               "serve": {"max_batch_size": 64, "workers": 2, "threads": 1, "precision": "fp32"}},
    "resnet18": {"run": "runs/resnet18-shapes-224", "tag": "resnet18-shapes", "format": "JPEG",
                 "train": ["resnet18", "--data", "shapes", "--img-size", "224", "--epochs", "1", "--limit", "128",
                           "--batch-size", "16"],
               # the model dominates: one process, onnxruntime on every core
               "serve": {"max_batch_size": 32, "workers": 1, "threads": 0}},
}


TUNED = ROOT / "bench" / "tuned"  # the service arguments `cnnserve tune` chose for each workload


def serve_settings(name: str) -> tuple[dict, str]:
    """Workload ``name``'s service settings and where they come from: what ``cnnserve tune`` wrote for it
    (``bench/tuned/NAME.yaml``, whose comments name the machine it was measured on), else ``WORKLOADS``'."""
    import yaml

    path = TUNED / f"{name}.yaml"
    if path.is_file():
        chosen = yaml.safe_load(path.read_text()) or {}
        settings = {k: v for k, v in chosen.items() if k != "models"}
        return settings, f"chosen by cnnserve tune: bench/tuned/{path.name}"
    return dict(WORKLOADS[name]["serve"]), "chosen by hand in bench/harness.py"


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
    subprocess.run([sys.executable, "-m", "cnnserve.command.cli", *args], cwd=ROOT, check=True)


def prepare(name: str, runs: Path, work: Path) -> dict:
    """Train (if needed), export and store the workload's model under ``runs``; write its request
    images under ``work``."""
    from cnnserve.export.store import read_info, store_model
    from cnnserve.models.checkpoint import load_checkpoint
    from cnnserve.models.data import load_dataset

    w = WORKLOADS[name]
    run = runs / w["run"]
    if not (run / "model.pt").is_file():
        log(f"{name}: training {' '.join(w['train'])} (speed does not depend on accuracy)")
        cli("train", *w["train"], "--out", str(run), "--overwrite")  # its own folder (an interrupted run: again)
    onnx_path = run / MODEL_FILE
    if not onnx_path.is_file() or onnx_path.stat().st_mtime < (run / "model.pt").stat().st_mtime:
        cli("export", str(run / "model.pt"), "--overwrite")  # keeps its own folder's export current
    info = read_info(onnx_path)
    tag = str(store_model(onnx_path, w["tag"]).tag)
    images = work / "images" / name
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
    serve, source = serve_settings(name)
    return {"name": name, "tag": tag, "onnx": str(onnx_path), "images": str(images), "spec": info.spec,
            "format": w["format"], "serve": serve, "serve_from": source, "run": str(run), "work": work}


def prepare_stored(tag: str, work: Path) -> dict:
    """A model already in the store (fine-tuned, a library's, imported): no checkpoint to train or
    time in PyTorch; its request images are shapes drawn with Pillow, JPEG at the model's input size."""
    from cnnserve.core.store import stored_model
    from cnnserve.export.store import read_info
    from cnnserve.models.data import LABELS, render_shape

    stored = stored_model(tag)
    onnx_path = stored.path_of(MODEL_FILE)
    spec = read_info(onnx_path).spec
    name = stored.tag.name
    images = work / "images" / name
    if not images.is_dir() or not any(images.iterdir()):
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(200):
            render_shape(LABELS["shapes"][i % 4], rng, size=max(spec.height, 64)).save(images / f"{i:03d}.jpg",
                                                                                       "JPEG", quality=90)
    small = spec.height < 64  # as the zoo's workloads: small models are bound by per-request work
    serve, source = serve_settings("lenet5" if small else "resnet18")
    return {"name": name, "tag": str(stored.tag), "onnx": onnx_path, "images": str(images), "spec": spec,
            "format": "JPEG", "serve": serve, "serve_from": source, "run": None, "work": work}


# --- in-process -----------------------------------------------------------------------------

def bench_ort(w: dict, batches, seconds: float, repeats: int) -> list[dict]:
    from cnnserve.core.runtime import load_model

    m = load_model(w["onnx"], providers="cpu")
    rows = []
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, *w["spec"].input_shape), dtype=np.uint8)
        rows.append(timed(lambda: m.predict(x), b, seconds, repeats))
        log(f"{w['name']}: onnxruntime batch {b}: {rows[-1]['images_per_s']:.0f} img/s")
    return rows


def bench_torch(w: dict, batches, seconds: float, repeats: int) -> list[dict]:
    import torch

    from cnnserve.models.checkpoint import classifier_from_checkpoint, load_checkpoint

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

def load(url: str, files: str, concurrency: int, duration: float, warmup: float, field: str) -> dict:
    out = subprocess.run([sys.executable, "-m", f"{__package__}.load", url, "--files", files, "--concurrency",
                          str(concurrency), "--duration", str(duration), "--warmup", str(warmup), "--field", field],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=duration + warmup + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Repeated runs at one concurrency: the median run's figures, the spread, and the sums of failures."""
    rates = [r["throughput_rps"] for r in runs]
    out = {"concurrency": runs[0]["concurrency"], "repeats": len(runs), "duration_s": runs[0]["duration_s"],
           "throughput_rps": statistics.median(rates), "spread": [min(rates), max(rates)],
           "requests": sum(r["requests"] for r in runs), "n_503": sum(r["n_503"] for r in runs),
           "n_non_200": sum(r["n_non_200"] for r in runs),
           "connections_opened": sum(r.get("connections_opened", 0) for r in runs),
           "latency_ms": {q: statistics.median(r["latency_ms"].get(q, 0) for r in runs)
                          for q in ("p50", "p95", "p99", "mean", "max")}, "runs": runs}
    timed = [r["server_timing_ms"] for r in runs if r.get("server_timing_ms")]
    if timed:
        out["server_timing_ms"] = {k: statistics.mean(t[k] for t in timed) for k in timed[0]}
    return out


def start(w: dict, service: str):
    """The server under test, and the URL and multipart field its clients use."""
    from tests.support.server import Server

    if service == "naive":
        srv = Server("--arg", f"model={w['tag']}", service=f"{__package__}.naive_service:NaiveOnnx")
        return srv, srv.url + "/classify", "images"
    if service == "torchserve":
        from .torchserve.peer import TorchServe, archive, install

        install()
        srv = TorchServe(archive(Path(w["run"]), w["tag"].split(":")[0]),
                         workers=w["serve"].get("workers", DEFAULTS.workers),
                         batch_size=w["serve"].get("max_batch_size", DEFAULTS.max_batch_size), max_batch_delay_ms=5)
        return srv, f"{srv.url}/predictions/{srv.name}", "data"
    settings = [a for k, v in w["serve"].items() for a in ("--arg", f"{k}={v}")]
    srv = Server("--arg", f"models={w['tag']}", *settings)
    return srv, srv.url + "/classify", "image"


def bench_http(w: dict, service: str, concurrencies, duration: float, short: float, warmup: float,
               repeats: int) -> list[dict]:
    """One server (cnnserve with the workload's settings, the naive baseline, or TorchServe) under the
    load generator, ``repeats`` runs at each concurrency. Every request is a one-image multipart upload
    (what ``curl -F`` sends)."""
    ours = service == "service"
    srv, url, field = start(w, service)
    rows = []
    try:
        ext = "png" if w["format"] == "PNG" else "jpg"
        files = f"{w['images']}/*.{ext}"
        name = w["tag"].split(":")[0]
        for c in concurrencies:
            secs = duration if c == max(concurrencies) else short
            runs = []
            for _ in range(repeats):
                before = batch_metrics(srv.url, name) if ours else None
                r = load(url, files, c, secs, warmup, field)
                if before:
                    after = batch_metrics(srv.url, name)
                    n = after[1] - before[1]
                    r["mean_batch_size"] = (after[0] - before[0]) / n if n else 0.0
                runs.append(r)
            row = summarise(runs)
            if ours:
                row["mean_batch_size"] = statistics.mean(r["mean_batch_size"] for r in runs)
            rows.append(row)
            lat = row["latency_ms"]
            log(f"{w['name']}: {service} HTTP x{c}: {row['throughput_rps']:.0f} req/s (median of {repeats}, "
                f"{row['spread'][0]:.0f}-{row['spread'][1]:.0f}), p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                f"503s {row['n_503']}, other failures {row['n_non_200'] - row['n_503']}"
                + (f", mean batch {row['mean_batch_size']:.1f}" if ours else ""))
    finally:
        srv.stop()
    return rows


# --- int8 ------------------------------------------------------------------------------------

def bench_int8(w: dict, batches, seconds: float, repeats: int, concurrency: int, duration: float,
               warmup: float) -> dict:
    """int8 against fp32: the model quantized in each integer format (minmax calibration on 128 training
    images, verified as `cnnserve export --int8` verifies), each timed in-process beside fp32; then the
    service forced to fp32 and to int8 (the fastest format that passed its gate) at ``concurrency``
    clients, and the choice ``precision=auto`` makes here with the warm-up timings behind it."""
    import shutil

    import onnx

    from dataclasses import replace

    from cnnserve.export.files import save, set_metadata
    from cnnserve.export.pipeline import test_images
    from cnnserve.export.quantize import FORMATS, cpu_format, has_vnni, quantize_verified
    from cnnserve.export.store import read_info, store_model
    from cnnserve.models.checkpoint import load_checkpoint
    from cnnserve.core.runtime import load_model

    ckpt = load_checkpoint(Path(w["run"]) / "model.pt")
    fp32, info = onnx.load_model(w["onnx"]), read_info(w["onnx"])
    calibration = test_images(ckpt, split="train", limit=128)
    selection, test = test_images(ckpt, split="val", limit=256), test_images(ckpt)
    out = {"vnni": has_vnni(), "cpu_format": cpu_format(), "formats": {}}
    folder = Path(w["work"]) / "int8" / w["name"]
    shutil.rmtree(folder, ignore_errors=True)
    sessions = {"fp32": load_model(w["onnx"], providers="cpu")}
    for fmt in FORMATS:
        # quantized and verified as `cnnserve export --int8` does, one format at a time; written for timing
        # even where the gate fails (speed does not depend on it; the table says which passed)
        q, r = quantize_verified(fp32, calibration[0], selection[0], test[0], test[1], method="minmax", fmt=fmt,
                                 source="training split", log=log)
        path = folder / fmt / "model.int8.onnx"
        set_metadata(q, replace(info, precision="int8"))
        save(q, path)
        log(f"{w['name']}: int8 {fmt}: gate {'passed' if r['passed'] else 'FAILED'}, top-1 agreement "
            f"{r['top1_agreement']:.2%}")
        out["formats"][fmt] = {k: r.get(k) for k in ("passed", "top1_agreement", "accuracy_onnxruntime",
                                                     "accuracy_fp32", "ops_in_float", "failures")}
        sessions[fmt] = load_model(path, providers="cpu")
    rows = {name: [] for name in sessions}
    for b in batches:
        x = np.random.default_rng(0).integers(0, 256, (b, *w["spec"].input_shape), dtype=np.uint8)
        for name, m in sessions.items():
            rows[name].append(timed(lambda: m.predict(x), b, seconds, repeats))
        log(f"{w['name']}: batch {b}: " + ", ".join(f"{n} {r[-1]['images_per_s']:.0f}" for n, r in rows.items()) + " img/s")
    out["onnxruntime"] = rows
    passed = [f for f in FORMATS if out["formats"][f]["passed"]]
    # the service runs the variant `cnnserve export --int8` would keep: a passing one, the fastest of them
    serve_fmt = max(passed or FORMATS, key=lambda f: best(rows[f], "images_per_s"))
    both = folder / "serve"
    both.mkdir()
    shutil.copyfile(w["onnx"], both / MODEL_FILE)
    shutil.copyfile(folder / serve_fmt / "model.int8.onnx", both / "model.int8.onnx")
    tag = str(store_model(both / MODEL_FILE, f"{w['tag'].split(':')[0]}-int8bench").tag)
    out["service"] = {"format": serve_fmt, "gate_passed": serve_fmt in passed}
    for precision in ("fp32", "int8", "auto"):
        wp = {**w, "tag": tag, "serve": {**w["serve"], "precision": precision}}
        srv, url, field = start(wp, "service")
        try:
            models = json.loads(urllib.request.urlopen(srv.url + "/models", timeout=10).read())["models"]
            choice = models[0]["precision_choice"]
            if precision == "auto":
                out["service"]["auto_choice"] = choice
                log(f"{w['name']}: precision=auto chose {choice['chosen']} (warm-up ms per image {choice.get('ms_per_image')})")
                continue
            ext = "png" if w["format"] == "PNG" else "jpg"
            r = load(url, f"{w['images']}/*.{ext}", concurrency, duration, warmup, field)
            out["service"][precision] = r
            log(f"{w['name']}: service {precision} x{concurrency}: {r['throughput_rps']:.0f} req/s")
        finally:
            srv.stop()
    return out


# --- batch scoring --------------------------------------------------------------------------

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_TYPE")
"""


def wrk(url: str, body: Path, content_type: str, concurrency: int, duration: float) -> dict:
    """``wrk`` (a C load generator: the client costs the cores little) POSTing ``body`` as a raw
    request body: req/s, latency percentiles and the count of non-2xx answers."""
    import re
    import shutil
    import tempfile

    exe = shutil.which("wrk")
    if not exe:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    threads = max(1, min(os.cpu_count() or 1, concurrency))
    proc = subprocess.run([exe, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
                           "-s", f.name, url], capture_output=True, text=True, timeout=duration + 60,
                          env={**os.environ, "WRK_BODY": str(body), "WRK_TYPE": content_type})
    os.unlink(f.name)
    out = proc.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or not rate:
        raise RuntimeError(f"wrk failed: {proc.stderr[-500:]} {out[-500:]}")
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    lat = {f"p{q}": float(v) * unit[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"concurrency": concurrency, "throughput_rps": float(rate.group(1)), "latency_ms": lat,
            "n_non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def floor_server(workers: int):
    """The bare ASGI app of ``bench/floor.py`` under uvicorn, as many workers as cnnserve has."""
    from tests.support.server import free_port, stop_group

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", f"{__package__}.floor:app", "--port", str(port),
                             "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                             "--no-access-log", "--log-level", "warning"], cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x"), timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    stop_group(proc, 10)
    raise RuntimeError("the floor server did not start")


def cpu_ms(rps: float) -> float:
    """CPU time a request costs when the server keeps every core busy: cores x 1000 / req/s."""
    return (os.cpu_count() or 1) * 1000 / rps if rps else float("nan")


def bench_floor(w: dict, concurrency: int, duration: float, repeats: int) -> dict:
    """The bare-ASGI floor and cnnserve under the same ``wrk`` load (one of the workload's images as a
    raw body), ``repeats`` runs each, interleaved so drift hits both alike."""
    from tests.support.server import stop_group

    body = sorted(Path(w["images"]).iterdir())[0]
    ctype = "image/png" if w["format"] == "PNG" else "image/jpeg"
    runs = {"floor": [], "cnnserve": []}
    floor, floor_url = floor_server(w["serve"].get("workers", DEFAULTS.workers))
    try:
        srv, url, _ = start(w, "service")
        try:
            wrk(url, body, ctype, concurrency, 2)  # warm both
            wrk(floor_url, body, ctype, concurrency, 2)
            for _ in range(repeats):
                runs["floor"].append(wrk(floor_url, body, ctype, concurrency, duration))
                runs["cnnserve"].append(wrk(url, body, ctype, concurrency, duration))
        finally:
            srv.stop()
    finally:
        stop_group(floor, 10)
    out = {"concurrency": concurrency, "body_bytes": body.stat().st_size, "tool": "wrk"}
    for k, rs in runs.items():
        rates = [r["throughput_rps"] for r in rs]
        med = statistics.median(rates)
        out[k] = {"throughput_rps": med, "spread": [min(rates), max(rates)], "cpu_ms": cpu_ms(med),
                  "failures": sum(r["n_non_2xx"] + r["socket_errors"] for r in rs), "runs": rs}
    out["ratio_to_floor"] = out["cnnserve"]["throughput_rps"] / out["floor"]["throughput_rps"]
    log(f"{w['name']}: wrk at {concurrency} connections: floor {out['floor']['throughput_rps']:.0f} req/s, "
        f"cnnserve {out['cnnserve']['throughput_rps']:.0f} req/s ({out['ratio_to_floor']:.3f} of the floor; "
        f"{out['cnnserve']['cpu_ms']:.2f} CPU-ms per request against {out['floor']['cpu_ms']:.3f})")
    return out


def bench_faults(w: dict) -> dict:
    """Drain on SIGTERM, kill -9 of a worker, and a soak with hostile images (``bench/faults.py``)."""
    from tests.support import hostile

    from . import faults

    log(f"{w['name']}: fault trials (drain, kill -9 of a worker, soak with hostile images)")
    files = sorted(Path(w["images"]).iterdir())[:16]
    ctype = "image/png" if w["format"] == "PNG" else "image/jpeg"
    bodies = [(f.read_bytes(), ctype) for f in files]
    bad = [(data, "application/octet-stream") for data, _, _ in hostile.images().values()]
    settings = [a for k, v in w["serve"].items() if k != "workers" for a in ("--arg", f"{k}={v}")]
    return faults.run_all(["--arg", f"models={w['tag']}", *settings], bodies, bad)


def scoring_folder(w: dict, n: int) -> Path:
    """``n`` request images (the workload's, repeated under new names) for a steady-state scoring run."""
    folder = w["work"] / "scoring" / w["name"]
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = sorted(Path(w["images"]).iterdir())
    for i in range(n):
        shutil.copyfile(src[i % len(src)], folder / f"{i:05d}{src[i % len(src)].suffix}")
    return folder


def in_a_process_of_its_own(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh interpreter (spawned, as a user's command would start), its
    result returned here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _decode_folder(folder: str, onnx: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from cnnserve.core.config import cores
    from cnnserve.core.runtime import load_model
    from cnnserve.scoring.engines import read_and_decode

    spec = load_model(onnx, providers="cpu").spec
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    with ThreadPoolExecutor(cores()) as pool:
        t = time.perf_counter()
        bad = sum(d[0] is None for d in pool.map(lambda p: read_and_decode(p, spec), paths, chunksize=64))
        seconds = time.perf_counter() - t
    return {"images": len(paths), "failed": bad, "seconds": seconds, "images_per_s": len(paths) / seconds}


def decode_alone(folder: Path, onnx: str) -> dict:
    """Reading and decoding the folder as the local engine does (a thread per core), with no model:
    the other ceiling of batch scoring, in a process of its own."""
    return in_a_process_of_its_own(_decode_folder, str(folder), onnx)


def bench_batch(w: dict, engines, n: int, batch: int) -> dict:
    """Each engine on the same ``n`` files, against onnxruntime alone on pre-decoded tensors at the same
    batch size (with spinning off, as the engines run it)."""
    from cnnserve.core.runtime import load_model

    from tests.support.server import Server

    folder = scoring_folder(w, n)
    m = load_model(w["onnx"], providers="cpu")
    x = np.random.default_rng(0).integers(0, 256, (batch, *w["spec"].input_shape), dtype=np.uint8)
    ceiling = timed(lambda: m.predict(x), batch, 3, 3)
    out = {"images": n, "batch": batch, "onnxruntime": ceiling, "engines": {},
           "decode_alone": decode_alone(folder, w["onnx"])}
    log(f"{w['name']}: onnxruntime alone, batch {batch}: {ceiling['images_per_s']:.0f} img/s; reading and "
        f"decoding alone: {out['decode_alone']['images_per_s']:.0f} img/s")
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
            result = w["work"] / f"scores-{w['name']}-{engine}.jsonl"
            from cnnserve.scoring.run import score

            s = in_a_process_of_its_own(score, [str(folder)], str(result), engine=engine, batch_size=batch,
                                        overwrite=True, progress=False, providers="cpu", **kw)
            s["out"] = Path(s["out"]).name  # reports name no machine's paths
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
                             "int8", "calibration", "grpc", "drift"],
                    help="naive: the baseline BentoML service of bench/naive_service.py; torchserve: TorchServe "
                         "(bench/torchserve/) on the same checkpoint; both under the same load as cnnserve; grpc: "
                         "the same infer call over HTTP and gRPC, alternated (bench/grpc_load.py); drift: the service with and "
                         "without its drift monitor, interleaved (bench/overhead.py)")
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
        if "drift" in args.sections:
            from .overhead import section as drift_section

            try:
                r["drift"] = drift_section(w, max(args.concurrency), args.duration, args.warmup, args.http_repeats,
                                           log)
            except RuntimeError as e:  # no wrk here: reported, the other sections still run
                r["drift_error"] = str(e)
                log(f"{name}: drift could not run: {e}")
        if "int8" in args.sections and w["run"]:
            r["int8"] = bench_int8(w, (1, 8, 32), args.seconds, args.repeats, max(args.concurrency), args.duration,
                                   args.warmup)
        if "batch" in args.sections:
            r["batch"] = bench_batch(w, args.engines, args.score_images, 64)
        if "faults" in args.sections:
            r["faults"] = bench_faults(w)
        if "calibration" in args.sections:  # the export's own figures (bench/calibration.py)
            from .calibration import section

            r["calibration"] = section(w["onnx"])
        doc["workloads"][name] = r
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"{time.strftime('%Y-%m-%d')}-{doc['machine']['host']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    print(report(doc, stem))
    log(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
