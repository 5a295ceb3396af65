"""Small building blocks shared by several families."""

from torch import nn


class ConvBNReLU(nn.Sequential):
    """Convolution without bias, batch norm, ReLU."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, eps: float = 1e-5):
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel_size, stride,
                      kernel_size // 2 if padding is None else padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_chans, eps=eps),
            nn.ReLU(inplace=True),
        )
