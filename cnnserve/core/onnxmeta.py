"""The contract between the exporter and everything that runs an exported model.

An exported ONNX file takes ``pixels`` (uint8, N x C x H x W at the spec's size) and
gives ``logits`` and ``probabilities`` (float32, N x classes). Its ``metadata_props``
carry what a server needs and must not guess; they are written by the exporter (``export/``)
and read back here, by the service and the batch scorer (through onnxruntime's
``custom_metadata_map``: no onnx or torch import needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .spec import ModelSpec, SpecError

import os

FORMAT = "cnnserve-onnx/1"
#: The ONNX opset exports are written in (``cnnserve export --opset`` changes it).
DEFAULT_OPSET = 18
INPUT = "pixels"
LOGITS, PROBABILITIES = "logits", "probabilities"
OUTPUTS = (LOGITS, PROBABILITIES)
# Class activation maps (export/cam.py adds them where the head allows, service/explain.py reads them): the
# last convolutional feature maps and the classifier's weights over them.
FEATURES, CAM_WEIGHTS = "features", "cam_weights"
#: The file name of a model in BentoML's store; its variants are model.fp16.onnx, model.int8.onnx.
MODEL_FILE = "model.onnx"

KEY_FORMAT = "cnnserve.format"
KEY_SPEC = "cnnserve.spec"
KEY_ARCH = "cnnserve.arch"
KEY_LABELS = "cnnserve.labels"
KEY_METRICS = "cnnserve.metrics"
KEY_CHECKPOINT = "cnnserve.checkpoint_sha256"
KEY_PRECISION = "cnnserve.precision"
KEY_VERSIONS = "cnnserve.versions"
KEY_DATA = "cnnserve.data"
KEY_ORIGIN = "cnnserve.origin"
# Held-out sample images (one per class, at most ten) for a demo: a JSON list of {"label", "index",
# "image": a data URL}. Written by the export beside ModelInfo's keys, not part of it.
KEY_SAMPLES = "cnnserve.samples"
# Probabilities a caller can act on (export/calibrate.py writes them, service/confidence.py reads them):
# the temperature T fitted on the validation split (the graph's probabilities are softmax(logits / T); its
# logits stay raw; 1.0 = not calibrated), the out-of-distribution rule (energy score -T logsumexp(logits / T),
# its threshold and what it measured), and the calibration figures measured on the test split.
KEY_TEMPERATURE = "cnnserve.temperature"
KEY_OOD = "cnnserve.ood"
KEY_CALIBRATION = "cnnserve.calibration"
#: Verified variants of an fp32 export, written beside it as NAME.PRECISION.onnx (``variant_file``).
VARIANTS = ("fp16", "int8")


def variant_file(path: str, precision: str) -> str:
    """Where the ``precision`` variant of the fp32 file ``path`` (NAME.onnx) lives: NAME.PRECISION.onnx."""
    return f"{path[:-5] if path.endswith('.onnx') else path}.{precision}.onnx"


def variant_files(path: str | os.PathLike, own: str) -> dict[str, str]:
    """The one variant discovery: ``path`` under its own precision ``own``, and the variant files beside an
    fp32 file (NAME.fp16.onnx, NAME.int8.onnx; in the model store model.*.onnx) that exist. Whether each
    was made from the same weights is the caller's check (the store refuses, the runtime skips)."""
    path = str(path)
    out = {own: path}
    if own == "fp32" and path.endswith(".onnx"):
        out.update({p: f for p in VARIANTS if os.path.isfile(f := variant_file(path, p))})
    return out


