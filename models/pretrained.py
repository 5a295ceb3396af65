"""Weights made elsewhere: torchvision and timm state dicts into the zoo, and those libraries' own
architectures by name (``timm:NAME``, ``torchvision:NAME``). Nothing is downloaded: weights are
local ``.pth``/``.pt`` or ``.safetensors`` files.

**Key mapping.** The zoo declares its layers in the order torchvision does (stem, stages, blocks:
convolution then batch norm; the classifier last), so a torchvision state dict maps onto a zoo
model tensor by tensor in that order, every shape checked. Names differ (torchvision's
``layer1.0.conv1.weight`` is the zoo's ``stages.0.0.body.0.0.weight``); order and shapes do not.
Auxiliary heads the zoo model was built without (GoogLeNet's ``aux1``/``aux2``) are skipped. The
final linear layer (the head) is loaded when its shape fits and replaced (kept freshly initialised)
when the number of classes differs. Anything else that does not fit is refused with the keys that
are missing and unexpected, in one message.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from cnnserve.core.spec import ModelSpec

from .entry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, UnknownModelError

LIBRARIES = ("timm", "torchvision")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and why."""


# torchvision's Python code registers fake (meta) kernels for these operators whether or not its
# compiled library loaded; without their schemas, `import torchvision` stops there.
TORCHVISION_FAKE_OPS = ("nms", "qnms")
TORCHVISION_OPS_NOTE = (
    "torchvision's compiled operators cannot load beside this torch (a CUDA build of torchvision beside a "
    "CPU-only torch); cnnserve declared the names of nms and qnms so that torchvision and timm import: "
    "classification models work, detection operators (nms, roi_align, ...) raise when called. "
    "A CPU build of torchvision from PyTorch's CPU index removes the cause (docs/troubleshooting.md).")
_KEEP: list = []  # the operator declarations live as long as the process


def declare_torchvision_ops(warn: bool = False) -> bool:
    """Make ``import torchvision`` (and ``import timm``, which imports it) work where torchvision's
    compiled extension cannot load beside this torch. PyPI's torchvision for Linux is a CUDA build; beside
    the CPU-only torch of this project's lock its ``_C`` library fails to load, torchvision carries on
    without its operators, and then stops at registering fake kernels for ``nms`` and ``qnms``
    ("operator torchvision::nms does not exist"). This loads ``_C`` as torchvision would; only where
    that fails does it declare those two schemas (calling them still fails, with torchvision's own
    error), and says so once with ``warn``. Returns whether it declared them. Called before
    torchvision's first import: by ``import_torchvision`` and by the venv's import hook
    (``command/venvhook.py``, installed by ``./run.sh``)."""
    import importlib.machinery
    import warnings

    if _KEEP or "torchvision" in sys.modules:
        return bool(_KEEP)
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False  # not installed: the import fails with Python's own error
    folder = Path(next(iter(spec.submodule_search_locations)))
    library = next((folder / f"_C{s}" for s in importlib.machinery.EXTENSION_SUFFIXES
                    if (folder / f"_C{s}").is_file()), None)
    try:
        if library is None:
            raise OSError("no _C library")
        torch.ops.load_library(str(library))  # what torchvision.extension does next; loading twice is a no-op
        return False
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in TORCHVISION_FAKE_OPS:
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)
    if warn:
        warnings.warn(TORCHVISION_OPS_NOTE, RuntimeWarning, stacklevel=3)
    return True


