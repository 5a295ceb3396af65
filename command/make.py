"""Making models: ``cnnserve train``, ``export``, ``import``, ``quantize``, ``visualize`` and ``store``.

Each handler imports its library module only when it runs (torch is imported by training and export
alone). Defaults come from the library: the opset, the spec's resize policies, the int8 formats.
"""

from __future__ import annotations

import argparse
import sys

from cnnserve.core.config import DEFAULT_ARCH
from cnnserve.core.onnxmeta import DEFAULT_OPSET, LOGITS, OUTPUTS
from cnnserve.core.spec import INTERPOLATIONS, RESIZE_MODES, RESIZE_POLICIES, ModelSpec

SPEC_DEFAULTS = {f: ModelSpec.__dataclass_fields__[f].default for f in ("crop_pct", "interpolation")}


def _cmd_train(args) -> int:
    from cnnserve.models.train import config_from_args, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "overwrite") and v is not None}
    train(config_from_args(given, args.resume), resume=args.resume, overwrite=args.overwrite)
    return 0


def add_train(sub) -> None:
    from_doc = "Train an architecture on a data set; writes a run folder (checkpoint, metrics, PNGs)."
    p = sub.add_parser("train", help=from_doc, description=from_doc)
    S = argparse.SUPPRESS  # options not given keep TrainConfig's defaults (or, on --resume, the stored ones)
    p.add_argument("arch", nargs="?", default=S, help=f"architecture (see `cnnserve models`; default {DEFAULT_ARCH})")
    p.add_argument("--data", default=S, help="digits (default), mnist, fashion-mnist, cifar10, folder, shapes")
    p.add_argument("--data-dir", default=S, help="directory of the data set's files")
    p.add_argument("--download", action="store_true", default=S, help="fetch MNIST / Fashion-MNIST into --data-dir")
    p.add_argument("--img-size", type=int, default=S, help="input side in pixels (default: the architecture's)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=S, help="input channels (default: the data's)")
    p.add_argument("--resize", choices=tuple(RESIZE_MODES), default=S,
                   help="how a picture is brought to the input size, in training and then in serving and scoring "
                        "(the export carries it): crop scales the shorter side to size / 0.875 and takes the "
                        "centre; whole stretches the whole picture to the size (for full-frame photos whose edges "
                        "matter). Default: the architecture's: crop for the ImageNet families, whole for LeNet-5")
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


def store(path, name=None) -> str:
    from cnnserve.export.store import store_model

    model = store_model(path, name, reuse=True)
    if getattr(model, "reused", False):  # a second export of the same checkpoint: no new version to serve
        print(f"{path} is already in BentoML's model store as {model.tag} (the same files): reused, no new version")
    else:
        print(f"stored {path} as {model.tag} in BentoML's model store")
    return str(model.tag)


def _cmd_export(args) -> int:
    from pathlib import Path

    from cnnserve.export.files import VariantsFailed
    from cnnserve.models.fromweights import INPUT_FLAGS, checkpoint_from_weights
    from cnnserve.export.pipeline import export_checkpoint

    checkpoint = args.checkpoint
    given = {"size": args.img_size, "mean": args.mean, "std": args.std, "resize": args.resize,
             "crop_pct": args.crop_pct, "interpolation": args.interpolation}
    if args.calib_images and not args.int8:
        raise ValueError("--calib-images goes with --int8 (the images int8 calibrates and is checked on)")
    if args.weights:  # an architecture by name and a weights file: first a checkpoint of them, named as --out
        if args.int8 and not args.calib_images:  # before any work: nothing is written for a refused command
            raise ValueError(f"--int8 needs real images to calibrate on: weights come with no data set, so give "
                             f"--calib-images DIR (a folder of pictures like those {args.checkpoint} will see: "
                             f"--calibration of them calibrate, the rest check int8 against fp32)")
        out = Path(args.out).with_suffix(".pt") if args.out else Path("runs") / checkpoint.replace(":", "-") / "model.pt"
        checkpoint = checkpoint_from_weights(checkpoint, args.weights, out, args.labels, args.overwrite,
                                             input=given, preset=args.preset, log=print)
        print(f"checkpoint {checkpoint} ({args.checkpoint} with {args.weights})")
    else:
        named = [flag for flag, value in (("--labels", args.labels), ("--preset", args.preset), *(
            (f, given[k]) for k, f in INPUT_FLAGS.items())) if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)} go{'es' if len(named) == 1 else ''} with --weights (a checkpoint "
                             "carries its own labels and input)")
    try:
        results = export_checkpoint(checkpoint, args.out, fp16=args.fp16, int8=args.int8,
                                    calibration=args.calibration, calibration_method=args.calibration_method,
                                    int8_format=args.int8_format, simplify_graph=args.simplify,
                                    data_dir=args.data_dir, opset=args.opset, overwrite=args.overwrite,
                                    calibrate=args.calibrate, calib_images=args.calib_images, check=args.check)
    except VariantsFailed as e:
        # the verified fp32 file (and any variant that passed) is not thrown away with the refused variant
        fp32 = e.results[0]["path"]
        for failure in e.failures:
            print(f"cnnserve: error: {failure}", file=sys.stderr)
        kept = ", ".join(r["info"].precision for r in e.results)
        if args.store:
            tag = store(fp32, args.name)
            print(f"cnnserve: stored what passed ({kept}) as {tag}; the service serves it without the refused "
                  "variant", file=sys.stderr)
        else:
            print(f"cnnserve: what passed ({kept}) is written: `cnnserve store {fp32}` stores it without the "
                  "refused variant", file=sys.stderr)
        return 1
    if args.store:  # the fp32 file, with its variants (export/store.py)
        store(results[0]["path"], args.name)
    return 0


def _cmd_quantize(args) -> int:
    from pathlib import Path

    from cnnserve.core.onnxmeta import variant_file
    from cnnserve.export.files import ExportError
    from cnnserve.export.pipeline import export_int8
    from cnnserve.core.preprocess import load_folder
    from cnnserve.export.store import read_info

    import onnx

    src = Path(args.onnx)
    info = read_info(src)
    if info.precision != "fp32":
        raise ExportError(f"{src}: a {info.precision} model; quantize the fp32 one")
    try:
        images = load_folder(args.images, info.spec, args.calibration + args.check)
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
        store(src, args.name)
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
        store(result["path"], args.name)
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
    store(args.onnx, args.name)
    return 0


def _add_int8_options(p) -> None:
    from cnnserve.export.quantize import FORMATS, METHODS

    p.add_argument("--calibration", type=int, default=128, help="int8: calibration images (default 128)")
    p.add_argument("--check", type=int, default=256,
                   help="int8 from a folder: images after the calibration ones to verify with (at most)")
    p.add_argument("--calibration-method", default="auto", choices=("auto", *METHODS),
                   help="int8: auto quantizes with minmax and percentile and keeps the one that agrees best with "
                        "fp32 on held-out images")
    p.add_argument("--int8-format", choices=tuple(FORMATS), default=None,
                   help="int8: activation/weight types (default: onnxruntime's advice for this CPU, u8s8-reduce "
                        "on x86 without VNNI, u8s8 with it, s8s8 on ARM; without VNNI u8u8 is tried too and the "
                        "one that agrees best with fp32 on held-out images is kept)")


def add_parsers(sub) -> None:
    add_train(sub)
    p = sub.add_parser("export", help="checkpoint to a verified, self-contained ONNX file",
                       description="Export a checkpoint to ONNX (uint8 input, normalisation inside, spec and labels "
                                   "in the metadata), verify it against PyTorch on the test split, optionally store it.")
    p.add_argument("checkpoint", help="a run's model.pt (or the run folder); with --weights, an architecture: "
                                      "a zoo name, timm:NAME or torchvision:NAME")
    p.add_argument("--weights", help="a state dict for that architecture (.pth, .safetensors; nothing is downloaded)")
    p.add_argument("--labels", help="with --weights: class names, one per line (default: ImageNet-1k's for 1000 "
                                    "classes)")
    p.add_argument("--img-size", type=int, help="with --weights: the input side the model was trained at (default: "
                                                "the library's data config, timm's pretrained_cfg or torchvision's "
                                                "weights transforms; the zoo's size for a zoo name)")
    p.add_argument("--mean", type=float, nargs="+", help="with --weights: per-channel mean on the 0-1 scale (one "
                                                         "value for all; default: the library's)")
    p.add_argument("--std", type=float, nargs="+", help="with --weights: per-channel std (default: the library's)")
    p.add_argument("--resize", choices=tuple(RESIZE_MODES),
                   help="with --weights: crop (the shorter side to size / crop-pct, then the centre; the library's "
                        "way) or whole (the whole picture stretched to the size)")
    p.add_argument("--crop-pct", type=float, help="with --weights: the centre crop's share of the resized side "
                                                  "(default: the library's, 0.875 for torchvision's ImageNet models)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="with --weights: resampling filter (default: "
                                                                   "the library's)")
    p.add_argument("--preset", help="with --weights: take the input from another of the library's weights: timm's "
                                    "pretrained tag (a1_in1k) or torchvision's weights name (IMAGENET1K_V1); flags "
                                    "given beside it still win")
    p.add_argument("--out", "-o", help="ONNX file to write (default: beside the checkpoint, model.onnx)")
    p.add_argument("--fp16", action="store_true", help="also write a half-precision variant (NAME.fp16.onnx)")
    p.add_argument("--int8", action="store_true", help="also write a statically quantized variant (NAME.int8.onnx), "
                                                       "calibrated on the checkpoint's training split and verified on "
                                                       "its test split, or on --calib-images")
    p.add_argument("--calib-images", help="int8: a folder of real pictures like those the model will see (needed "
                                          "for weights, which come with no data set): a seeded --calibration of "
                                          "them calibrate, up to --check of the others choose the method and run "
                                          "the agreement gate")
    _add_int8_options(p)
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=False,
                   help="simplify the graph with onnxslim (off by default: measured not to pay on CPU, "
                        "docs/models.md)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="probabilities = softmax(logits / T), T fitted on the validation split (temperature "
                        "scaling; the logits output stays raw); --no-calibrate keeps the raw softmax")
    p.add_argument("--data-dir", help="where the checkpoint's data set lives now (to rebuild its test split)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
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
    p.add_argument("--outputs", default=LOGITS, choices=OUTPUTS,
                   help="what the model's output holds (probabilities: logits are their log)")
    p.add_argument("--resize", default="center-crop", choices=RESIZE_POLICIES,
                   help="how the service brings an image to --size (default %(default)s: the shorter side to "
                        "size / crop-pct, then the centre; stretch: the whole image to the size). It must match "
                        "the preprocessing the model was trained with")
    p.add_argument("--crop-pct", type=float, default=SPEC_DEFAULTS["crop_pct"],
                   help="center-crop: the crop's share of the resized side (default %(default)s, as timm and "
                        "torchvision's ImageNet models: 224 of 256)")
    p.add_argument("--interpolation", default=SPEC_DEFAULTS["interpolation"], choices=INTERPOLATIONS,
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
