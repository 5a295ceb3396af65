"""ResNet (He et al., 2015): basic and bottleneck residual blocks."""

from torch import nn

from .registry import SMALL_INPUT, register_model


def _conv_bn(i, o, k, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, k, stride, k // 2, bias=False), nn.BatchNorm2d(o))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chans, width, stride=1):
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(_conv_bn(in_chans, width, 3, stride), nn.ReLU(inplace=True),
                                  _conv_bn(width, out, 3))
        self.shortcut = _conv_bn(in_chans, out, 1, stride) if stride != 1 or in_chans != out else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_chans, width, stride=1):
        nn.Module.__init__(self)
        out = width * self.expansion
        self.body = nn.Sequential(
            _conv_bn(in_chans, width, 1), nn.ReLU(inplace=True),
            _conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            _conv_bn(width, out, 1))
        self.shortcut = _conv_bn(in_chans, out, 1, stride) if stride != 1 or in_chans != out else nn.Identity()
        self.relu = nn.ReLU(inplace=True)


class ResNet(nn.Module):
    def __init__(self, block, depths, num_classes=1000, in_chans=3, img_size=224):
        super().__init__()
        small = img_size < SMALL_INPUT
        self.stem = nn.Sequential(
            *(_conv_bn(in_chans, 64, 3) if small else _conv_bn(in_chans, 64, 7, 2)), nn.ReLU(inplace=True),
            nn.Identity() if small else nn.MaxPool2d(3, 2, 1))
        stages, c = [], 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c, width, 2 if (j == 0 and i > 0) else 1))
                c = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.body[-1][1].weight)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


@register_model("resnet18", family="resnet")
def resnet18(num_classes, in_chans, img_size):
    """ResNet-18, basic blocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_chans, img_size)


@register_model("resnet34", family="resnet")
def resnet34(num_classes, in_chans, img_size):
    """ResNet-34, basic blocks [3, 4, 6, 3]."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_chans, img_size)


@register_model("resnet50", family="resnet")
def resnet50(num_classes, in_chans, img_size):
    """ResNet-50, bottleneck blocks [3, 4, 6, 3]."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, img_size)
