"""Pictures of a trained network (training side; torch): its first convolution's filters, and for one
image the feature maps after each stage (convolution, activation, pooling) with their shapes, as the
ZFNet paper and the articles on it draw them.

    cnnserve visualize runs/lenet5-digits/model.pt --image runs/lenet5-digits/sample-7.png

Works for every zoo family and for timm/torchvision models made through cnnserve (any checkpoint
``classifier_from_checkpoint`` loads), since it only looks for the modules torch runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def first_conv(net: nn.Module) -> nn.Conv2d:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("the network has no 2-D convolution")
    return conv


def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def _title(fig, text: str, fontsize: float = 9) -> None:
    """A figure title wrapped to the figure's width (a one-line title wider than a narrow figure, such as
    LeNet-5's six filters, was cut off at both ends)."""
    import textwrap

    chars = max(20, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))  # an average glyph is about 0.6 em
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def filters_figure(net: nn.Module, title: str):
    """The figure ``filters_png`` saves (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = first_conv(net)
    w = conv.weight.detach().float().cpu().numpy()  # out x in x k x k
    n = min(len(w), 96)
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols * 0.8, 3.2), rows * 0.8 + 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        f = w[i]
        f = (f - f.min()) / (f.max() - f.min() + 1e-12)
        if f.shape[0] == 3:
            ax.imshow(f.transpose(1, 2, 0), interpolation="nearest")
        else:
            ax.imshow(f.mean(0), cmap="gray", interpolation="nearest")
    _title(fig, f"{title}: first convolution, {w.shape[0]} filters of {w.shape[1]}x{w.shape[2]}x{w.shape[3]}"
           + (f" (first {n} shown)" if n < len(w) else ""))
    fig.tight_layout()
    return fig


def filters_png(net: nn.Module, out: Path, title: str) -> Path:
    """The first convolution's filters, each scaled to its own range; RGB where it reads 3 channels."""
    import matplotlib.pyplot as plt

    fig = filters_figure(net, title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def feature_maps(net: nn.Module, x: torch.Tensor, max_stages: int = 12) -> list[tuple[str, str, np.ndarray]]:
    """(module name, kind, maps C x H x W) after each convolution, activation and pooling, in the order
    the forward pass runs them; at most ``max_stages``, evenly spaced, first and last kept."""
    names = {m: n for n, m in net.named_modules()}
    seen: list = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            kind = "conv" if isinstance(module, nn.Conv2d) else "pool" if isinstance(module, POOLS) else "activation"
            seen.append((names.get(module, "?"), kind, output[0].detach().float().cpu().numpy().copy()))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, *ACTIVATIONS, *POOLS))]
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in handles:
            h.remove()
    if len(seen) > max_stages:
        keep = sorted(set(np.linspace(0, len(seen) - 1, max_stages).round().astype(int)))
        seen = [seen[i] for i in keep]
    return seen


def features_png(stages, image: np.ndarray, out: Path, title: str, per_row: int = 8) -> Path:
    """One row per stage: its first ``per_row`` channels, titled with the module, kind and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(stages) + 1
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    img = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    axes[0][0].imshow(img, cmap="gray" if image.shape[0] == 1 else None)
    axes[0][0].set_title(f"input {'x'.join(map(str, image.shape))}", fontsize=7, loc="left")
    for r, (name, kind, maps) in enumerate(stages, start=1):
        for c in range(min(per_row, len(maps))):
            axes[r][c].imshow(maps[c], cmap="viridis", interpolation="nearest")
        axes[r][0].set_title(f"{name} ({kind}) {'x'.join(map(str, maps.shape))}", fontsize=7, loc="left")
    _title(fig, f"{title}: feature maps after each stage (first {per_row} channels)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def visualize(checkpoint: str | os.PathLike, image: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None) -> list[Path]:
    """Write ``filters.png`` and, with ``image``, ``features.png`` into ``out`` (default: beside the
    checkpoint); returns the paths."""
    from cnnserve.core.preprocess import load_file

    from .checkpoint import classifier_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = classifier_from_checkpoint(ckpt).eval()
    folder = Path(out) if out else Path(ckpt["path"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    written = [filters_png(model.net, folder / "filters.png", spec.arch)]
    if image is not None:
        pixels = load_file(image, spec)  # the serving preprocessing: what the model sees
        x = torch.from_numpy(pixels[None].copy()).float() * model.scale - model.shift  # as Classifier.forward does
        stages = feature_maps(model.net, x)
        written.append(features_png(stages, pixels, folder / "features.png", f"{spec.arch} on {Path(image).name}"))
    return written
