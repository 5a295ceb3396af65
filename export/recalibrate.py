"""``cnnserve calibrate MODEL.onnx --images DIR``: temperature scaling and the OOD threshold for a model
that has no validation split of its own here (an imported ONNX classifier, or a cnnserve export to be fitted
to other data). DIR holds one folder of images per class, named as the model's labels; a seeded half of
each class fits T and the threshold, the other half measures them (``export.probabilities``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.core.preprocess import IMAGE_EXTENSIONS, ImageError, load_file

from . import probabilities
from .files import ExportError, save, set_metadata

MIN_IMAGES = 20


def labelled_images(folder: Path, info: ModelInfo) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every readable image under DIR/LABEL/ with its class index; unreadable files are listed, not fatal."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a directory (expected one sub-folder of images per class)")
    labels = list(info.spec.labels)
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [d.name for d in dirs if d.name not in labels]
    if unknown:
        raise ExportError(f"{folder}: folders {unknown[:5]} are not classes of the model (its labels: "
                          f"{', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''})")
    images, targets, skipped = [], [], []
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                images.append(load_file(p, info.spec))
                targets.append(labels.index(d.name))
            except ImageError as e:
                skipped.append(f"{p}: {e}")
    if len(images) < MIN_IMAGES:
        raise ExportError(f"{folder}: {len(images)} readable images in class folders; calibration needs at least "
                          f"{MIN_IMAGES} (half fit the temperature, half measure it)")
    return np.stack(images), np.array(targets), skipped


def calibrate_file(model: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike | None = None,
                   log=print) -> dict:
    """Fit and write; returns {"path", "report_path", "report"}. Replacing MODEL itself is refused while
    fp16/int8 variants lie beside it (they would keep the old temperature): pass ``out`` then."""
    model, out = Path(model), Path(out) if out else Path(model)
    try:
        proto = onnx.load(str(model))
        info = ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, str(model))
    except Exception as e:  # OSError, SpecError, or protobuf's DecodeError (a file that is not ONNX)
        raise ExportError(f"{model}: cannot read it as a cnnserve model: {str(e)[:300]}") from None
    variants = [f for p, f in onnxmeta.variant_files(model, "fp32").items() if p != "fp32"]
    if out.resolve() == model.resolve() and variants:
        raise ExportError(f"{model}: variants {', '.join(map(str, variants))} lie beside it and would keep the old "
                          "temperature; --out another file (or re-export the variants afterwards)")
    x, y, skipped = labelled_images(Path(images), info)
    for s in skipped[:5]:
        log(f"skipped {s}")
    order = np.random.default_rng(0).permutation(len(y))
    fit_half, test_half = order[::2], order[1::2]
    raw = probabilities.with_temperature(proto, 1.0)  # measure "before" on the raw softmax
    graph, info, report = probabilities.fit(raw, replace(info, data=""), (x[fit_half], y[fit_half]),
                                            (x[test_half], y[test_half]), True, log)
    info = replace(info, data=ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props}).data,
                   origin={**info.origin, "calibrated_on": f"{len(y)} images in {Path(images).name}/"})
    set_metadata(graph, info)
    check = probabilities.check_probabilities(graph.SerializeToString(), x[test_half], info.temperature, info.precision)
    if not check["passed"]:
        raise ExportError(f"{model}: {'; '.join(check['failures'])}; nothing written")
    report = {**report, "probabilities": check, "images": str(images), "skipped": len(skipped)}
    report_path = out.with_name(out.name.removesuffix(".onnx") + ".calibration.json")
    report["reliability_png"] = str(probabilities.reliability_png(
        report, out.with_name(out.name.removesuffix(".onnx") + ".reliability.png"),
        f"{info.spec.arch}: reliability on {len(test_half)} held-out images"))
    report_path.write_text(json.dumps(report, indent=2))
    save(graph, out)
    log(f"wrote {out} and {report_path}")
    return {"path": out, "report_path": report_path, "report": report}
