"""AlexNet (Krizhevsky et al., 2012) and ZFNet (Zeiler & Fergus, 2013)."""

from torch import nn

from .registry import SMALL_INPUT, feature_shape, register_model


class ConvNet(nn.Module):
    """A convolutional feature stack followed by AlexNet's dropout/4096/4096 classifier."""

    def __init__(self, features: nn.Sequential, num_classes: int, in_chans: int, img_size: int,
                 dropout: float = 0.5):
        super().__init__()
        self.features = features
        c, h, w = feature_shape(features, in_chans, img_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(c * h * w, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _lrn(enabled: bool):
    # Local response normalisation as in both papers; no parameters, off by default for AlexNet.
    return [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if enabled else []


@register_model("alexnet", family="alexnet")
def alexnet(num_classes, in_chans, img_size, lrn: bool = False, dropout: float = 0.5):
    """AlexNet, the single-tower 64-192-384-256-256 variant; overlapping 3x3/2 max pooling."""
    small = img_size < SMALL_INPUT
    stem = nn.Conv2d(in_chans, 64, 3, 1, 1) if small else nn.Conv2d(in_chans, 64, 11, 4, 2)
    features = nn.Sequential(
        stem, nn.ReLU(inplace=True), *_lrn(lrn), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), *_lrn(lrn), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )
    return ConvNet(features, num_classes, in_chans, img_size, dropout)


@register_model("zfnet", family="alexnet")
def zfnet(num_classes, in_chans, img_size, lrn: bool = True, dropout: float = 0.5):
    """ZFNet: AlexNet with a 7x7/2 first layer and a 5x5/2 second one, 96-256-384-384-256."""
    small = img_size < SMALL_INPUT
    stem = nn.Conv2d(in_chans, 96, 3, 1, 1) if small else nn.Conv2d(in_chans, 96, 7, 2, 1)
    features = nn.Sequential(
        stem, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1), *_lrn(lrn),
        nn.Conv2d(96, 256, 5, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1), *_lrn(lrn),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )
    return ConvNet(features, num_classes, in_chans, img_size, dropout)
