"""Running models: ``cnnserve up`` (the main job on the embedded default), ``score`` and ``container``.

The serving commands never import torch unless they must train (``up`` without a checkpoint).
"""

from __future__ import annotations

import os
import sys

from cnnserve.core.config import DEFAULT_ARCH, DEFAULT_DATA, DEFAULT_MODEL, DEFAULTS, PRECISIONS
from cnnserve.core.onnxmeta import MODEL_FILE
from cnnserve.core.store import NotStored, bentoml_command, stored_model
from cnnserve.scoring import DECODERS, ENGINES

from .make import store

DEFAULT_RUN = f"runs/{DEFAULT_ARCH}-{DEFAULT_DATA}"


def _cmd_up(args) -> int:
    """The main job on the embedded default: train LeNet-5 on digits unless a checkpoint exists,
    export and verify it unless an up-to-date ONNX file exists, store it unless the store holds it."""
    from pathlib import Path

    run = Path(args.run)
    ckpt, onnx_path = run / "model.pt", run / MODEL_FILE
    if not args.no_serve:  # before minutes of training, not after them
        _check_ports(args.host, args.port, _grpc_port(args))
    if ckpt.is_file() and not args.retrain:
        print(f"[1/3] using the trained model in {run}/ (--retrain to train again)")
    else:
        from cnnserve.models.train import TrainConfig, train

        print(f"[1/3] training {DEFAULT_ARCH} on {DEFAULT_DATA} into {run}/")
        train(TrainConfig(arch=DEFAULT_ARCH, data=DEFAULT_DATA, out=str(run)), overwrite=args.retrain)
    if onnx_path.is_file() and onnx_path.stat().st_mtime >= ckpt.stat().st_mtime:
        print(f"[2/3] using the exported {onnx_path}")
    else:
        from cnnserve.export.pipeline import export_checkpoint

        print(f"[2/3] exporting {ckpt} to ONNX")
        export_checkpoint(ckpt, onnx_path, overwrite=True)  # up keeps this folder's export up to date
    _write_samples(run)
    tag = _ensure_stored(onnx_path)
    print(f"[3/3] model store holds {tag}")
    print(f"checkpoint {ckpt}; curves {run / 'curves.png'}; confusion matrix {run / 'confusion.png'}")
    if args.no_serve:
        return 0
    samples = sorted(run.glob("sample-*.png"))
    grpc_port = _grpc_port(args)
    extra = (*(("--arg", f"grpc_port={grpc_port}") if grpc_port is not None else ()),
             *(("--arg-file", os.path.abspath(args.arg_file)) if args.arg_file else ()))
    return _serve([tag], args.port, args.host, extra, sample=samples[-1] if samples else None, grpc_port=grpc_port)


