"""Checkpoint to one self-contained ONNX file that carries its own spec.

The graph takes uint8 pixels (N x C x H x W, dynamic N) and normalises inside, so no
client can disagree about preprocessing; it returns logits and softmax probabilities.
Weights are stored inline (no ``.onnx.data`` side file), the file passes
``onnx.checker`` with full checking, and ``metadata_props`` carry the spec, labels,
metrics, the checkpoint's sha256 and the library versions (``cnnserve.core.onnxmeta``).
"""

from __future__ import annotations

import contextlib
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
    set_metadata(proto, info)
    proto.producer_name, proto.producer_version = "cnnserve", info.versions.get("cnnserve", "")
    proto.doc_string = f"{spec.arch}: uint8 pixels {spec.channels}x{spec.height}x{spec.width} -> {spec.num_classes} classes"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the model's metadata with cnnserve's (the exporter's internal keys are dropped)."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_metadata())


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

def test_images(ckpt: dict, data_dir: str | None = None, n_random: int = 64):
    """The checkpoint's own test split (uint8 images, targets), rebuilt from its data set; a checkpoint
    that names no data set (random weights) is checked on seeded random images instead."""
    import numpy as np

    from cnnserve.models.data import DataError, load_dataset

    data = ckpt.get("data")
    spec = ckpt["spec"]
    if not data:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n_random, *spec.input_shape), dtype=np.uint8), None
    cfg = ckpt.get("train_config", {})
    try:
        split = load_dataset(data, spec, data_dir or cfg.get("data_dir"), limit=None).test
    except DataError as e:
        raise ExportError(f"{ckpt['path']}: cannot rebuild the test split of {data!r} to verify the export "
                          f"({e}); pass --data-dir") from None
    pairs = [split[i] for i in range(len(split))]
    return (np.stack([x.numpy() for x, _ in pairs]), np.array([int(y) for _, y in pairs]))


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *, fp16: bool = False,
                      simplify_graph: bool = False, data_dir: str | None = None, opset: int = DEFAULT_OPSET,
                      log=print) -> list[dict]:
    """Export, verify and save; returns one record per file written (path, report path, report, info).

    Nothing is written for a precision whose verification fails: the report is, and ExportError is raised.
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
    images, targets = test_images(ckpt, data_dir)
    log(f"exporting {ckpt['path']} ({info.spec.arch}, input uint8 {'x'.join(map(str, info.spec.input_shape))}, "
        f"{info.spec.num_classes} classes) to ONNX opset {opset} ...")
    t0 = time.time()
    proto = to_onnx(model, info, opset)
    if simplify_graph:
        proto = simplify(proto)
    log(f"traced in {time.time() - t0:.1f}s; verifying against PyTorch on {len(images)} "
        f"{'test' if targets is not None else 'random'} images ...")
    jobs = [("fp32", proto, out)]
    if fp16:
        half = to_fp16(proto)
        set_metadata(half, replace(info, precision="fp16"))
        jobs.append(("fp16", half, out.with_name(out.stem + ".fp16.onnx")))
    results = []
    for precision, p, path in jobs:
        blob = p.SerializeToString()
        report = verify(blob, model, images, targets, precision, metrics.get("test_accuracy"))
        report.update(model=str(path), checkpoint=str(ckpt["path"]), checkpoint_sha256=info.checkpoint_sha256,
                      simplified=simplify_graph, opset=opset, bytes=len(blob))
        log(format_report(report))
        report_path = save_verified(p, path, report, f"verification failed ({'; '.join(report.get('failures', []))})",
                                    len(blob), log)
        results.append({"path": path, "report_path": report_path, "report": report,
                         "info": replace(info, precision=precision)})
    return results


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
                            labels: str | os.PathLike | None = None) -> Path:
    """A cnnserve checkpoint (``out``/model.pt) of ``arch`` (a zoo name, ``timm:NAME`` or
    ``torchvision:NAME``) holding ``weights``, with the architecture's pretrained spec and the labels;
    ``export_checkpoint`` then exports and verifies it like any other."""
    from dataclasses import replace

    from cnnserve.models.checkpoint import file_sha256, save_checkpoint
    from cnnserve.models.pretrained import WeightsError, head_classes, load_weights, read_weights
    from cnnserve.models.registry import UnknownModelError, build_classifier, get_entry

    try:
        entry = get_entry(arch)
        state, _ = read_weights(weights)
        classes = head_classes(state)
        spec = replace(entry.spec, labels=tuple(read_labels(labels, classes)))
        model = build_classifier(spec)
        load_weights(model.net, state, str(weights))
    except (WeightsError, UnknownModelError, ValueError) as e:
        raise ExportError(str(e)) from None
    lib = arch.partition(":")[0] if ":" in arch else None
    origin = {"kind": lib or "pretrained", "weights": Path(weights).name, "weights_sha256": file_sha256(weights)}
    if lib:
        origin["name"] = arch.partition(":")[2]
    path = Path(out) / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"arch": arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(),
                           "metrics": {}, "origin": origin, "torch_version": str(torch.__version__)})
    return path
