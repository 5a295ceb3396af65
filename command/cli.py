"""The ``cnnserve`` command: one door with subcommands.

Parsers are declared here; each handler imports its module only when it runs, so the
serving commands never import torch and ``cnnserve --help`` is instant.
A bad input ends with one line, ``cnnserve: error: ...``, and exit status 2; set
``CNNSERVE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from cnnserve.core.config import DEFAULT_MODEL, DEFAULTS
from cnnserve.core.store import NotStored, bentoml_command, stored_model

DEFAULT_ARCH = "lenet5"
DEFAULT_DATA = "digits"
DEFAULT_RUN = "runs/lenet5-digits"


def _cmd_models(args) -> int:
    from cnnserve import models
    from cnnserve.models.summary import format_table, human, summarize_arch

    if args.name and ":" in args.name and any(ch in args.name for ch in "*?["):
        from cnnserve.models.pretrained import library_models

        lib, _, pattern = args.name.partition(":")
        names = library_models(lib, pattern)
        print("\n".join(f"{lib}:{n}" for n in names) if names else f"{lib} has no architecture matching {pattern!r}")
        return 0
    if args.name:
        entry = models.get_entry(args.name)
        classes = args.classes or (10 if entry.spec.channels == 1 else 1000)
        s = summarize_arch(args.name, classes, args.channels, args.img_size)
        if args.summary:
            print(format_table(s))
        else:
            print(f"{entry.name}: {entry.description}\n  input {'x'.join(map(str, s.input))}, "
                  f"{classes} classes: {s.params:,} parameters, {s.macs:,} multiply-adds")
        return 0
    rows = []
    for name in models.list_models():
        e = models.get_entry(name)
        classes = 10 if e.spec.channels == 1 else 1000
        s = summarize_arch(name, classes)
        rows.append((name, e.family, "x".join(map(str, s.input)), str(classes), f"{s.params:,}", human(s.macs),
                     e.description))
    head = ("name", "family", "input", "classes", "params", "MACs", "description")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i in (0, 1, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


def _cmd_train(args) -> int:
    from cnnserve.models.train import config_from_args, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "overwrite") and v is not None}
    train(config_from_args(given, args.resume), resume=args.resume, overwrite=args.overwrite)
    return 0


def _add_train(sub) -> None:
    from_doc = "Train an architecture on a data set; writes a run folder (checkpoint, metrics, PNGs)."
    p = sub.add_parser("train", help=from_doc, description=from_doc)
    S = argparse.SUPPRESS  # options not given keep TrainConfig's defaults (or, on --resume, the stored ones)
    p.add_argument("arch", nargs="?", default=S, help=f"architecture (see `cnnserve models`; default {DEFAULT_ARCH})")
    p.add_argument("--data", default=S, help="digits (default), mnist, fashion-mnist, cifar10, folder, shapes")
    p.add_argument("--data-dir", default=S, help="directory of the data set's files")
    p.add_argument("--download", action="store_true", default=S, help="fetch MNIST / Fashion-MNIST into --data-dir")
    p.add_argument("--img-size", type=int, default=S, help="input side in pixels (default: the architecture's)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=S, help="input channels (default: the data's)")
    p.add_argument("--limit", type=int, default=S, help="use at most this many training images")
    p.add_argument("--epochs", type=int, default=S, help="default 30")
    p.add_argument("--batch-size", type=int, default=S, help="default 32")
    p.add_argument("--optimizer", default=S, help="sgd, momentum, adagrad, rmsprop, adadelta, adam (default), adamw")
    p.add_argument("--lr", type=float, default=S, help="learning rate (default per optimizer)")
    p.add_argument("--momentum", type=float, default=S, help="for --optimizer momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=S, help="L2 penalty (default 0)")
    p.add_argument("--schedule", default=S, help="cosine (default), step, none")
    p.add_argument("--warmup-epochs", type=int, default=S, help="linear warm-up epochs")
    p.add_argument("--step-size", type=int, default=S, help="epochs between step decays")
    p.add_argument("--gamma", type=float, default=S, help="step decay factor")
    p.add_argument("--init", default=S, help="kaiming (default), xavier, default")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S,
                   help="random crop and horizontal flip (default: on for RGB data)")
    p.add_argument("--label-smoothing", type=float, default=S, help="cross-entropy label smoothing (default 0)")
    p.add_argument("--patience", type=int, default=S, help="early-stop patience in epochs (0: off; default 10)")
    p.add_argument("--seed", type=int, default=S, help="seeds weights, shuffling and augmentation (default 0; "
                                                        "the data splits are fixed whatever the seed)")
    p.add_argument("--workers", type=int, default=S, help="data loader processes")
    p.add_argument("--pretrained", default=S, help="fine-tune from these weights: a torchvision or timm state dict "
                                                    "(.pth, .safetensors); the head is replaced for the data's classes")
    p.add_argument("--freeze-backbone", action="store_true", default=S, help="with --pretrained: train the head only")
    p.add_argument("--backbone-lr", type=float, default=S,
                   help="the backbone's learning rate as a fraction of --lr (default 0.1 with --pretrained)")
    p.add_argument("--out", default=S, help="run folder (default runs/ARCH-DATA); one that holds a run is refused "
                                            "(the message names the next free runs/ARCH-DATA-N)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: its checkpoints, metrics, pictures and exports are removed first")
    p.add_argument("--resume", default=None, help="continue from a run's last.pt (in its own folder)")
    p.set_defaults(func=_cmd_train)


def _store(path, name=None) -> str:
    from cnnserve.export.store import store_model

    model = store_model(path, name)
    print(f"stored {path} as {model.tag} in BentoML's model store")
    return str(model.tag)


def _cmd_export(args) -> int:
    from pathlib import Path

    from cnnserve.export.files import VariantsFailed
    from cnnserve.models.fromweights import checkpoint_from_weights
    from cnnserve.export.pipeline import export_checkpoint

    checkpoint = args.checkpoint
    if args.weights:  # an architecture by name and a weights file: first a checkpoint of them, named as --out
        out = Path(args.out).with_suffix(".pt") if args.out else Path("runs") / checkpoint.replace(":", "-") / "model.pt"
        checkpoint = checkpoint_from_weights(checkpoint, args.weights, out, args.labels, args.overwrite)
        print(f"checkpoint {checkpoint} ({args.checkpoint} with {args.weights})")
    elif args.labels:
        raise ValueError("--labels goes with --weights (a checkpoint carries its own labels)")
    try:
        results = export_checkpoint(checkpoint, args.out, fp16=args.fp16, int8=args.int8,
                                    calibration=args.calibration, calibration_method=args.calibration_method,
                                    int8_format=args.int8_format, simplify_graph=args.simplify,
                                    data_dir=args.data_dir, opset=args.opset, overwrite=args.overwrite,
                                    calibrate=args.calibrate)
    except VariantsFailed as e:
        # the verified fp32 file (and any variant that passed) is not thrown away with the refused variant
        fp32 = e.results[0]["path"]
        for failure in e.failures:
            print(f"cnnserve: error: {failure}", file=sys.stderr)
        kept = ", ".join(r["info"].precision for r in e.results)
        if args.store:
            tag = _store(fp32, args.name)
            print(f"cnnserve: stored what passed ({kept}) as {tag}; the service serves it without the refused "
                  "variant", file=sys.stderr)
        else:
            print(f"cnnserve: what passed ({kept}) is written: `cnnserve store {fp32}` stores it without the "
                  "refused variant", file=sys.stderr)
        return 1
    if args.store:  # the fp32 file, with its variants (export/store.py)
        _store(results[0]["path"], args.name)
    return 0


def _cmd_quantize(args) -> int:
    from pathlib import Path

    from cnnserve.core.onnxmeta import variant_file
    from cnnserve.export.files import ExportError
    from cnnserve.export.pipeline import export_int8
    from cnnserve.export.quantize import folder_images
    from cnnserve.export.store import read_info

    import onnx

    src = Path(args.onnx)
    info = read_info(src)
    if info.precision != "fp32":
        raise ExportError(f"{src}: a {info.precision} model; quantize the fp32 one")
    try:
        images = folder_images(args.images, info.spec, args.calibration + args.check)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if len(images) < args.calibration + 16:
        raise ExportError(f"{args.images}: {len(images)} images; calibration takes {args.calibration} and at least "
                          f"16 more are needed to check the result (or lower --calibration)")
    calibration, rest = images[:args.calibration], images[args.calibration:]
    # no labels in a folder: the method is chosen and the result verified on agreement with fp32 alone
    export_int8(onnx.load_model(str(src)), info, Path(variant_file(str(src), "int8")), (calibration, None),
                (rest, None), (rest, None), args.calibration_method, args.int8_format, f"folder {args.images}")
    if args.store:
        _store(src, args.name)
    return 0


def _cmd_import(args) -> int:
    from cnnserve.export.importer import ModelImportError, import_onnx
    from cnnserve.models.fromweights import read_labels

    try:
        size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
        if size is not None and len(size) != 2:
            raise ValueError
    except ValueError:
        raise ModelImportError(f"--size {args.size!r}: expected HxW, e.g. 224x224") from None
    if len(args.mean) != len(args.std):
        raise ModelImportError(f"--mean has {len(args.mean)} values and --std {len(args.std)}: one per channel each")
    result = import_onnx(args.onnx, mean=args.mean, std=args.std, labels=read_labels(args.labels), size=size,
                         layout=args.layout,
                         outputs=args.outputs, resize=args.resize, crop_pct=args.crop_pct,
                         interpolation=args.interpolation, out=args.out, images=args.images, overwrite=args.overwrite)
    if args.store:
        _store(result["path"], args.name)
    return 0


def _cmd_calibrate(args) -> int:
    from cnnserve.export.recalibrate import calibrate_file

    calibrate_file(args.onnx, args.images, args.out)
    return 0


def _cmd_visualize(args) -> int:
    from cnnserve.models.visualize import visualize

    for path in visualize(args.checkpoint, args.image, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_store(args) -> int:
    _store(args.onnx, args.name)
    return 0


def _cmd_up(args) -> int:
    """The main job on the embedded default: train LeNet-5 on digits unless a checkpoint exists,
    export and verify it unless an up-to-date ONNX file exists, store it unless the store holds it."""
    from pathlib import Path

    run = Path(args.run)
    ckpt, onnx_path = run / "model.pt", run / "model.onnx"
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
    return _serve([tag], args.port, args.host, sample=samples[-1] if samples else None)


def _serve(tags, port: int, host: str, extra=(), sample=None) -> int:
    """Replace this process with `bentoml serve` of the project's service (from the repository root)."""
    from pathlib import Path

    # one name everywhere (docs/design.md, "One name per module"): as bentofile.yaml names it
    root = Path(__file__).resolve().parents[1]
    workdir = ["--working-dir", str(root)] if (root / "bentofile.yaml").is_file() else []
    bentoml = bentoml_command()
    argv = [bentoml, "serve", "cnnserve.service.service:CnnServe", *workdir, "--host", host,
            "--port", str(port), "--arg", "models=" + " ".join(tags), *extra]
    print(f"serving {' '.join(tags)} on http://{host}:{port} (Ctrl+C to stop); try:\n"
          f"  curl -F image=@{sample or 'IMAGE.png'} http://127.0.0.1:{port}/classify")
    sys.stdout.flush()
    os.execv(bentoml, argv)
    return 0  # not reached


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
    return _store(onnx_path)


