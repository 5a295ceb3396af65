"""The model registry: a name gives a builder and the architecture's default spec.

Families register their builders with ``@register_model`` (timm style). A duplicate
name raises; an unknown name raises and lists the valid ones. Nothing falls back.

Every builder takes ``num_classes``, ``in_chans`` and ``img_size`` (the square input
side). The 224-px definitions reproduce the published parameter counts; below 64 px
the ImageNet families switch to a small-image stem (3x3 stride-1 first convolution,
no early max pooling, as CIFAR variants do) so that 28- and 32-px inputs keep a
useful feature map.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from cnnserve.core.spec import ModelSpec

from .entry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, UnknownModelError
from .pretrained import library_entry

SMALL_INPUT = 64  # below this side length, ImageNet families use their small-image stem


_REGISTRY: dict[str, ModelEntry] = {}
_LIBRARY: dict[str, ModelEntry] = {}  # timm:NAME and torchvision:NAME, made on first use


def register_model(name: str, *, family: str, channels: int = 3, size: int = 224,
                   mean=None, std=None, resize: str | None = None, description: str = ""):
    """Decorator registering ``builder(num_classes, in_chans, img_size, **kw)`` under ``name``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        rgb = channels == 3
        spec = ModelSpec(
            arch=name, channels=channels, height=size, width=size,
            mean=mean or (IMAGENET_MEAN if rgb else (0.5,)),
            std=std or (IMAGENET_STD if rgb else (0.5,)),
            resize=resize or ("center-crop" if size >= 224 else "stretch"),
        )
        _REGISTRY[name] = ModelEntry(name, family, builder, spec, description or (builder.__doc__ or "").strip())
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The zoo's entry for ``name``; ``timm:ARCH`` and ``torchvision:ARCH`` are built by those libraries."""
    if ":" in name:
        if name not in _LIBRARY:
            _LIBRARY[name] = library_entry(name)
        return _LIBRARY[name]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown architecture {name!r}; valid names: {', '.join(list_models())}") from None


def default_spec(name: str) -> ModelSpec:
    return get_entry(name).spec


def create_model(name: str, num_classes: int, in_chans: int | None = None,
                 img_size: int | None = None, **kwargs) -> nn.Module:
    """Build the bare network (float input, already normalised), timm's ``create_model`` style."""
    entry = get_entry(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return entry.builder(
        num_classes=num_classes,
        in_chans=in_chans or entry.spec.channels,
        img_size=img_size or entry.spec.height,
        **kwargs,
    )


def spec_for(name: str, labels, channels: int | None = None, size: int | None = None,
             mean=None, std=None, resize: str | None = None) -> ModelSpec:
    """The registry's spec for ``name``, specialised to a data set's labels, channels and statistics;
    ``resize``: a resize policy other than the architecture's."""
    base = default_spec(name)
    channels = channels or base.channels
    rgb = channels == 3
    return replace(
        base,
        channels=channels,
        height=size or base.height,
        width=size or base.width,
        resize=resize or base.resize,
        mean=tuple(mean) if mean is not None else (base.mean if len(base.mean) == channels
                                                   else (IMAGENET_MEAN if rgb else (0.5,))),
        std=tuple(std) if std is not None else (base.std if len(base.std) == channels
                                                else (IMAGENET_STD if rgb else (0.5,))),
        labels=tuple(labels),
    )


class Classifier(nn.Module):
    """A network behind its input normalisation: uint8 NCHW pixels in, logits out.

    Training and the ONNX export use this same module, so the graph that is served
    normalises exactly as training did: ``(x / 255 - mean) / std``.
    """

    def __init__(self, net: nn.Module, spec: ModelSpec):
        super().__init__()
        self.net = net
        self.spec = spec
        c = spec.channels
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(spec.std))).view(1, c, 1, 1), persistent=False)
        self.register_buffer("shift", (torch.tensor(spec.mean) / torch.tensor(spec.std)).view(1, c, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() * self.scale - self.shift)


def build_classifier(spec: ModelSpec, **kwargs) -> Classifier:
    """The model a spec describes, with random weights."""
    if spec.num_classes < 1:
        raise ValueError("the spec has no labels: a classifier needs at least one class")
    if spec.height != spec.width:
        raise ValueError(f"only square inputs are supported, got {spec.height}x{spec.width}")
    net = create_model(spec.arch, spec.num_classes, spec.channels, spec.height, **kwargs)
    return Classifier(net, spec)


def feature_shape(features: nn.Module, in_chans: int, img_size: int) -> tuple[int, ...]:
    """Shape (C, H, W) that ``features`` produces for one input image.

    A dry run of a copy on the meta device: shapes only, no arithmetic, weights untouched.
    """
    probe = copy.deepcopy(features).to("meta").eval()
    with torch.no_grad():
        out = probe(torch.zeros(1, in_chans, img_size, img_size, device="meta"))
    return tuple(out.shape[1:])
