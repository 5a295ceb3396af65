"""VGG (Simonyan & Zisserman, 2014), built from configuration lists."""

from torch import nn

from .alexnet import ConvNet
from .registry import register_model

# Output channels of each 3x3 convolution; "M" is a 2x2 max pool.
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def make_layers(config, in_chans: int, img_size: int, batch_norm: bool) -> nn.Sequential:
    """Convolutions from a config list. A pool that would shrink the map below 1x1 is left out
    (so 28-px inputs work; at 224 px every pool is kept)."""
    layers, c, size = [], in_chans, img_size
    for v in config:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            continue
        layers.append(nn.Conv2d(c, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    return nn.Sequential(*layers)


def _vgg(config: str, batch_norm: bool):
    def build(num_classes, in_chans, img_size, dropout: float = 0.5):
        features = make_layers(CONFIGS[config], in_chans, img_size, batch_norm)
        return ConvNet(features, num_classes, in_chans, img_size, dropout)

    build.__doc__ = f"{config.upper()}{' with batch norm' if batch_norm else ''}."
    return build


for _name in CONFIGS:
    register_model(_name, family="vgg")(_vgg(_name, batch_norm=False))
    register_model(f"{_name}_bn", family="vgg")(_vgg(_name, batch_norm=True))
