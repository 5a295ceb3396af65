"""Checkpoint to one self-contained ONNX file that carries its own spec.

The graph takes uint8 pixels (N x C x H x W, dynamic N) and normalises inside, so no
client can disagree about preprocessing; it returns logits and softmax probabilities.
Weights are stored inline (no ``.onnx.data`` side file), the file passes
``onnx.checker`` with full checking, and ``metadata_props`` carry the spec, labels,
metrics, the checkpoint's sha256 and the library versions (``cnnserve.core.onnxmeta``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.models.registry import Classifier

DEFAULT_OPSET = 18


class ExportError(ValueError):
    """An export that failed; the message names the file."""


class VariantsFailed(ExportError):
    """The fp32 file passed and was written, a variant (fp16, int8) failed its verification: ``results``
    holds what was written (fp32 first), ``failures`` one message per variant refused."""

    def __init__(self, results: list[dict], failures: list[str]):
        self.results, self.failures = results, failures
        super().__init__("; ".join(failures))


def check_outputs(out: Path, checkpoint_sha256: str, precisions, overwrite: bool = False, log=print) -> None:
    """Refuse, before any work, to replace an ONNX file that is not an earlier export of the same checkpoint
    (an unrelated file, or the export of other weights): exports never overwrite silently. Re-exporting a
    checkpoint replaces its own files. With ``overwrite``, an earlier export of other weights is removed
    with every variant and report beside it, so none is left stale."""
    from cnnserve.core.spec import SpecError

    from .store import StoreError, read_info

    def made_here(path: Path) -> str | None:
        """None when ``path`` is free or this checkpoint's export, else what it is."""
        if not path.exists():
            return None
        try:
            info = read_info(path)
        except (StoreError, SpecError):
            return "is not a cnnserve export"
        if info.checkpoint_sha256 != checkpoint_sha256:
            return f"was exported from another checkpoint (sha256 {info.checkpoint_sha256[:12] or 'unknown'})"
        return None

    paths = [out, *(Path(onnxmeta.variant_file(str(out), p)) for p in precisions if p != "fp32")]
    clashes = [(path, why) for path in paths if (why := made_here(path))]
    if not clashes:
        return
    if not overwrite:
        path, why = clashes[0]
        raise ExportError(f"{path} exists and {why}: exports never replace it silently; --out another file, "
                          f"or --overwrite to replace it (and the variants and reports beside it)")
    stale = [out, *(Path(onnxmeta.variant_file(str(out), p)) for p in onnxmeta.VARIANTS)]
    stale += [q.with_name(q.name.removesuffix(".onnx") + ".verify.json") for q in stale]
    removed = [q for q in stale if q.is_file()]
    for q in removed:
        q.unlink()
    log(f"--overwrite: removed the earlier export {', '.join(str(q) for q in removed)}")


class _WithProbabilities(nn.Module):
    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        logits = self.model(pixels)
        return logits, torch.softmax(logits, dim=1)


@contextlib.contextmanager
def _quiet():
    """torch's exporter prints progress, warnings about torchvision and deprecation notes: keep them
    out of the user's terminal (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = "batch"


def to_onnx(model: Classifier, info: ModelInfo, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace ``model`` with torch's dynamo exporter; the result is checked and self-contained."""
    spec = model.spec
    model = model.eval()
    example = torch.zeros(2, *spec.input_shape, dtype=torch.uint8)
    with _quiet():
        program = torch.onnx.export(
            _WithProbabilities(model), (example,), dynamo=True, opset_version=opset,
            input_names=[onnxmeta.INPUT], output_names=list(onnxmeta.OUTPUTS),
            dynamic_shapes={"pixels": {0: torch.export.Dim.DYNAMIC}}, verbose=False)
        proto = program.model_proto
    _name_batch_axis(proto)
    from .cam import add_cam_outputs

    add_cam_outputs(proto)  # GAP + linear heads: the maps and weights class activation maps need
    set_metadata(proto, info)
    proto.producer_name, proto.producer_version = "cnnserve", info.versions.get("cnnserve", "")
    proto.doc_string = f"{spec.arch}: uint8 pixels {spec.channels}x{spec.height}x{spec.width} -> {spec.num_classes} classes"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata(proto: onnx.ModelProto, info: ModelInfo, samples: str | None = None) -> None:
    """Replace the model's metadata with cnnserve's (the exporter's internal keys are dropped; the
    sample images, if any, are kept, or set from ``samples``)."""
    kept = {p.key: p.value for p in proto.metadata_props if p.key == onnxmeta.KEY_SAMPLES}
    if samples is not None:
        kept[onnxmeta.KEY_SAMPLES] = samples
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**info.to_metadata(), **kept})


