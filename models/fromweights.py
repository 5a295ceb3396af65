"""Weights made elsewhere to a cnnserve checkpoint: an architecture by name (a zoo name, ``timm:NAME`` or
``torchvision:NAME``) and a weights file, with the architecture's pretrained spec and the class names.
``cnnserve export --weights`` then exports and verifies it like any trained checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from .entry import UnknownModelError
from .pretrained import WeightsError, head_classes, load_weights, read_weights
from .registry import build_classifier, get_entry

IMAGENET_LABELS = Path(__file__).with_name("imagenet1k.txt")


def read_labels(path: str | os.PathLike | None, classes: int | None = None) -> list[str]:
    """One label per line from ``path``; without one, ImageNet-1k's for a 1000-class model. With
    ``classes``, the count must match."""
    if path is None:
        if classes != 1000:
            raise WeightsError(f"the weights have {classes} classes: name them with --labels FILE (one per line)")
        path = IMAGENET_LABELS
    try:
        labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read labels ({e})") from None
    if classes is not None and len(labels) != classes:
        raise WeightsError(f"{path}: {len(labels)} labels for a model of {classes} classes")
    return labels


def checkpoint_from_weights(arch: str, weights: str | os.PathLike, out: str | os.PathLike,
                            labels: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """A cnnserve checkpoint (the file ``out``) of ``arch`` (a zoo name, ``timm:NAME`` or
    ``torchvision:NAME``) holding ``weights``, with the architecture's pretrained spec and the labels;
    ``export_checkpoint`` then exports and verifies it like any other. An existing ``out`` made from the
    same weights is reused; anything else there is refused unless ``overwrite``."""
    try:
        entry = get_entry(arch)
        state, _ = read_weights(weights)
        classes = head_classes(state)
        # first whether the weights fit the architecture (the likelier mistake, and its message names the
        # tensors that do not fit), only then their class names
        model = build_classifier(replace(entry.spec, labels=tuple(f"class {i}" for i in range(classes))))
        load_weights(model.net, state, str(weights))
        spec = replace(entry.spec, labels=tuple(read_labels(labels, classes)))
    except (UnknownModelError, ValueError) as e:  # WeightsError is a ValueError
        raise WeightsError(str(e)) from None
    lib = arch.partition(":")[0] if ":" in arch else None
    origin = {"kind": lib or "pretrained", "weights": Path(weights).name, "weights_sha256": file_sha256(weights)}
    if lib:
        origin["name"] = arch.partition(":")[2]
    path = Path(out)
    if path.exists():
        if _same_weights_checkpoint(path, arch, spec, origin):
            return path  # made before from the same weights: its export is then an export of the same checkpoint
        if not overwrite:
            raise WeightsError(f"{path} exists and is not a checkpoint of {arch} with {weights}: exports never "
                              "replace it silently; --out another file, or --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"arch": arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(),
                           "metrics": {}, "origin": origin, "torch_version": str(torch.__version__)})
    return path


def _same_weights_checkpoint(path: Path, arch: str, spec, origin: dict) -> bool:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return False
    return ckpt["arch"] == arch and ckpt["spec"] == spec and ckpt.get("origin") == origin
