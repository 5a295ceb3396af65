"""DenseNet (Huang et al., 2016): every layer sees the feature maps of all before it."""

import torch
from torch import nn

from .registry import SMALL_INPUT, register_model


def _bn_relu_conv(i, o, k):
    return nn.Sequential(nn.BatchNorm2d(i), nn.ReLU(inplace=True), nn.Conv2d(i, o, k, 1, k // 2, bias=False))


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 (bottleneck to bn_size * growth) then BN-ReLU-3x3 (growth channels), concatenated."""

    def __init__(self, in_chans, growth, bn_size):
        super().__init__()
        self.body = nn.Sequential(_bn_relu_conv(in_chans, bn_size * growth, 1), _bn_relu_conv(bn_size * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, growth=32, blocks=(6, 12, 24, 16), init_features=64, bn_size=4,
                 num_classes=1000, in_chans=3, img_size=224):
        super().__init__()
        small = img_size < SMALL_INPUT
        layers = [nn.Conv2d(in_chans, init_features, 3, 1, 1, bias=False)] if small else [
            nn.Conv2d(in_chans, init_features, 7, 2, 3, bias=False),
            nn.BatchNorm2d(init_features), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        c = init_features
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth, bn_size))
                c += growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution
                layers += [_bn_relu_conv(c, c // 2, 1), nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@register_model("densenet121", family="densenet")
def densenet121(num_classes, in_chans, img_size):
    """DenseNet-121: growth 32, blocks [6, 12, 24, 16]."""
    return DenseNet(32, (6, 12, 24, 16), 64, 4, num_classes, in_chans, img_size)
