"""The whole export: a checkpoint to verified ONNX files (fp32, and the fp16 and int8 variants asked for).

Weights are stored inline (no ``.onnx.data`` side file), the file passes ``onnx.checker`` with full
checking, and ``metadata_props`` carry the spec, labels, metrics, the checkpoint's sha256 and the library
versions (``cnnserve.core.onnxmeta``). Nothing is written for a precision whose verification fails.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.models.checkpoint import classifier_from_checkpoint, file_sha256, load_checkpoint
from cnnserve.models.data import DataError, load_dataset

from . import probabilities
from .files import ExportError, VariantsFailed, check_outputs, drop_refused, sample_images, save_verified, \
    set_metadata, versions
from .quantize import quantize_verified
from .trace import DEFAULT_OPSET, simplify, to_fp16, to_onnx
from .verify import format_report, verify


@functools.lru_cache(maxsize=1)
def _dataset(data: str, spec, data_dir: str | None):
    """A checkpoint's data set, loaded once for the splits an export reads (test; train and val for int8)."""
    return load_dataset(data, spec, data_dir, limit=None)


def test_images(ckpt: dict, data_dir: str | None = None, n_random: int = 64, split: str = "test",
                limit: int | None = None):
    """The checkpoint's own ``split`` (test, val or train: uint8 images, targets), rebuilt from its data
    set, at most ``limit`` images (a seeded sample); a checkpoint that names no data set (random weights)
    is checked on seeded random images instead."""
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


def folder_split(folder: str | os.PathLike, spec, calibration: int, check: int = 256) -> dict:
    """A folder's pictures (recursively; decoded as the service decodes them for ``spec``) in a seeded order:
    the first ``calibration`` to calibrate int8 on, up to ``check`` others held out to choose the method and
    run the agreement gate on. Shuffled, not sorted, so that a folder of class sub-folders calibrates on every
    class; files that are not readable images are skipped. Refused with fewer than 16 held-out pictures."""
    from cnnserve.core.preprocess import IMAGE_EXTENSIONS, ImageError, load_file

    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"{root}: no such folder of images (--calib-images)")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    order = np.random.default_rng(0).permutation(len(paths))
    images, names = [], []
    for i in order:
        if len(images) >= calibration + check:
            break
        try:
            images.append(load_file(paths[i], spec))
        except ImageError:
            continue  # a file that is not an image is not an image of the data
        names.append(str(paths[i].relative_to(root)))
    if len(images) < calibration + 16:
        raise ExportError(f"{root}: {len(images)} readable images; int8 calibrates on --calibration {calibration} "
                          f"and needs at least 16 more, held out, to check the result (add pictures or lower "
                          f"--calibration)")
    stack = np.stack(images)
    return {"calibration": stack[:calibration], "calibration_files": names[:calibration],
            "held_out": stack[calibration:], "held_out_files": names[calibration:]}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *, fp16: bool = False,
                      int8: bool = False, calibration: int = 128, calibration_method: str = "auto",
                      int8_format: str | None = None, simplify_graph: bool = False, data_dir: str | None = None,
                      opset: int = DEFAULT_OPSET, overwrite: bool = False, calibrate: bool = True,
                      calib_images: str | os.PathLike | None = None, check: int = 256, log=print) -> list[dict]:
    """Export, verify and save; returns one record per file written (path, report path, report, info).
    ``int8``: also NAME.int8.onnx (``export.quantize``), after the fp32 file is written, calibrated on
    ``calibration`` images of the checkpoint's training split and checked on its validation and test splits;
    or, with ``calib_images`` (a folder), on ``calibration`` of its pictures and checked on up to ``check``
    others (``folder_split``; on the test split too when the checkpoint has one). A checkpoint with no data
    set (made from weights) has only random pixels of its own, on which the agreement gate would pass
    whatever the quantization did, so int8 for it needs ``calib_images`` and is refused without, before any
    work. ``calibrate``: probabilities are
    softmax(logits / T) with T fitted on the validation split (``export.probabilities``); false keeps the
    raw softmax (the out-of-distribution threshold is fitted either way).

    Nothing is written for a precision whose verification fails: the report is. A failed fp32 file raises
    ExportError at once; a failed variant does not stop the others, and VariantsFailed (an ExportError)
    then carries what was written. An existing file is replaced only when it is an earlier export of the
    same checkpoint, or with ``overwrite`` (``check_outputs``).
    """
    ckpt = load_checkpoint(checkpoint)
    if int8 and not ckpt.get("data") and calib_images is None:
        raise ExportError(f"{ckpt['path']}: --int8 needs real images to calibrate on, and this checkpoint comes with "
                          "no data set (its own would be random pixels): give --calib-images DIR, a folder of "
                          "pictures like those the model will see")
    model = classifier_from_checkpoint(ckpt)
    metrics = ckpt.get("metrics", {})
    info = ModelInfo(spec=ckpt["spec"], precision="fp32", metrics=metrics,
                     checkpoint_sha256=file_sha256(ckpt["path"]), versions=versions(), data=ckpt.get("data", ""),
                     origin=ckpt.get("origin", {"kind": "trained"}))
    out = Path(out) if out else Path(ckpt["path"]).with_suffix(".onnx")
    check_outputs(out, info.checkpoint_sha256, ["fp32"] + ["fp16"] * fp16 + ["int8"] * int8, overwrite, log)
    folder = folder_split(calib_images, info.spec, calibration, check) if int8 and calib_images is not None else None
    images, targets = test_images(ckpt, data_dir)
    kind = "test" if targets is not None else "random"
    if folder is not None and targets is None:  # no test split of its own: the real pictures held out are better
        images, kind = folder["held_out"], "held-out folder"
    log(f"exporting {ckpt['path']} ({info.spec.arch}, input uint8 {'x'.join(map(str, info.spec.input_shape))}, "
        f"{info.spec.num_classes} classes) to ONNX opset {opset} ...")
    t0 = time.time()
    proto = to_onnx(model, info, opset)
    proto, info, fitted = probabilities.fit(proto, info, test_images(ckpt, data_dir, split="val"),
                                                 (images, targets), calibrate, log)
    set_metadata(proto, info, sample_images(images, targets, info.spec.labels))
    if simplify_graph:
        proto = simplify(proto)
    log(f"traced in {time.time() - t0:.1f}s; verifying against PyTorch on {len(images)} "
        f"{kind} images ...")
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
        probabilities.attach_check(report, blob, images, info.temperature)
        if precision == "fp32" and "test" in fitted:
            report["calibration"] = fitted
            report["reliability_png"] = str(probabilities.reliability_png(
                fitted, path.with_name(path.name.removesuffix(".onnx") + ".reliability.png"),
                f"{info.spec.arch} on {info.data}: reliability on the test split"))
        log(format_report(report))
        try:
            report_path = save_verified(p, path, report, f"verification failed "
                                        f"({'; '.join(report.get('failures', []))})", len(blob), log)
        except ExportError as e:
            if precision == "fp32":
                raise
            failures.append(drop_refused(path, str(e), log))
            continue
        results.append({"path": path, "report_path": report_path, "report": report,
                        "info": replace(info, precision=precision)})
    if int8:
        path = Path(onnxmeta.variant_file(str(out), "int8"))
        if folder is not None:  # real pictures: calibration on some, the method chosen and the gate run on others
            calib_set, selection = (folder["calibration"], None), (folder["held_out"], None)
            gate = (images, targets) if targets is not None else selection  # labels, where the checkpoint has them
            source = f"folder {calib_images}"
            files = {"files": folder["calibration_files"], "held_out_files": folder["held_out_files"]}
        else:
            calib_set = test_images(ckpt, data_dir, split="train", limit=calibration)
            selection, gate = test_images(ckpt, data_dir, split="val", limit=256), (images, targets)
            source, files = f"{info.data} training split", None
        try:
            results.append(export_int8(proto, info, path, calib_set, selection, gate, calibration_method, int8_format,
                                       source, log, calibration_files=files))
        except ExportError as e:
            failures.append(drop_refused(path, str(e), log))
    if failures:
        raise VariantsFailed(results, failures)
    return results


