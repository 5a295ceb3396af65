"""An export's files: the metadata it carries, the sample images, saving (atomically, every tensor
inline) behind its verification report, the library versions, and the refusal to replace what another
checkpoint made.
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
from onnx import helper

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.core.spec import SpecError

from .store import StoreError, read_info


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


def versions() -> dict:
    """The libraries an export was made with (the exporting process has torch; nothing else here needs it)."""
    import onnxruntime
    import torch

    from cnnserve import __version__

    return {"cnnserve": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def drop_refused(path: Path, message: str, log) -> str:
    """A variant refused by its gate: an earlier file of that name (an export of the same checkpoint) goes
    too, since the report beside it now says this one failed."""
    if path.is_file():
        path.unlink()
        log(f"removed the earlier {path}: its report now describes the refused one")
    return message


def unique_opsets(model: onnx.ModelProto) -> None:
    """One opset import per domain. ``onnx.compose.merge_models`` lists the default domain once per
    merged graph ([('', 18), ('', 18), ('', 18)] for the three parts above); onnxruntime runs that, but
    its quantizer refuses it ("Failed to find proper ai.onnx domain")."""
    versions: dict[str, int] = {}
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        versions[domain] = max(versions.get(domain, 0), o.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())


@contextlib.contextmanager
def quiet():
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
