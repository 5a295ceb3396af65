"""LeNet-5 (LeCun et al., 1998): the classic and the modern variant."""

from torch import nn

from .registry import feature_shape, register_model


class LeNet5(nn.Module):
    """Two 5x5 convolutions with 2x2 pooling, then 120-84-classes fully connected.

    classic: 32x32 input without padding, tanh, average pooling (61,706 parameters
    for 1x32x32 and 10 classes; the pooling layers carry no weights, as in today's
    reproductions). modern: 28x28 input with padding 2, ReLU, max pooling.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, classic: bool = False):
        super().__init__()
        act, pool = (nn.Tanh, nn.AvgPool2d) if classic else (nn.ReLU, nn.MaxPool2d)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, kernel_size=5, padding=0 if classic else 2), act(), pool(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), act(), pool(2, 2),
        )
        c, h, w = feature_shape(self.features, in_chans, img_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 120), act(),
            nn.Linear(120, 84), act(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet5", family="lenet", channels=1, size=28)
def lenet5(num_classes, in_chans, img_size, **kw):
    """LeNet-5, modern: 28x28 with padding 2, ReLU, max pooling."""
    return LeNet5(num_classes, in_chans, img_size, classic=False, **kw)


@register_model("lenet5_classic", family="lenet", channels=1, size=32)
def lenet5_classic(num_classes, in_chans, img_size, **kw):
    """LeNet-5, classic: 32x32, tanh, average pooling."""
    return LeNet5(num_classes, in_chans, img_size, classic=True, **kw)