def export_int8(fp32: onnx.ModelProto, info: ModelInfo, path: Path, calibration, selection, test,
                method: str = "auto", fmt: str | None = None, source: str = "", log=print,
                calibration_files: dict | None = None) -> dict:
    """Quantize ``fp32`` (images as (uint8 array, targets) pairs), verify against it, write if it passes.
    ``calibration_files``: which files calibrated and which were held out, for the report."""
    log(f"quantizing to int8: {len(calibration[0])} calibration images from the {source}, "
        f"{len(selection[0])} to choose the method, {len(test[0])} to verify ...")
    try:
        q, report = quantize_verified(fp32, calibration[0], selection[0], test[0], test[1], method=method, fmt=fmt,
                                      source=source, log=log)
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from None
    report["calibration"].update(calibration_files or {})
    info8 = replace(info, precision="int8")
    set_metadata(q, info8, next((p.value for p in fp32.metadata_props if p.key == onnxmeta.KEY_SAMPLES), None))
    q.producer_name, q.producer_version = "cnnserve", info.versions.get("cnnserve", "")
    blob = q.SerializeToString()
    report.update(model=str(path), bytes=len(blob))
    probabilities.attach_check(report, blob, test[0], info.temperature)
    log(format_report(report) + f"; format {report['format']}, calibration {report['calibration']['method']}, "
        f"ops left in float: {report['ops_in_float'] or 'none'}")
    report_path = save_verified(q, path, report, f"int8 verification failed ({'; '.join(report['failures'])})",
                                len(blob), log)
    return {"path": path, "report_path": report_path, "report": report, "info": info8}
