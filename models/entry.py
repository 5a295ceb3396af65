"""What the registry holds for one architecture (``ModelEntry``), the refusal of an unknown name, and
ImageNet's normalisation: shared by the zoo (``registry.py``) and the library architectures
(``pretrained.py``), which the registry consults for ``timm:NAME`` and ``torchvision:NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from cnnserve.core.spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    spec: ModelSpec  # default input spec; labels come from the data set
    description: str