def sample_images(images, targets, labels, max_bytes: int = 256 * 1024) -> str:
    """The first held-out image of each class (at most ten) as data URLs (PNG for grey, JPEG for colour),
    for the demo page (``onnxmeta.KEY_SAMPLES``); as many as fit in ``max_bytes``."""
    import base64
    import json

    from PIL import Image

    if targets is None:
        return "[]"
    out, size = [], 0
    for cls in list(dict.fromkeys(int(t) for t in targets))[:10]:
        x = images[int(list(targets).index(cls))]
        img = Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
        buf = io.BytesIO()
        grey = x.shape[0] == 1
        img.save(buf, "PNG" if grey else "JPEG", **({} if grey else {"quality": 85}))
        url = f"data:image/{'png' if grey else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode()
        if size + len(url) > max_bytes:
            break
        size += len(url)
        out.append({"label": labels[cls], "index": cls, "image": url})
    return json.dumps(sorted(out, key=lambda s: s["index"]))


def save(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """One file, every tensor inline, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, tmp, save_as_external_data=False)
    tmp.replace(path)
    return path


def save_verified(proto: onnx.ModelProto, path: Path, report: dict, failure: str, size: int, log=print,
                  error: type[Exception] | None = None) -> Path:
    """Write the verification report beside ``path``; then the model, only if the report passed
    (else ``error``, ExportError by default, naming the failure and the report). Returns the report's path."""
    import json

    report_path = path.with_name(path.name.removesuffix(".onnx") + ".verify.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        raise (error or ExportError)(f"{path}: {failure}; report in {report_path}; no model written")
    save(proto, path)
    log(f"wrote {path} ({size / 1e6:.1f} MB) and {report_path}")
    return report_path


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and arithmetic; the uint8 input and float32 outputs stay as they are.

    Uses the converter that ships with onnxruntime. Everything runs in fp16, Softmax included (keeping
    it in fp32 made the converter emit an unsorted graph); outputs are cast back to fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(proto, keep_io_types=True)
    onnx.checker.check_model(half, full_check=True)
    return half


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Graph simplification by onnxslim (constant folding, fusion of redundant nodes)."""
    import onnxslim

    with _quiet():
        slim = onnxslim.slim(proto)
    # onnxslim keeps metadata_props; re-check the result
    onnx.checker.check_model(slim, full_check=True)
    return slim


def versions() -> dict:
    import onnxruntime

    from cnnserve import __version__

    return {"cnnserve": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --- the whole export: checkpoint -> verified ONNX file(s) ---------------------------------

@functools.lru_cache(maxsize=1)
def _dataset(data: str, spec, data_dir: str | None):
    """A checkpoint's data set, loaded once for the splits an export reads (test; train and val for int8)."""
    from cnnserve.models.data import load_dataset

    return load_dataset(data, spec, data_dir, limit=None)


def test_images(ckpt: dict, data_dir: str | None = None, n_random: int = 64, split: str = "test",
                limit: int | None = None):
    """The checkpoint's own ``split`` (test, val or train: uint8 images, targets), rebuilt from its data
    set, at most ``limit`` images (a seeded sample); a checkpoint that names no data set (random weights)
    is checked on seeded random images instead."""
    import numpy as np

    from cnnserve.models.data import DataError

    data = ckpt.get("data")
    spec = ckpt["spec"]
    if not data:
        rng = np.random.default_rng({"test": 0, "val": 1, "train": 2}[split])
        return rng.integers(0, 256, (n_random, *spec.input_shape), dtype=np.uint8), None
    cfg = ckpt.get("train_config", {})
    try:
        images = getattr(_dataset(data, spec, data_dir or cfg.get("data_dir")), split)
    except DataError as e:
        raise ExportError(f"{ckpt['path']}: cannot rebuild the {split} split of {data!r} to verify the export "
                          f"({e}); pass --data-dir") from None
    index = range(len(images))
    if limit is not None and limit < len(images):
        index = sorted(np.random.default_rng(0).choice(len(images), limit, replace=False))
    pairs = [images[i] for i in index]
    return (np.stack([x.numpy() for x, _ in pairs]), np.array([int(y) for _, y in pairs]))


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *, fp16: bool = False,
                      int8: bool = False, calibration: int = 128, calibration_method: str = "auto",
                      int8_format: str | None = None, simplify_graph: bool = False, data_dir: str | None = None,
                      opset: int = DEFAULT_OPSET, overwrite: bool = False, log=print) -> list[dict]:
    """Export, verify and save; returns one record per file written (path, report path, report, info).
    ``int8``: also NAME.int8.onnx, calibrated on ``calibration`` images of the training split
    (``export.quantize``), after the fp32 file is written.

    Nothing is written for a precision whose verification fails: the report is. A failed fp32 file raises
    ExportError at once; a failed variant does not stop the others, and VariantsFailed (an ExportError)
    then carries what was written. An existing file is replaced only when it is an earlier export of the
    same checkpoint, or with ``overwrite`` (``check_outputs``).
    """
    from dataclasses import replace

    from cnnserve.models.checkpoint import classifier_from_checkpoint, file_sha256, load_checkpoint

    from .verify import format_report, verify

    ckpt = load_checkpoint(checkpoint)
    model = classifier_from_checkpoint(ckpt)
    metrics = ckpt.get("metrics", {})
    info = ModelInfo(spec=ckpt["spec"], precision="fp32", metrics=metrics,
                     checkpoint_sha256=file_sha256(ckpt["path"]), versions=versions(), data=ckpt.get("data", ""),
                     origin=ckpt.get("origin", {"kind": "trained"}))
    out = Path(out) if out else Path(ckpt["path"]).with_suffix(".onnx")
    check_outputs(out, info.checkpoint_sha256, ["fp32"] + ["fp16"] * fp16 + ["int8"] * int8, overwrite, log)
    images, targets = test_images(ckpt, data_dir)
    log(f"exporting {ckpt['path']} ({info.spec.arch}, input uint8 {'x'.join(map(str, info.spec.input_shape))}, "
        f"{info.spec.num_classes} classes) to ONNX opset {opset} ...")
    t0 = time.time()
    proto = to_onnx(model, info, opset)
    set_metadata(proto, info, sample_images(images, targets, info.spec.labels))
    if simplify_graph:
        proto = simplify(proto)
    log(f"traced in {time.time() - t0:.1f}s; verifying against PyTorch on {len(images)} "
        f"{'test' if targets is not None else 'random'} images ...")
    jobs = [("fp32", proto, out)]
    if fp16:
        half = to_fp16(proto)
        set_metadata(half, replace(info, precision="fp16"))
        jobs.append(("fp16", half, Path(onnxmeta.variant_file(str(out), "fp16"))))
    results, failures = [], []
    for precision, p, path in jobs:
        blob = p.SerializeToString()
        report = verify(blob, model, images, targets, precision, metrics.get("test_accuracy"))
        report.update(model=str(path), checkpoint=str(ckpt["path"]), checkpoint_sha256=info.checkpoint_sha256,
                      simplified=simplify_graph, opset=opset, bytes=len(blob))
        log(format_report(report))
        try:
            report_path = save_verified(p, path, report, f"verification failed "
                                        f"({'; '.join(report.get('failures', []))})", len(blob), log)
        except ExportError as e:
            if precision == "fp32":
                raise
            failures.append(_drop_refused(path, str(e), log))
            continue
        results.append({"path": path, "report_path": report_path, "report": report,
                        "info": replace(info, precision=precision)})
    if int8:
        path = Path(onnxmeta.variant_file(str(out), "int8"))
        try:
            results.append(export_int8(proto, info, path,
                                       test_images(ckpt, data_dir, split="train", limit=calibration),
                                       test_images(ckpt, data_dir, split="val", limit=256), (images, targets),
                                       calibration_method, int8_format, f"{info.data or 'random'} training split", log))
        except ExportError as e:
            failures.append(_drop_refused(path, str(e), log))
    if failures:
        raise VariantsFailed(results, failures)
    return results


def _drop_refused(path: Path, message: str, log) -> str:
    """A variant refused by its gate: an earlier file of that name (an export of the same checkpoint) goes
    too, since the report beside it now says this one failed."""
    if path.is_file():
        path.unlink()
        log(f"removed the earlier {path}: its report now describes the refused one")
    return message


def export_int8(fp32: onnx.ModelProto, info: ModelInfo, path: Path, calibration, selection, test,
                method: str = "auto", fmt: str | None = None, source: str = "", log=print) -> dict:
    """Quantize ``fp32`` (images as (uint8 array, targets) pairs), verify against it, write if it passes."""
    from dataclasses import replace

    from .quantize import quantize_verified
    from .verify import format_report

    log(f"quantizing to int8: {len(calibration[0])} calibration images from the {source}, "
        f"{len(selection[0])} to choose the method, {len(test[0])} to verify ...")
    try:
        q, report = quantize_verified(fp32, calibration[0], selection[0], test[0], test[1], method=method, fmt=fmt,
                                      source=source, log=log)
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from None
    info8 = replace(info, precision="int8")
    set_metadata(q, info8, next((p.value for p in fp32.metadata_props if p.key == onnxmeta.KEY_SAMPLES), None))
    q.producer_name, q.producer_version = "cnnserve", info.versions.get("cnnserve", "")
    blob = q.SerializeToString()
    report.update(model=str(path), bytes=len(blob))
    log(format_report(report) + f"; format {report['format']}, calibration {report['calibration']['method']}, "
        f"ops left in float: {report['ops_in_float'] or 'none'}")
    report_path = save_verified(q, path, report, f"int8 verification failed ({'; '.join(report['failures'])})",
                                len(blob), log)
    return {"path": path, "report_path": report_path, "report": report, "info": info8}


# --- weights made elsewhere: an architecture by name and a weights file -> a checkpoint -------

IMAGENET_LABELS = Path(__file__).with_name("imagenet1k.txt")


def read_labels(path: str | os.PathLike | None, classes: int | None = None) -> list[str]:
    """One label per line from ``path``; without one, ImageNet-1k's for a 1000-class model. With
    ``classes``, the count must match."""
    if path is None:
        if classes != 1000:
            raise ExportError(f"the weights have {classes} classes: name them with --labels FILE (one per line)")
        path = IMAGENET_LABELS
    try:
        labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: cannot read labels ({e})") from None
    if classes is not None and len(labels) != classes:
        raise ExportError(f"{path}: {len(labels)} labels for a model of {classes} classes")
    return labels


def checkpoint_from_weights(arch: str, weights: str | os.PathLike, out: str | os.PathLike,
                            labels: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A cnnserve checkpoint (the file ``out``) of ``arch`` (a zoo name, ``timm:NAME`` or
    ``torchvision:NAME``) holding ``weights``, with the architecture's pretrained spec and the labels;
    ``export_checkpoint`` then exports and verifies it like any other. An existing ``out`` made from the
    same weights is reused; anything else there is refused unless ``overwrite``."""
    from dataclasses import replace

    from cnnserve.models.checkpoint import file_sha256, save_checkpoint
    from cnnserve.models.pretrained import WeightsError, head_classes, load_weights, read_weights
    from cnnserve.models.registry import UnknownModelError, build_classifier, get_entry

    try:
        entry = get_entry(arch)
        state, _ = read_weights(weights)
        classes = head_classes(state)
        # first whether the weights fit the architecture (the likelier mistake, and its message names the
        # tensors that do not fit), only then their class names
        model = build_classifier(replace(entry.spec, labels=tuple(f"class {i}" for i in range(classes))))
        load_weights(model.net, state, str(weights))
        spec = replace(entry.spec, labels=tuple(read_labels(labels, classes)))
    except (WeightsError, UnknownModelError, ValueError) as e:
        raise ExportError(str(e)) from None
    lib = arch.partition(":")[0] if ":" in arch else None
    origin = {"kind": lib or "pretrained", "weights": Path(weights).name, "weights_sha256": file_sha256(weights)}
    if lib:
        origin["name"] = arch.partition(":")[2]
    path = Path(out)
    if path.exists():
        if _same_weights_checkpoint(path, arch, spec, origin):
            return path  # made before from the same weights: its export is then an export of the same checkpoint
        if not overwrite:
            raise ExportError(f"{path} exists and is not a checkpoint of {arch} with {weights}: exports never "
                              "replace it silently; --out another file, or --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"arch": arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(),
                           "metrics": {}, "origin": origin, "torch_version": str(torch.__version__)})
    return path


def _same_weights_checkpoint(path: Path, arch: str, spec, origin: dict) -> bool:
    from cnnserve.models.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return False
    return ckpt["arch"] == arch and ckpt["spec"] == spec and ckpt.get("origin") == origin
