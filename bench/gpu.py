"""The harness's GPU mode (``cnnserve bench --gpu``): the GPU measurements of docs/gpu.md in one call on a GPU machine.

1. **correctness**: a trained export (``--gpu-trained``, default the ResNet-18 trained on shapes at 64 px) run by
   the service's own runtime with ``providers=cuda`` (``get_providers()`` checked, never assumed) against the CPU
   provider on real rendered images: fp32 logits' largest difference, fp16's top-1 agreement;
2. **in-process throughput**: ResNet-50 and ResNet-18 at 224, fp32 and fp16, batches 1 to 256, through
   onnxruntime's CUDA provider plain (numpy in and out), with IO binding, and with CUDA graphs (one bucket per
   batch size: no padding), beside PyTorch eager (fp16, ``channels_last``) on the same GPU; images/s and, for
   fp16, the ratio to the GPU's dense fp16 ceiling (images/s x FLOP per image / peak FLOP/s);
3. **the service**: ``bentoml serve`` on the same machine with the GPU settings (``--gpu-serve``), JPEG 224
   requests from several load processes at each of ``--gpu-clients``; the ratio to in-process onnxruntime at the
   same precision and batch size; what serves (``/models``), and the precision ``auto`` would choose there;
4. a report (JSON, markdown, PNG) naming the device, its driver and the providers, each target MET or MISSED.
   A part that fails is reported in words and the others still run; the JSON is written after every part, so
   a run cut short by the device's time limit still leaves what it measured.

The ResNets' weights are made by rule on the machine (``materialise``: Kaiming-normal convolutions, the
exporter having folded the batch norms into them) from a weightless graph written where torch and the exporter are (``prepare``), because a call to
the GPU machine carries 64 MiB and ResNet-50's fp32 file is 98 MB; speed does not depend on the values. Where
onnxruntime has no working CUDA provider the mode **rehearses** on the CPU provider (small sizes; targets NOT
MEASURED), which is how the suite tests it. docs/gpu.md has the device's runbook.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cnnserve.core import binding, onnxmeta
from cnnserve.core.config import DeviceOptions
from cnnserve.core.runtime import cuda_works

from .gpu_models import materialise, prepare, shapes, with_fp16
from .timing import timed

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[bench --gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def attempt(what: str, fn, *args, **kwargs):
    """``fn``'s result, or the failure in words (logged): one part that cannot run on the device does not
    cost the others their figures, and the report says what failed."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, whatever it is: the device's minutes are few
        log(f"{what} failed: {type(e).__name__}: {e}")
        return f"failed: {type(e).__name__}: {str(e)[:1000]}"


def device_info() -> dict:
    import onnxruntime as ort

    info = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(), "gpu": None}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if out:
            name, driver, memory = (v.strip() for v in out[0].split(","))
            info["gpu"] = {"name": name, "driver": driver, "memory": memory, "count": len(out)}
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available()}
    except ImportError:
        info["torch"] = None
    return info


# --- 1. correctness -----------------------------------------------------------------------------------

def correctness(fp32: Path, provider: str, work: Path, n: int = 400) -> dict:
    """The trained export on ``provider`` against the CPU provider, fp32 and fp16 (the export's own, else one
    made in ``work``), on ``n`` real images."""
    from cnnserve.core.runtime import load_model

    cpu = load_model(fp32, providers="cpu", warm_up=False)
    c, h, w = cpu.spec.input_shape
    x = np.stack([np.asarray(img.convert("RGB" if c == 3 else "L")).reshape(h, w, c).transpose(2, 0, 1)
                  for img in shapes(n, h)])
    want = np.concatenate([cpu.run(x[i:i + 64], [onnxmeta.LOGITS])[0] for i in range(0, n, 64)])
    out = {"model": fp32.parent.name, "images": n, "input": f"{c}x{h}x{w}", "provider": provider}
    for precision, path in (("fp32", fp32), ("fp16", with_fp16(fp32, work / "trained"))):
        m = load_model(path, providers=provider, warm_up=False)
        got = np.concatenate([m.run(x[i:i + 64], [onnxmeta.LOGITS])[0] for i in range(0, n, 64)])
        out[precision] = {"providers": m.providers, "max_logit_diff": float(np.abs(got - want).max()),
                          "top1_agreement": float(np.mean(got.argmax(1) == want.argmax(1)))}
        log(f"correctness {precision} on {m.providers[0]}: max |logit diff| {out[precision]['max_logit_diff']:.2e}, "
            f"top-1 agreement {out[precision]['top1_agreement']:.4f}")
    return out


