"""What the benchmark harness measures with: its workloads (the model each trains or takes from the store, the
images it sends, the service settings it serves them with) made ready under a work folder; the description of
the machine that the report and ``cnnserve tune`` put first; and the log line every section writes."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cnnserve.core.onnxmeta import MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]
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
    return dict(WORKLOADS[name]["serve"]), "chosen by hand in bench/workloads.py"


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