def _cmd_score(args) -> int:
    from cnnserve.scoring.run import score

    summary = score(args.inputs, args.out, model=args.model, engine=args.engine, top_k=args.top_k,
                    batch_size=args.batch_size, workers=args.workers, url=args.url, concurrency=args.concurrency,
                    ray_address=args.ray_address, providers=args.providers, precision=args.precision,
                    resume=args.resume,
                    overwrite=args.overwrite, decoders=args.decoders)
    if summary["interrupted"]:
        return 130
    return 1 if args.fail_on_error and summary["failed"] else 0


def _cmd_container(args) -> int:
    from cnnserve.command.container import main as container_main

    return container_main(args.models, args.gpu, args.backend, args.image_tag, args.opt, args.arg)


def _cmd_bench(args) -> int:  # reached only through parse_args (main sends `bench ...` to the harness first)
    from cnnserve.bench.harness import main as bench_main

    return bench_main(args.bench_args)


def _add_int8_options(p) -> None:
    from cnnserve.export.quantize import FORMATS, METHODS

    p.add_argument("--calibration", type=int, default=128, help="int8: calibration images (default 128)")
    p.add_argument("--calibration-method", default="auto", choices=("auto", *METHODS),
                   help="int8: auto quantizes with minmax and percentile and keeps the one that agrees best with "
                        "fp32 on held-out images")
    p.add_argument("--int8-format", choices=tuple(FORMATS), default=None,
                   help="int8: activation/weight types (default: onnxruntime's advice for this CPU, u8s8-reduce "
                        "on x86 without VNNI, u8s8 with it, s8s8 on ARM; without VNNI u8u8 is tried too and the "
                        "one that agrees best with fp32 on held-out images is kept)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve", description="Train CNNs, export them to ONNX, serve them with BentoML.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures, or describe one",
                       description="List the registry with input size, parameters and multiply-adds; describe one "
                                   "architecture (a zoo name, timm:NAME or torchvision:NAME); or list a library's "
                                   "architectures by a pattern: cnnserve models 'timm:*resnet*'.")
    p.add_argument("name", nargs="?", help="one architecture, or LIBRARY:PATTERN (timm:*res*, torchvision:*)")
    p.add_argument("--summary", action="store_true", help="layer-by-layer table")
    p.add_argument("--classes", type=int, help="number of classes (default 10 for grey models, 1000 for RGB)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="input channels (default: the architecture's)")
    p.add_argument("--img-size", type=int, help="input side in pixels (default: the architecture's)")
    p.set_defaults(func=_cmd_models)

    _add_train(sub)

    p = sub.add_parser("export", help="checkpoint to a verified, self-contained ONNX file",
                       description="Export a checkpoint to ONNX (uint8 input, normalisation inside, spec and labels "
                                   "in the metadata), verify it against PyTorch on the test split, optionally store it.")
    p.add_argument("checkpoint", help="a run's model.pt (or the run folder); with --weights, an architecture: "
                                      "a zoo name, timm:NAME or torchvision:NAME")
    p.add_argument("--weights", help="a state dict for that architecture (.pth, .safetensors; nothing is downloaded)")
    p.add_argument("--labels", help="with --weights: class names, one per line (default: ImageNet-1k's for 1000 "
                                    "classes)")
    p.add_argument("--out", "-o", help="ONNX file to write (default: beside the checkpoint, model.onnx)")
    p.add_argument("--fp16", action="store_true", help="also write a half-precision variant (NAME.fp16.onnx)")
    p.add_argument("--int8", action="store_true", help="also write a statically quantized variant (NAME.int8.onnx), "
                                                       "calibrated on the training split and verified on the test split")
    _add_int8_options(p)
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=False,
                   help="simplify the graph with onnxslim (off by default: measured not to pay on CPU, "
                        "docs/models.md)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="probabilities = softmax(logits / T), T fitted on the validation split (temperature "
                        "scaling; the logits output stays raw); --no-calibrate keeps the raw softmax")
    p.add_argument("--data-dir", help="where the checkpoint's data set lives now (to rebuild its test split)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    p.add_argument("--store", action="store_true", help="save the exported file(s) into BentoML's model store "
                                                        "(if a variant fails its verification, what passed is stored "
                                                        "and the command exits 1)")
    p.add_argument("--name", help="model store name (default ARCH-DATA; variants are stored with it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files that are not an earlier export of this checkpoint (refused otherwise; "
                        "re-exporting a checkpoint replaces its own files)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="wrap any ONNX classifier (float input) as a verified cnnserve model",
                       description="Compose uint8 input, normalisation and probabilities around an ONNX classifier "
                                   "made elsewhere, verify the result against the original on real images "
                                   "(max difference 1e-4), write it with the metadata contract and store it.")
    p.add_argument("onnx", help="the ONNX file (one float32 4-D input, a [batch, classes] output)")
    p.add_argument("--mean", type=float, nargs="+", required=True, help="per-channel mean the model expects (0-1 scale)")
    p.add_argument("--std", type=float, nargs="+", required=True, help="per-channel std (0-1 scale)")
    p.add_argument("--labels", required=True, help="class names, one per line, in output order")
    p.add_argument("--size", help="HxW input size (needed when the model's height/width are dynamic)")
    p.add_argument("--layout", default="nchw", choices=("nchw", "nhwc"), help="the model's input layout")
    p.add_argument("--outputs", default="logits", choices=("logits", "probabilities"),
                   help="what the model's output holds (probabilities: logits are their log)")
    p.add_argument("--resize", default="center-crop", choices=("center-crop", "stretch"),
                   help="how the service brings an image to --size (default %(default)s: the shorter side to "
                        "size / crop-pct, then the centre; stretch: the whole image to the size). It must match "
                        "the preprocessing the model was trained with")
    p.add_argument("--crop-pct", type=float, default=0.875,
                   help="center-crop: the crop's share of the resized side (default %(default)s, as timm and "
                        "torchvision's ImageNet models: 224 of 256)")
    p.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"),
                   help="resampling filter (default %(default)s)")
    p.add_argument("--images", help="a folder of your own images to verify with (default: drawn shapes)")
    p.add_argument("--out", "-o", help="ONNX file to write (default runs/imported-NAME/model.onnx)")
    p.add_argument("--name", help="model store name (default onnx-NAME)")
    p.add_argument("--store", action=argparse.BooleanOptionalAction, default=True,
                   help="save it into BentoML's model store (default on)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is not an earlier import of the same file (refused otherwise)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("calibrate", help="temperature scaling and the OOD threshold for an ONNX model, on a folder "
                                         "of labelled images",
                       description="Fit the temperature (probabilities = softmax(logits / T)) and the out-of-"
                                   "distribution threshold of an exported or imported model on DIR (one folder per "
                                   "class, named as its labels): half of each class fits, half measures (ECE, NLL, "
                                   "Brier before and after, AUROC on noise); the report is written beside it.")
    p.add_argument("onnx", help="an fp32 file written by `cnnserve export` or `cnnserve import`")
    p.add_argument("--images", required=True, help="a folder with one sub-folder of images per class")
    p.add_argument("--out", "-o", help="ONNX file to write (default: replace ONNX, refused while fp16/int8 "
                                       "variants lie beside it)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("quantize", help="an int8 variant of any cnnserve ONNX file, calibrated on a folder of images",
                       description="Static int8 quantization (QDQ, per-channel weights) of an exported or imported "
                                   "model, calibrated on the first --calibration images of a folder and verified on "
                                   "the rest (top-1 agreement with fp32 at least 99%); writes NAME.int8.onnx beside it.")
    p.add_argument("onnx", help="an fp32 file written by `cnnserve export` or `cnnserve import`")
    p.add_argument("--images", required=True, help="a folder of images like those the model will see")
    p.add_argument("--check", type=int, default=256, help="images after the calibration ones to verify with (at most)")
    _add_int8_options(p)
    p.add_argument("--store", action=argparse.BooleanOptionalAction, default=True,
                   help="store the model again with its new variant (default on)")
    p.add_argument("--name", help="model store name (default ARCH-DATA)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("visualize", help="pictures of a trained network: first-layer filters, feature maps",
                       description="Write filters.png (the first convolution's filters) and, with --image, "
                                   "features.png (the feature maps after each convolution, activation and pooling, "
                                   "with their shapes) for a checkpoint.")
    p.add_argument("checkpoint", help="a run's model.pt (or the run folder)")
    p.add_argument("--image", help="an image to show the feature maps of (decoded as the service decodes it)")
    p.add_argument("--out", "-o", help="folder to write into (default: beside the checkpoint)")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("store", help="save an exported ONNX file into BentoML's model store",
                       description="Save a file written by `cnnserve export` or `cnnserve import` into BentoML's "
                                   "model store (BENTOML_HOME), with the verified variants beside it made from "
                                   "the same weights (NAME.fp16.onnx, NAME.int8.onnx).")
    p.add_argument("onnx", help="a file written by `cnnserve export` or `cnnserve import`")
    p.add_argument("--name", help="model name (default ARCH-DATA)")
    p.set_defaults(func=_cmd_store)

    p = sub.add_parser("score", help="score folders, globs or manifests of images into a predictions file",
                       description="Batch scoring with the service's own preprocessing and model. Output format "
                                   "from --out's extension: .csv, .jsonl, .parquet. Written as it goes; --resume "
                                   "completes a partial file.")
    p.add_argument("inputs", nargs="+", help="folders (recursive), globs, manifests (.txt/.csv/.parquet with a "
                                             "'path' column) or image files")
    p.add_argument("--model", help=f"an exported .onnx file or a model store tag (default {DEFAULT_MODEL}, as "
                                   "the service; http engine: the served model name, default the service's)")
    p.add_argument("--out", "-o", required=True, help="predictions file: .csv, .jsonl or .parquet")
    p.add_argument("--engine", default="local", help="local (default), http, ray")
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="classes per image (at most the model's)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.max_batch_size,
                   help="images per onnxruntime run (local, ray) or per progress step (http)")
    p.add_argument("--workers", type=int, help="decoders (local) or Ray CPUs (default: all cores)")
    p.add_argument("--decoders", default="auto", choices=("auto", "processes", "threads"),
                   help="local engine: decode in processes (scales with cores) or threads (starts at once); "
                        "auto: processes from 5,000 files")
    p.add_argument("--url", help="http engine: the service, e.g. http://127.0.0.1:3000")
    p.add_argument("--concurrency", type=int, default=16, help="http engine: requests in flight")
    p.add_argument("--ray-address", help="ray engine: join this cluster (default: start a local Ray)")
    p.add_argument("--providers", default=DEFAULTS.providers, help="auto, cuda, cpu")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=("auto", "fp32", "fp16", "int8"),
                   help="the model's verified variant to run (auto: the fastest here, timed at --batch-size)")
    p.add_argument("--resume", action="store_true", help="skip inputs already in --out and complete it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any input failed")
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

    p = sub.add_parser("bench", help="the benchmark harness (`cnnserve bench --help` lists its options)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("up", help="the main job: train the default model if needed, then export and serve it",
                       description="Train LeNet-5 on the bundled digits unless a checkpoint exists, export and "
                                   "verify it unless an up-to-date ONNX file exists, store it unless the store "
                                   "holds it, then serve it with `bentoml serve` (what `./run.sh up` runs).")
    p.add_argument("--run", default=DEFAULT_RUN, help=f"run folder of the default model (default {DEFAULT_RUN})")
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--no-serve", action="store_true", help="stop after storing the model")
    p.add_argument("--port", type=int, default=3000, help="HTTP port")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface)")
    p.set_defaults(func=_cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness parses its own options (argparse's REMAINDER would not take them)
        from cnnserve.bench.harness import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("cnnserve: interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError) as e:
        # Every error the project raises for bad input is a ValueError or KeyError subclass with a
        # message that names the file or the value; OSError covers files that vanish or cannot be written.
        if os.environ.get("CNNSERVE_DEBUG"):
            raise
        print(f"cnnserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
