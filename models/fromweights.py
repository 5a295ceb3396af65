"""Weights made elsewhere to a cnnserve checkpoint: an architecture by name (a zoo name, ``timm:NAME`` or
``torchvision:NAME``) and a weights file, with the input the model was trained with (the library's data
config, or what the command's flags say) and the class names. ``cnnserve export --weights`` then exports
and verifies it like any trained checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from cnnserve.core.spec import RESIZE_MODES, ModelSpec

from .checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from .entry import UnknownModelError
from .pretrained import WeightsError, head_classes, library_data_config, load_weights, read_weights
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


#: What ``input`` may set in ``checkpoint_from_weights``, and the command's flag for each (for messages).
INPUT_FLAGS = {"size": "--img-size", "mean": "--mean", "std": "--std", "resize": "--resize",
               "crop_pct": "--crop-pct", "interpolation": "--interpolation"}


def input_spec(arch: str, file_spec: dict | None = None, given: dict | None = None,
               preset: str | None = None) -> tuple[ModelSpec, str]:
    """The input of ``arch``'s model made from weights (no labels yet), and a line saying where each part
    came from. In order of precedence: ``given`` (the command's flags: ``size``, ``mean``, ``std``,
    ``resize`` as ``crop``/``whole`` or a spec policy, ``crop_pct``, ``interpolation``; one mean or std value
    stands for every channel), ``preset`` (one of the library's weights, ``library_data_config``), the
    weights file's own spec (a cnnserve checkpoint given as weights), then the library's data config for
    its default weights (the registry's entry; the zoo's defaults for a zoo name)."""
    base = get_entry(arch).spec
    lib = arch.partition(":")[0] if ":" in arch else None
    first = library_data_config(arch)["source"] if lib else f"the zoo's defaults for {arch}"
    values = {"size": base.height, "mean": base.mean, "std": base.std, "resize": base.resize,
              "crop_pct": base.crop_pct, "interpolation": base.interpolation}
    channels, layers = base.channels, []
    if file_spec:
        try:
            own = ModelSpec.from_dict(file_spec)
        except ValueError:
            own = None
        if own is not None:
            channels = own.channels if not lib else channels
            values.update(size=own.height, mean=own.mean, std=own.std, resize=own.resize, crop_pct=own.crop_pct,
                          interpolation=own.interpolation)
            first = "the weights file's own spec"
    if preset:
        if not lib:
            raise WeightsError(f"--preset names one of a library's weights (timm:NAME, torchvision:NAME); {arch} is "
                               "a zoo architecture: give its input with --img-size, --mean and --std")
        config = library_data_config(arch, preset)
        values.update({k: config[k] for k in ("size", "mean", "std", "crop_pct", "interpolation")})
        values["resize"] = "center-crop"
        first = config["source"]
    for key, value in (given or {}).items():
        if value is None:
            continue
        if key not in INPUT_FLAGS:
            raise ValueError(f"unknown input setting {key!r}; valid: {', '.join(INPUT_FLAGS)}")
        if key in ("mean", "std"):
            value = tuple(float(v) for v in value)
            if len(value) == 1:
                value = value * channels
        elif key == "resize":
            value = RESIZE_MODES.get(value, value)
        values[key] = value
        layers.append(INPUT_FLAGS[key])
    size = int(values["size"])
    spec = replace(base, channels=channels, height=size, width=size, mean=values["mean"], std=values["std"],
                   resize=values["resize"], crop_pct=float(values["crop_pct"]),
                   interpolation=values["interpolation"], labels=())
    resize = (f"centre crop {spec.crop_pct:g}" if spec.resize == "center-crop" else "the whole picture stretched")
    line = (f"input {spec.channels}x{spec.height}x{spec.width}, mean {_floats(spec.mean)}, std {_floats(spec.std)}, "
            f"{resize}, {spec.interpolation}: from {first}" + (f", with {', '.join(layers)}" if layers else ""))
    return spec, line


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def checkpoint_from_weights(arch: str, weights: str | os.PathLike, out: str | os.PathLike,
                            labels: str | os.PathLike | None = None, overwrite: bool = False,
                            input: dict | None = None, preset: str | None = None, log=None) -> Path:
    """A cnnserve checkpoint (the file ``out``) of ``arch`` (a zoo name, ``timm:NAME`` or
    ``torchvision:NAME``) holding ``weights``, with the labels and the input ``input_spec`` gives (the
    library's data config, ``preset``'s, the file's own, or what ``input`` says); ``export_checkpoint`` then
    exports and verifies it like any other. ``log`` gets a line saying the input and where it came from. An
    existing ``out`` made from the same weights with the same input is reused; anything else there is refused
    unless ``overwrite``."""
    try:
        get_entry(arch)  # an unknown name first: its message lists the near ones
        state, file_spec = read_weights(weights)
        base, described = input_spec(arch, file_spec, input, preset)
        classes = head_classes(state)
        # first whether the weights fit the architecture (the likelier mistake, and its message names the
        # tensors that do not fit), only then their class names
        model = build_classifier(replace(base, labels=tuple(f"class {i}" for i in range(classes))))
        load_weights(model.net, state, str(weights))
        spec = replace(base, labels=tuple(read_labels(labels, classes)))
    except (UnknownModelError, ValueError) as e:  # WeightsError is a ValueError
        raise WeightsError(str(e)) from None
    if log:
        log(described)
    lib = arch.partition(":")[0] if ":" in arch else None
    origin = {"kind": lib or "pretrained", "weights": Path(weights).name, "weights_sha256": file_sha256(weights)}
    if lib:
        origin["name"] = arch.partition(":")[2]
    path = Path(out)
    if path.exists():
        same = _same_weights_checkpoint(path, arch, origin)
        if same is not None and same == spec:
            return path  # made before from the same weights: its export is then an export of the same checkpoint
        if not overwrite:
            if same is not None:
                raise WeightsError(f"{path} holds {arch} with {weights} for another input ({_brief(same)}; now "
                                   f"{_brief(spec)}): exports never replace it silently; --out another file, or "
                                   "--overwrite to replace it")
            raise WeightsError(f"{path} exists and is not a checkpoint of {arch} with {weights}: exports never "
                              "replace it silently; --out another file, or --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"arch": arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(),
                           "metrics": {}, "origin": origin, "torch_version": str(torch.__version__)})
    return path


def _brief(spec: ModelSpec) -> str:
    return (f"{spec.height} px, mean {_floats(spec.mean)}, std {_floats(spec.std)}, {spec.resize}, "
            f"{len(spec.labels)} labels")


def _same_weights_checkpoint(path: Path, arch: str, origin: dict) -> ModelSpec | None:
    """The spec of the checkpoint at ``path`` when it was made from the same weights for ``arch``, else None."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return None
    return ckpt["spec"] if ckpt["arch"] == arch and ckpt.get("origin") == origin else None