# --- 2. in-process throughput -------------------------------------------------------------------------

def in_process(fp32: Path, provider: str, batches, seconds: float, on_cuda: bool) -> dict:
    """Images/s by precision and method at each batch size (``materialise``'s files)."""
    from cnnserve.core.runtime import create_session

    outputs, out = list(onnxmeta.OUTPUTS), {}
    for precision, path in (("fp32", fp32), ("fp16", Path(onnxmeta.variant_file(str(fp32), "fp16")))):
        device = "cuda" if on_cuda else "cpu"
        sess = create_session(path, provider, device=DeviceOptions())
        shape = tuple(sess.get_inputs()[0].shape[1:])

        def buckets():  # one bucket per batch size measured: no padding; on CUDA each its own graph
            graphs = create_session(path, provider, device=DeviceOptions(cuda_graphs=True)) if on_cuda else sess
            runner = binding.Buckets(graphs, shape, outputs, batches, device, graphs=on_cuda)
            runner.warm()  # the graphs captured before the clock starts (onnxruntime runs a size twice first)
            return runner.run

        runners = {"plain": lambda: lambda x, o: sess.run(o, {onnxmeta.INPUT: x}),
                   "io_binding": lambda: binding.Bound(sess, device).run,
                   ("cuda_graphs" if on_cuda else "buckets"): buckets}
        out[precision] = {method: attempt(f"{fp32.parent.name} {precision} {method}", measure_runs, make, shape,
                                          batches, seconds, f"{fp32.parent.name} {precision} {method}")
                          for method, make in runners.items()}
    return out


def measure_runs(make, shape: tuple, batches, seconds: float, label: str) -> list[dict]:
    """Images/s of the runner ``make()`` gives at each batch size."""
    run, rows, outputs = make(), [], list(onnxmeta.OUTPUTS)
    for b in batches:
        x = np.random.default_rng(b).integers(0, 256, (b, *shape), dtype=np.uint8)
        rows.append(timed(lambda: run(x, outputs), b, seconds, 3))
        log(f"{label} batch {b}: {rows[-1]['images_per_s']:.0f} img/s")
    return rows


def torch_peer(arch: str, size: int, batches, seconds: float, on_cuda: bool) -> list[dict] | str:
    """PyTorch eager on the same device: fp16 and channels_last on CUDA (fp32 on the CPU in a rehearsal)."""
    try:
        import torch

        from cnnserve.models.registry import build_classifier, spec_for
    except ImportError as e:
        return f"not run: {e}"
    device = "cuda" if on_cuda and torch.cuda.is_available() else "cpu"
    model = build_classifier(spec_for(arch, [f"class{i}" for i in range(1000)], size=size)).eval().to(device)
    dtype, layout = (torch.float16, torch.channels_last) if device == "cuda" else (torch.float32, torch.contiguous_format)
    net = model.net.to(dtype=dtype, memory_format=layout)
    scale, shift = model.scale.to(dtype), model.shift.to(dtype)
    rows = []
    for b in batches:
        x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)

        def run():  # the same uint8 input and normalisation as the ONNX graph's
            with torch.inference_mode():
                net((x.to(dtype) * scale - shift).contiguous(memory_format=layout))
            if device == "cuda":
                torch.cuda.synchronize()

        rows.append(timed(run, b, seconds, 3) | {"how": f"{str(dtype).removeprefix('torch.')} on {device}" +
                                             (" channels_last" if device == "cuda" else "")})
        log(f"PyTorch eager {arch} batch {b} on {device}: {rows[-1]['images_per_s']:.0f} img/s")
    return rows


