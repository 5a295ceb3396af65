"""The harness's in-process sections: PyTorch eager and onnxruntime timed on pre-decoded tensors (what the
service's throughput is measured against), and ``int8``: each integer format beside fp32, in-process and
served."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np

from cnnserve.core.onnxmeta import MODEL_FILE

from .http_sections import load, start
from .report import best
from .timing import timed
from .workloads import log


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