def samples(props: dict[str, str]) -> list[dict]:
    try:
        return json.loads(props.get(KEY_SAMPLES) or "[]")
    except json.JSONDecodeError:
        return []


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model says about itself."""

    spec: ModelSpec
    precision: str = "fp32"
    metrics: dict = field(default_factory=dict)
    checkpoint_sha256: str = ""
    versions: dict = field(default_factory=dict)
    data: str = ""
    # Where the weights came from: {"kind": "trained"} (here, from random weights), "pretrained"
    # (fine-tuned from a weights file), "timm" or "torchvision" (a library's architecture by name,
    # with a weights file) or "imported" (someone else's ONNX graph), with the details of each.
    origin: dict = field(default_factory=lambda: {"kind": "trained"})
    # KEY_TEMPERATURE, KEY_OOD ({"threshold", "temperature", "sets": {name: {"auroc", ...}}, ...}; empty when
    # none was fitted) and KEY_CALIBRATION (measured ECE, NLL, Brier before and after)
    temperature: float = 1.0
    ood: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {
            KEY_FORMAT: FORMAT,
            KEY_ARCH: self.spec.arch,
            KEY_SPEC: self.spec.to_json(),
            KEY_LABELS: json.dumps(list(self.spec.labels)),
            KEY_METRICS: json.dumps(self.metrics, sort_keys=True),
            KEY_CHECKPOINT: self.checkpoint_sha256,
            KEY_PRECISION: self.precision,
            KEY_VERSIONS: json.dumps(self.versions, sort_keys=True),
            KEY_DATA: self.data,
            KEY_ORIGIN: json.dumps(self.origin, sort_keys=True),
            KEY_TEMPERATURE: repr(float(self.temperature)),
            KEY_OOD: json.dumps(self.ood, sort_keys=True),
            KEY_CALIBRATION: json.dumps(self.calibration, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> "ModelInfo":
        """Parse ``metadata_props``; a file that is not a cnnserve export is refused by name."""
        if props.get(KEY_FORMAT) != FORMAT:
            raise SpecError(f"{source}: not a cnnserve export (metadata {KEY_FORMAT!r} is "
                            f"{props.get(KEY_FORMAT)!r}, expected {FORMAT!r}); an ONNX classifier made elsewhere "
                            f"enters with `cnnserve import {source} --mean ... --std ... --labels FILE`, a "
                            "cnnserve checkpoint (model.pt) with `cnnserve export`")
        try:
            spec = ModelSpec.from_json(props[KEY_SPEC])
            return cls(spec=spec, precision=props.get(KEY_PRECISION, "fp32"),
                       metrics=json.loads(props.get(KEY_METRICS) or "{}"),
                       checkpoint_sha256=props.get(KEY_CHECKPOINT, ""),
                       versions=json.loads(props.get(KEY_VERSIONS) or "{}"), data=props.get(KEY_DATA, ""),
                       origin=json.loads(props.get(KEY_ORIGIN) or '{"kind": "trained"}'),
                       temperature=_temperature(props.get(KEY_TEMPERATURE)),
                       ood=_object(props.get(KEY_OOD)), calibration=_object(props.get(KEY_CALIBRATION)))
        except (KeyError, ValueError, TypeError) as e:  # ValueError: bad JSON, a 4,301-digit integer, SpecError
            raise SpecError(f"{source}: damaged cnnserve metadata: {str(e)[:300]}") from None

    def same_weights(self, other: "ModelInfo") -> bool:
        """Whether ``other`` was made from the same weights for the same spec (a variant of this model)."""
        return (self.checkpoint_sha256, self.spec) == (other.checkpoint_sha256, other.spec)

    def summary(self) -> dict:
        """A JSON-ready description (for model stores, APIs and reports)."""
        return {"arch": self.spec.arch, "spec": self.spec.to_dict(), "labels": list(self.spec.labels),
                "precision": self.precision, "metrics": self.metrics, "data": self.data,
                "checkpoint_sha256": self.checkpoint_sha256, "versions": self.versions, "origin": self.origin,
                "temperature": self.temperature, "ood": self.ood, "calibration": self.calibration}


def _temperature(text: str | None) -> float:
    """KEY_TEMPERATURE: absent (an export made before it) is 1.0; anything but a finite number > 0 is refused."""
    if not text:
        return 1.0
    t = float(text)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{KEY_TEMPERATURE} must be a finite number > 0, not {text[:40]!r}")
    return t


def _object(text: str | None) -> dict:
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError("a JSON object was expected")
    return value