def import_torchvision():
    """torchvision, also where its compiled operators cannot load beside this torch
    (``declare_torchvision_ops``): classification models need none of them."""
    declare_torchvision_ops()
    import torchvision

    return torchvision


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: no pickled code runs),
    and the spec (as a dict) when the file is a cnnserve checkpoint. Checkpoints that wrap the state
    dict (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` prefixes (DataParallel) are
    unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is one line naming the file
        raise WeightsError(f"{path}: not a readable state dict ({type(e).__name__}: {str(e)[:200]})") from None
    spec = state.get("spec") if isinstance(state, dict) and str(state.get("format", "")).startswith("cnnserve") else None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, spec


def head_of(net: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear layer (the classifier head): its name and the module."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(net).__name__} has no linear classifier head")
    return linears[-1]


def head_classes(state: dict[str, torch.Tensor]) -> int:
    """Classes of the state dict's head: the rows of its last 2-D weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise WeightsError("the state dict has no linear layer, so no class count")
    return int(weights[-1].shape[0])


def _entries(state: dict[str, torch.Tensor], skip_aux: bool) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not (skip_aux and k.split(".")[0] in ("aux1", "aux2", "AuxLogits"))]


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> dict:
    """Load ``state`` into ``net`` by name when the names are the model's own, else by order (see
    the module's docstring). Returns what happened: tensors loaded and whether the head was replaced."""
    own = net.state_dict()
    head_name, head = head_of(net)
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    ours = list(own.items())
    skip_aux = not any(k.split(".")[0] in ("aux1", "aux2") for k in own)
    theirs = _entries(state, skip_aux)
    if {k for k, _ in theirs} == set(own):  # the same names: the model's own kind of state dict
        pairs = [(k, own[k], k, state[k]) for k in own]
    elif len(theirs) == len(ours):
        pairs = [(k, v, fk, fv) for (k, v), (fk, fv) in zip(ours, theirs)]
    else:
        extra = len(theirs) - len(ours)
        missing = [k for k, _ in ours[len(theirs):]] if extra < 0 else []
        unexpected = [k for k, _ in theirs[len(ours):]] if extra > 0 else []
        raise WeightsError(f"{source}: {len(theirs)} tensors do not fit a model of {len(ours)}; missing: "
                           f"{_names(missing)}; unexpected: {_names(unexpected)}")
    loaded, replaced, misfits = {}, False, []
    for k, v, fk, fv in pairs:
        if fv.shape == v.shape:
            loaded[k] = fv
        elif k in head_keys and (fv.ndim < 2 or fv.shape[1:] == v.shape[1:]):
            replaced = True  # another number of classes: this head starts fresh
        else:
            misfits.append(f"{k} {tuple(v.shape)} <- {fk} {tuple(fv.shape)}")
    if misfits:
        raise WeightsError(f"{source}: shapes do not fit: {_names(misfits)}; missing: "
                           f"{_names([k for k, *_ in pairs if k not in loaded and k not in head_keys])}; "
                           f"unexpected: {_names([fk for k, _, fk, _ in pairs if k not in loaded and k not in head_keys])}")
    net.load_state_dict(loaded, strict=False)  # the keys are the model's own; the head may be left out
    return {"tensors": len(loaded), "head": "replaced" if replaced else "loaded", "head_layer": head_name}


def _names(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def split_parameters(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, head parameters)."""
    _, head = head_of(net)
    head_ids = {id(p) for p in head.parameters()}
    params = list(net.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def freeze_backbone(net: nn.Module) -> None:
    """Only the head learns: backbone parameters stop taking gradients, and its batch-norm layers
    keep their running statistics (call again after every ``net.train()``)."""
    backbone, _ = split_parameters(net)
    for p in backbone:
        p.requires_grad_(False)
    for m in net.modules():  # the head is a linear layer: every batch norm belongs to the backbone
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def library_models(lib: str, pattern: str = "*") -> list[str]:
    """The classification architectures ``lib`` (timm or torchvision) builds, by a shell-style pattern."""
    import fnmatch

    if lib == "timm":
        import_torchvision()  # timm imports it
        import timm

        return timm.list_models(pattern)
    if lib == "torchvision":
        tv = import_torchvision()
        return sorted(fnmatch.filter(tv.models.list_models(module=tv.models), pattern))
    raise UnknownModelError(f"unknown library {lib!r}; valid: {', '.join(LIBRARIES)}")


def _near(arch: str, names: list[str], lib: str) -> str:
    """'near names: ...' for an unknown architecture, and the command that lists the library's names."""
    import difflib

    close = difflib.get_close_matches(arch.lower(), names, n=6, cutoff=0.6)
    stem = "".join(ch for ch in arch.lower() if ch.isalpha())[:4] or arch[:4]
    return ((f"near names: {', '.join(close)}; " if close else "")
            + f"`cnnserve models '{lib}:*{stem}*'` lists the names it has")


def _tag_list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def library_data_config(name: str, preset: str | None = None) -> dict:
    """The input ``timm:ARCH`` or ``torchvision:ARCH`` was trained with, as its library states it: mean, std,
    input size, crop fraction and interpolation, with ``source`` saying where they came from. timm's come
    from the architecture's ``pretrained_cfg`` (through ``resolve_data_config``), torchvision's from its
    weights' ``transforms()``; ``preset`` names which of the library's weights (timm's pretrained tag,
    ``a1_in1k``; torchvision's enum member, ``IMAGENET1K_V1``), else its default ones. An architecture the
    library states nothing for gets ImageNet's at 224."""
    lib, _, arch = name.partition(":")
    config = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "crop_pct": 0.875,
              "interpolation": "bilinear", "source": f"ImageNet's defaults ({lib} states none for {arch})"}
    if lib == "timm":
        import_torchvision()
        import timm
        from timm.data import resolve_data_config

        if not timm.is_model(arch):
            raise UnknownModelError(f"timm has no architecture {arch!r} (timm {timm.__version__}); "
                                    + _near(arch, library_models("timm"), "timm"))
        base = arch.partition(".")[0]
        tagged = f"{base}.{preset}" if preset else arch
        try:
            cfg = timm.models.get_pretrained_cfg(tagged)
        except RuntimeError:  # a tag the architecture has no weights for
            tags = timm.list_pretrained(f"{base}.*")
            raise UnknownModelError(f"timm has no pretrained config {tagged!r}; its tags: "
                                    f"{_tag_list([t.partition('.')[2] for t in tags])}") from None
        if cfg is not None:
            d = resolve_data_config(pretrained_cfg=cfg.to_dict())
            config = {"mean": tuple(d["mean"]), "std": tuple(d["std"]), "size": int(d["input_size"][-1]),
                      "crop_pct": float(d["crop_pct"] or 0.875),
                      "interpolation": "bicubic" if d["interpolation"] == "bicubic" else "bilinear",
                      "source": f"timm's pretrained_cfg of {base}.{cfg.tag}" if cfg.tag else
                                f"timm's pretrained_cfg of {base}"}
    elif lib == "torchvision":
        tv = import_torchvision()
        if arch not in tv.models.list_models(module=tv.models):
            raise UnknownModelError(f"torchvision has no classification architecture {arch!r} (torchvision "
                                    f"{tv.__version__}); " + _near(arch, library_models("torchvision"), "torchvision"))
        try:
            enum = tv.models.get_model_weights(arch)
        except (ValueError, KeyError):
            enum = None
        if preset and (enum is None or preset not in enum.__members__):
            raise UnknownModelError(f"torchvision's {arch} has no weights {preset!r}; its weights: "
                                    f"{_tag_list(list(enum.__members__) if enum is not None else [])}")
        if enum is not None:
            weights = enum[preset] if preset else enum.DEFAULT
            t = weights.transforms()
            size = int(t.crop_size[0])
            config = {"mean": tuple(t.mean), "std": tuple(t.std), "size": size,
                      "crop_pct": min(1.0, size / t.resize_size[0]),
                      "interpolation": "bicubic" if t.interpolation.value == "bicubic" else "bilinear",
                      "source": f"torchvision's {weights} transforms"}
    else:
        raise UnknownModelError(f"unknown library {lib!r} in {name!r}; valid: {', '.join(LIBRARIES)}")
    return config


def library_entry(name: str):
    """A registry entry for ``timm:ARCH`` or ``torchvision:ARCH``: built by the library with random
    weights, its spec from the library's pretrained data config (``library_data_config``)."""

    lib, _, arch = name.partition(":")
    config = library_data_config(name)
    if lib == "timm":
        import timm

        def builder(num_classes, in_chans, img_size):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    else:
        tv = import_torchvision()

        def builder(num_classes, in_chans, img_size):
            if in_chans != 3:
                raise ValueError(f"torchvision's {arch} takes 3 channels, not {in_chans}")
            return tv.models.get_model(arch, weights=None, num_classes=num_classes)
    spec = ModelSpec(name, 3, config["size"], config["size"], config["mean"], config["std"], resize="center-crop",
                     crop_pct=config["crop_pct"], interpolation=config["interpolation"])
    return ModelEntry(name, lib, builder, spec, f"{lib}'s {arch}")
