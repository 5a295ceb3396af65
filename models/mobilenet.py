"""MobileNet v1 (Howard et al., 2017): depthwise-separable convolutions."""

from torch import nn

from .layers import ConvBNReLU
from .registry import SMALL_INPUT, register_model

# (output channels, stride) of each depthwise-separable block
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def depthwise_separable(in_chans, out_chans, stride):
    """A 3x3 depthwise convolution then a 1x1 pointwise one, each with BN and ReLU."""
    return nn.Sequential(ConvBNReLU(in_chans, in_chans, 3, stride, groups=in_chans),
                         ConvBNReLU(in_chans, out_chans, 1))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, img_size=224, width: float = 1.0):
        super().__init__()
        ch = lambda c: max(8, int(c * width))  # noqa: E731
        c = ch(32)
        layers = [ConvBNReLU(in_chans, c, 3, 1 if img_size < SMALL_INPUT else 2)]
        for out, stride in BLOCKS:
            layers.append(depthwise_separable(c, ch(out), stride))
            c = ch(out)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@register_model("mobilenet_v1", family="mobilenet")
def mobilenet_v1(num_classes, in_chans, img_size, width: float = 1.0):
    """MobileNet v1, depthwise-separable, width multiplier 1.0 by default."""
    return MobileNetV1(num_classes, in_chans, img_size, width)
