"""The model spec: what a model's input must be, and what its outputs mean.

One frozen dataclass travels with the weights: the registry defines it per
architecture, training fills in the labels and the data's statistics, the
checkpoint stores it, the exporter writes it into the ONNX file's metadata, and the
service and batch scorer read it back from there. Nothing else hard-codes an input
size, a mean or a label list.

This module imports neither torch nor numpy: the serving install uses it too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

#: How an image of any size is brought to the spec's height x width.
#: ``stretch``: resize to exactly H x W (aspect ratio not kept); right for data sets
#: whose images are already square and centred (digits, MNIST, CIFAR).
#: ``center-crop``: resize the shorter side to ``size / crop_pct``, then crop the
#: centre H x W (the ImageNet evaluation transform of torchvision and timm).
RESIZE_POLICIES = ("stretch", "center-crop")
#: The words ``cnnserve train`` and ``export --weights`` take for them (``--resize crop|whole``): crop the
#: centre, or keep the whole picture.
RESIZE_MODES = {"crop": "center-crop", "whole": "stretch"}
#: The resampling filter of that resize (timm's pretrained configs name bicubic for many models).
INTERPOLATIONS = ("bilinear", "bicubic")

SPEC_FORMAT = "cnnserve-spec/1"

class SpecError(ValueError):
    """A spec that is inconsistent or comes from an unknown format."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch"
    crop_pct: float = 0.875
    labels: tuple[str, ...] = field(default=())
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Normalise sequences so that specs read back from JSON compare equal.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "labels", tuple(str(lbl) for lbl in self.labels))
        if self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise SpecError(f"input size must be positive, got {self.height}x{self.width}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(
                f"mean and std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise SpecError(f"std must be positive, got {self.std}")
        if self.resize not in RESIZE_POLICIES:
            raise SpecError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise SpecError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(set(self.labels)) != len(self.labels):
            raise SpecError("label names must be unique")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W of one image as the model takes it."""
        return (self.channels, self.height, self.width)

    def with_labels(self, labels) -> "ModelSpec":
        return replace(self, labels=tuple(labels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["labels"] = list(self.mean), list(self.std), list(self.labels)
        return {"format": SPEC_FORMAT, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        fmt = d.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise SpecError(f"unknown spec format {fmt!r} (this cnnserve reads {SPEC_FORMAT})")
        # A spec read from a file may hold anything: its types first, so that nothing later (a server's
        # warm-up) meets a string where a size belongs, a float where a count does, or a NaN.
        for name in ("channels", "height", "width"):
            if name in d and type(d[name]) is not int:
                raise SpecError(f"{name} must be an integer, got {str(d[name])[:40]!r}")
        for name in ("mean", "std", "labels"):
            if name in d and not isinstance(d[name], list):
                raise SpecError(f"{name} must be a list, got {str(d[name])[:40]!r}")
        numbers = [*d.get("mean", ()), *d.get("std", ()), d.get("crop_pct", 0.875)]
        if not all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
            raise SpecError("mean, std and crop_pct must be finite numbers")
        if not all(isinstance(label, str) for label in d.get("labels", ())):
            raise SpecError("labels must be strings")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:  # missing or unexpected keys, values of the wrong kind
            raise SpecError(f"malformed spec: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            d = json.loads(text)
        except ValueError as e:  # not JSON, or an integer of more than 4,300 digits
            raise SpecError(f"spec is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(d, dict):
            raise SpecError("spec is not a JSON object")
        return cls.from_dict(d)