def _grpc_port(args) -> int | None:
    """gRPC's port for ``up``: --grpc-port; else the arg file's grpc_port (None: the file says it); else the
    port after HTTP's, so that ``up --port P`` never takes another server's gRPC port (3001 beside 3000)."""
    if args.grpc_port is not None:
        return args.grpc_port
    if args.arg_file:
        from pathlib import Path

        import yaml

        try:
            named = yaml.safe_load(Path(args.arg_file).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            named = None  # bentoml serve says what is wrong with the file
        if isinstance(named, dict) and "grpc_port" in named:
            return None
    return args.port + 1 if args.port < 65535 else 0


def _serve(tags, port: int, host: str, extra=(), sample=None, grpc_port: int | None = None) -> int:
    """Replace this process with `bentoml serve` of the project's service, from an empty working directory."""
    # One name everywhere (docs/design.md, "One name per module"): bentoml serve puts its working directory on
    # sys.path, and from the repository root the served process could import service/ as a bare ``service``
    # beside the installed cnnserve.service. The service is found by its installed name; the folder is empty.
    workdir = ["--working-dir", str(_empty_workdir())]
    bentoml = bentoml_command()
    argv = [bentoml, "serve", "cnnserve.service.service:CnnServe", *workdir, "--host", host,
            "--port", str(port), "--arg", "models=" + " ".join(tags), *extra]
    grpc = f", gRPC on port {grpc_port}" if grpc_port else ", no gRPC" if grpc_port == 0 else ""
    _check_ports(host, port, grpc_port)  # again: training and export took a while
    print(f"serving {' '.join(tags)} on http://{host}:{port}{grpc} (Ctrl+C to stop); try:\n"
          f"  curl -F image=@{sample or 'IMAGE.png'} http://127.0.0.1:{port}/classify")
    sys.stdout.flush()
    os.execv(bentoml, argv)
    return 0  # not reached


def _empty_workdir():
    from pathlib import Path

    folder = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "cnnserve-workdir"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_ports(host: str, port: int, grpc_port: int | None) -> None:
    """A ValueError naming each of HTTP's and gRPC's ports that another process holds (``cnnserve: error:``, one
    line, exit 2), raised before anything says "serving": ``bentoml serve`` fails on a taken HTTP port only
    after its start, with a long traceback."""
    from cnnserve.service.startup import taken_ports

    taken = taken_ports(host, {"HTTP": port, "gRPC": grpc_port or 0})
    if taken:
        raise ValueError(taken)


def _write_samples(run) -> None:
    """One held-out test image per class as sample-LABEL.png, for trying the service by hand."""
    if list(run.glob("sample-*.png")):
        return
    from cnnserve.models.checkpoint import load_checkpoint
    from cnnserve.models.data import load_dataset, save_png

    spec = load_checkpoint(run / "model.pt")["spec"]
    test = load_dataset(DEFAULT_DATA, spec).test
    done = set()
    for i in range(len(test)):
        x, y = test[i]
        if int(y) not in done:
            done.add(int(y))
            (run / f"sample-{spec.labels[int(y)]}.png").write_bytes(save_png(x.numpy()))
    print(f"wrote {len(done)} sample images to {run}/sample-*.png (held-out test images)")


def _ensure_stored(onnx_path) -> str:
    """Store the file unless the store's latest model of that name came from the same checkpoint."""
    from cnnserve.export.store import default_name, read_info

    info = read_info(onnx_path)
    try:
        latest = stored_model(f"{default_name(info)}:latest")
        if latest.info.metadata.get("checkpoint_sha256") == info.checkpoint_sha256:
            return str(latest.tag)
    except NotStored:
        pass
    return store(onnx_path)


def settings_from(pairs: list[str]):
    """``Settings`` from KEY=VALUE pairs; a bad key or value is a ValueError naming it."""
    from pydantic import ValidationError

    from cnnserve.core.config import Settings

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in Settings.model_fields:
            raise ValueError(f"--arg {pair!r}: expected KEY=VALUE with a service setting as KEY (docs/serving.md)")
        values[key] = value
    try:
        return Settings(**values)
    except ValidationError as e:
        raise ValueError("--arg: " + "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors())) from None


def _cmd_score(args) -> int:
    from cnnserve.scoring.run import score

    summary = score(args.inputs, args.out, model=args.model, engine=args.engine, top_k=args.top_k,
                    batch_size=args.batch_size, workers=args.workers, url=args.url, concurrency=args.concurrency,
                    ray_address=args.ray_address, providers=args.providers, precision=args.precision,
                    resume=args.resume, overwrite=args.overwrite, decoders=args.decoders,
                    settings=settings_from(args.arg))
    if summary["interrupted"]:
        return 130
    return 1 if args.fail_on_error and summary["failed"] else 0


def _cmd_container(args) -> int:
    from cnnserve.command.container import main as container_main

    return container_main(args.models, args.gpu, args.backend, args.image_tag, args.opt, args.arg)


def add_parsers(sub) -> None:
    p = sub.add_parser("score", help="score folders, globs or manifests of images into a predictions file",
                       description="Batch scoring with the service's own preprocessing and model. Output format "
                                   "from --out's extension: .csv, .jsonl, .parquet. Written as it goes; --resume "
                                   "completes a partial file.")
    p.add_argument("inputs", nargs="+", help="folders (recursive), globs, manifests (.txt/.csv/.parquet with a "
                                             "'path' column, .jsonl with a 'path' key, as a traffic capture's "
                                             "manifest-N.jsonl) or image files")
    p.add_argument("--model", help=f"an exported .onnx file or a model store tag (default {DEFAULT_MODEL}, as "
                                   "the service; http engine: the served model name, default the service's)")
    p.add_argument("--out", "-o", required=True, help="predictions file: .csv, .jsonl or .parquet")
    p.add_argument("--engine", default=ENGINES[0], help=f"{', '.join(ENGINES)} (default {ENGINES[0]})")
    p.add_argument("--top-k", type=int, help=f"classes per image, between 1 and the model's classes (default "
                                             f"{DEFAULTS.top_k}, or all of them where the model has fewer)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.max_batch_size,
                   help="images per onnxruntime run (local, ray) or per progress step (http)")
    p.add_argument("--workers", type=int, help="decoders (local) or Ray CPUs (default: all cores)")
    p.add_argument("--decoders", default=DECODERS[0], choices=DECODERS,
                   help="local engine: decode in processes (scales with cores) or threads (starts at once); "
                        "auto: processes from 5,000 files")
    p.add_argument("--url", help="http engine: the service, e.g. http://127.0.0.1:3000; grpc engine: its gRPC "
                   "port, e.g. 127.0.0.1:3001")
    p.add_argument("--concurrency", type=int, default=16, help="http and grpc engines: requests in flight")
    p.add_argument("--ray-address", help="ray engine: join this cluster (default: start a local Ray)")
    p.add_argument("--providers", default=DEFAULTS.providers, help="auto, cuda, cpu")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS,
                   help="the model's verified variant to run (auto: the fastest here, timed at --batch-size)")
    p.add_argument("--resume", action="store_true", help="skip inputs already in --out and complete it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any input failed")
    p.add_argument("--arg", action="append", default=[],
                   help="a service setting KEY=VALUE, as `bentoml serve --arg` takes it (repeatable): the image "
                        "limits (max_request_mb, max_image_pixels, max_decoded_mb, formats, ...) hold here as in the service")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("container", help="build the serving image (bentoml build + containerize)",
                       description="Build the bento and its OCI image with docker (when a Docker engine answers) "
                                   "or podman.")
    p.add_argument("--models", default=DEFAULT_MODEL, help="model store tags to serve, space-separated")
    p.add_argument("--gpu", action="store_true", help="the CUDA image (bentofile-gpu.yaml)")
    p.add_argument("--backend", default="auto", choices=("auto", "docker", "podman"),
                   help="auto: docker where a Docker engine answers, else podman")
    p.add_argument("--image-tag", help="image name:tag (default: the bento's tag)")
    p.add_argument("--opt", action="append", default=[], help="KEY=VALUE passed to the engine's build (repeatable)")
    p.add_argument("--arg", action="append", default=[],
                   help="service argument KEY=VALUE baked into the bento, e.g. workers=2 (repeatable; the "
                        "arguments are in docs/serving.md)")
    p.set_defaults(func=_cmd_container)

    p = sub.add_parser("up", help="the main job: train the default model if needed, then export and serve it",
                       description="Train LeNet-5 on the bundled digits unless a checkpoint exists, export and "
                                   "verify it unless an up-to-date ONNX file exists, store it unless the store "
                                   "holds it, then serve it with `bentoml serve` (what `./run.sh up` runs).")
    p.add_argument("--run", default=DEFAULT_RUN, help=f"run folder of the default model (default {DEFAULT_RUN})")
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--no-serve", action="store_true", help="stop after storing the model")
    p.add_argument("--port", type=int, default=3000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="gRPC's port (the Open Inference Protocol, docs/grpc.md); 0: no gRPC (default: the port "
                        "after --port, 3001 beside 3000, unless --arg-file names grpc_port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--arg-file", help="service arguments from a YAML file, e.g. what `cnnserve tune` wrote (the "
                                      "served model stays the default one)")
    p.set_defaults(func=_cmd_up)
