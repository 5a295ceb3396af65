"""GoogLeNet / Inception v1 (Szegedy et al., 2014) with batch norm, as torchvision defines it."""

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConvBNReLU
from .registry import SMALL_INPUT, register_model


def _conv(i, o, k, **kw):
    return ConvBNReLU(i, o, k, eps=1e-3, **kw)


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 reduction then 3x3; 1x1 reduction then the "5x5" branch; pool then 1x1.

    The "5x5" branch uses a 3x3 kernel, as torchvision's reference does (a known quirk kept
    so that the parameter count matches the published 6,624,904).
    """

    def __init__(self, in_chans, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = _conv(in_chans, ch1x1, 1)
        self.branch2 = nn.Sequential(_conv(in_chans, ch3x3red, 1), _conv(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(_conv(in_chans, ch5x5red, 1), _conv(ch5x5red, ch5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1, ceil_mode=True), _conv(in_chans, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: used in training only, never in eval or export."""

    def __init__(self, in_chans, num_classes, dropout=0.7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = _conv(in_chans, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, img_size=224, aux_logits=False, dropout=0.2):
        super().__init__()
        small = img_size < SMALL_INPUT
        pool = lambda k=3: nn.MaxPool2d(k, 2, ceil_mode=True)  # noqa: E731
        self.stem = nn.Sequential(
            _conv(in_chans, 64, 3, stride=1) if small else _conv(in_chans, 64, 7, stride=2),
            nn.Identity() if small else pool(),
            _conv(64, 64, 1), _conv(64, 192, 3), pool(),
        )
        self.inception3 = nn.Sequential(
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64), pool())
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4bcd = nn.Sequential(
            Inception(512, 160, 112, 224, 24, 64, 64), Inception(512, 128, 128, 256, 24, 64, 64),
            Inception(512, 112, 144, 288, 32, 64, 64))
        self.inception4e = nn.Sequential(Inception(528, 256, 160, 320, 32, 128, 128), pool(2))
        self.inception5 = nn.Sequential(
            Inception(832, 256, 160, 320, 32, 128, 128), Inception(832, 384, 192, 384, 48, 128, 128))
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(1024, num_classes))

    def forward(self, x):
        x = self.inception4a(self.inception3(self.stem(x)))
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4bcd(x)
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.head(self.inception5(self.inception4e(x)))
        # In training with aux heads: (logits, aux1, aux2); the trainer weights them 0.3 each.
        return (x, aux1, aux2) if aux1 is not None else x


@register_model("googlenet", family="googlenet")
def googlenet(num_classes, in_chans, img_size, aux_logits: bool = False, **kw):
    """GoogLeNet (Inception v1) with 1x1 reductions; auxiliary heads optional, off in eval."""
    return GoogLeNet(num_classes, in_chans, img_size, aux_logits=aux_logits, **kw)
