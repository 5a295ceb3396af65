"""The harness's ``batch`` section: batch scoring (``cnnserve score``) with each engine on the same folder of
the workload's images, each run in a process of its own, beside onnxruntime alone on pre-decoded tensors and
reading and decoding alone: the two ceilings it is measured against."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .timing import timed
from .workloads import log


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