# --- 3. the service -----------------------------------------------------------------------------------

def load_processes(url: str, files: str, clients: int, procs: int, duration: float, warmup: float) -> dict:
    """``clients`` closed-loop clients spread over ``procs`` load processes (one Python process tops out
    well below a GPU's rate), run at once; their throughputs summed, the worst p99."""
    procs = max(1, min(procs, clients))
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    running = [subprocess.Popen([sys.executable, "-m", "bench.load", url, "--files", files, "--concurrency",
                                 str(c), "--duration", str(duration), "--warmup", str(warmup)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in share]
    runs = []
    try:
        for p in running:
            out, err = p.communicate(timeout=duration + warmup + 180)
            if p.returncode:
                raise RuntimeError(f"load process failed: {err[-2000:]}")
            runs.append(json.loads(out.strip().splitlines()[-1]))
    finally:  # one that failed or hung: the others stop too, not left loading the next part's server
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"clients": clients, "processes": procs, "throughput_rps": sum(r["throughput_rps"] for r in runs),
            "p50_ms": statistics.median(r["latency_ms"].get("p50", 0) for r in runs),
            "p99_ms": max(r["latency_ms"].get("p99", 0) for r in runs),
            "n_non_200": sum(r["n_non_200"] for r in runs), "requests": sum(r["requests"] for r in runs)}


def service(fp32: Path, settings: dict, clients, duration: float, warmup: float, procs: int, work: Path) -> dict:
    """The model stored and served by ``bentoml serve`` with ``settings``, JPEG requests at each of ``clients``."""
    import urllib.request

    from cnnserve.core.runtime import choose_precision
    from cnnserve.export.store import store_model

    from tests.support.server import Server

    name = f"gpu-{fp32.parent.name}"
    tag = str(store_model(fp32, name).tag)
    size = int(fp32.parent.name.rsplit("-", 1)[1])
    images = work / f"jpeg-{size}"
    if not images.is_dir():
        images.mkdir(parents=True)
        for i, img in enumerate(shapes(200, size, seed=1)):
            img.save(images / f"{i:03d}.jpg", "JPEG", quality=90)
    _, choice = choose_precision(fp32, "auto", settings.get("providers", "auto"),
                                 batch_sizes=(1, int(settings.get("max_batch_size", 64))))
    out = {"settings": settings, "model": tag, "auto_precision": {k: choice[k] for k in choice if k != "file"},
           "runs": []}
    log(f"{name}: precision auto chose {choice['chosen']} ({choice.get('mean_ms_per_image', choice.get('reason'))})")
    srv = Server("--arg", f"models={tag}", *[a for k, v in settings.items() for a in ("--arg", f"{k}={v}")],
                 ready_timeout=600)
    try:
        with urllib.request.urlopen(srv.url + "/models", timeout=30) as r:
            served = json.loads(r.read())["models"][0]
        out["served"] = {k: served[k] for k in ("precision", "providers")} | {
            "runner": served["precision_choice"].get("runner")}
        for c in clients:
            out["runs"].append(load_processes(srv.url + "/classify", str(images / "*.jpg"), c, procs, duration, warmup))
            log(f"{name} service at {c} clients: {out['runs'][-1]['throughput_rps']:.0f} req/s, "
                f"p99 {out['runs'][-1]['p99_ms']:.0f} ms")
    finally:
        srv.stop()
    return out


# --- the run ------------------------------------------------------------------------------------------

def in_process_reference(rows: dict, precision: str, method: str, max_batch: int) -> float:
    """In-process onnxruntime's best images/s at ``precision`` by ``method`` at batches up to the service's."""
    got = rows.get(precision, {}).get(method)
    found = [r["images_per_s"] for r in got if r["batch"] <= max_batch] if isinstance(got, list) else []
    return max(found) if found else 0.0


def main(args, command: str) -> int:
    from .gpu_report import judge, write

    work = (Path(args.work).resolve() if args.work else ROOT / "bench" / "work") / "gpu"
    skeletons = Path(args.gpu_skeletons) if args.gpu_skeletons else work / "skeletons"
    on_cuda = cuda_works()
    size = args.gpu_size or (224 if on_cuda or args.gpu_prepare else 64)
    if args.gpu_prepare:  # where torch and the exporter are: the weightless graphs to carry to the GPU machine
        for arch in args.gpu_arches:
            log(f"wrote {prepare(arch, size, skeletons)}")
        return 0
    batches = args.gpu_batches or ([1, 8, 32, 64, 128, 256] if on_cuda else [1, 4])
    provider = "cuda" if on_cuda else "cpu"
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "mode": "gpu" if on_cuda else "rehearsal",
           "device": device_info(), "command": command, "size": size, "batches": batches, "arches": {}}
    log(f"{'GPU' if on_cuda else 'rehearsal on the CPU provider (no working CUDA here)'}: {doc['device']}")
    trained = Path(args.gpu_trained) if args.gpu_trained else ROOT / "runs" / "resnet18-shapes-64" / onnxmeta.MODEL_FILE
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{time.strftime('%Y-%m-%d')}-gpu-{'-'.join(doc['device']['gpu']['name'].split()[1:2]).lower()}"
        if on_cuda and doc["device"].get("gpu") else f"{time.strftime('%Y-%m-%d')}-gpu-rehearsal")
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every part: a run cut short by the device's time limit still leaves its figures
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))

    if "correctness" in args.gpu_sections:
        doc["correctness"] = attempt("correctness", correctness, trained, provider, work) if trained.is_file() else \
            f"not run: no export at {trained.name}"
        save()
    settings = dict(kv.split("=", 1) for kv in args.gpu_serve) if args.gpu_serve else (
        {"providers": "cuda", "precision": "fp16", "workers": 4, "decode_processes": 3, "max_batch_size": 128,
         "io_binding": "on", "runs_in_flight": 2, "max_queue": 4096, "grpc_port": 0} if on_cuda else
        {"providers": "cpu", "precision": "auto", "workers": 1, "max_batch_size": 8, "io_binding": "on",
         "runs_in_flight": 2, "grpc_port": 0})
    for arch in args.gpu_arches:
        skeleton = skeletons / f"{arch}-{size}.skeleton.onnx"
        r = doc["arches"][arch] = {}
        if not skeleton.is_file():
            skeleton = attempt(f"{arch}: tracing", prepare, arch, size, skeletons)
        fp32 = attempt(f"{arch}: weights", materialise, skeleton, work / f"{arch}-{size}") \
            if isinstance(skeleton, Path) else skeleton
        if not isinstance(fp32, Path):
            r["error"] = fp32
            continue
        if "in_process" in args.gpu_sections:
            r["in_process"] = attempt(f"{arch}: in-process", in_process, fp32, provider, batches, args.seconds, on_cuda)
            save()
        if "pytorch" in args.gpu_sections:
            r["pytorch"] = attempt(f"{arch}: PyTorch", torch_peer, arch, size, batches, args.seconds, on_cuda)
            save()
        if "service" in args.gpu_sections and isinstance(r.get("in_process"), dict):
            s = r["service"] = attempt(f"{arch}: service", service, fp32, settings, args.gpu_clients, args.short,
                                       args.warmup, args.gpu_load_procs, work)
            save()
            if not isinstance(s, dict):
                continue
            precision = s["served"]["precision"]
            # the in-process figure of the path the server really took (a refused graph capture: plain binding)
            kind = (s["served"].get("runner") or "session.run").split(" ", 1)[0]
            method = "plain" if kind == "session.run" else kind
            s["reference"] = f"{precision} {method} up to batch {settings.get('max_batch_size', 64)}"
            s["reference_images_per_s"] = in_process_reference(r["in_process"], precision, method,
                                                               int(settings.get("max_batch_size", 64)))
    doc["targets"] = judge(doc)
    save()
    print(write(doc, stem))
    log(f"wrote {stem}.json, .md and .png")
    return 0
