"""Data sets as uint8 images at a spec's size, with fixed train/validation/test splits.

Every loader yields ``(uint8 tensor C x H x W, class index)`` and brings its images to
the spec through ``cnnserve.core.preprocess``: training sees pictures converted and resized
exactly as the service will convert and resize them.

- ``digits`` (the embedded default): scikit-learn's 1,797 real 8x8 handwritten digits.
- ``mnist``, ``fashion-mnist``: the standard IDX files (gzipped or not) from a directory;
  ``download=True`` fetches them, checked against their published MD5 sums.
- ``cifar10``: the standard python-pickle batches from a directory, read by an unpickler
  that only accepts what those files contain.
- ``folder``: one sub-folder per class (ImageNet / ImageFolder layout), optionally under
  ``train/``, ``val/`` and ``test/``; images are decoded lazily.
- ``shapes``: procedurally generated RGB shapes on noise, on a seed, for offline RGB work.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset, TensorDataset

from cnnserve.core.spec import ModelSpec
from cnnserve.core.preprocess import IMAGE_EXTENSIONS, ImageError, load_file, to_array

from .datafiles import IDX_SOURCES, DataError, cifar_batch, download_idx, idx_file, read_idx, unpickle

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder", "shapes")
NATIVE_CHANNELS = {"digits": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "folder": 3, "shapes": 3}
SPLIT_SEED = 0  # splits are fixed: the same images are held out in every run

LABELS = {
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "shapes": ("circle", "square", "triangle", "cross"),
}


@dataclass
class DataSplits:
    name: str
    labels: tuple[str, ...]
    train: Dataset
    val: Dataset
    test: Dataset
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]


def load_dataset(name: str, spec: ModelSpec, data_dir: str | Path | None = None, download: bool = False,
                 limit: int | None = None, shapes_per_class: int = 500) -> DataSplits:
    """Load ``name`` at ``spec``'s size and channels. ``limit`` keeps at most that many training images."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if name in ("mnist", "fashion-mnist", "cifar10", "folder") and data_dir is None:
        raise DataError(f"data set {name!r} needs --data-dir (the directory holding its files)")
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and name != "shapes":
        if download and name in IDX_SOURCES:
            download_idx(name, root)
        if not root.is_dir():
            raise DataError(f"{root}: data directory does not exist")
    if name == "digits":
        splits = _digits(spec)
    elif name in IDX_SOURCES:
        splits = _idx(name, root, spec)
    elif name == "cifar10":
        splits = _cifar10(root, spec)
    elif name == "folder":
        splits = _folder(root, spec)
    else:
        splits = _shapes(spec, shapes_per_class)
    if limit is not None and limit < len(splits.train):
        splits.train = Subset(splits.train, range(limit))
    return splits


# --- helpers shared by the in-memory sets ---------------------------------------------------

def _fit(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """N x H x W (grey) or N x H x W x 3 uint8 images to N x C x H x W at the spec, via preprocess."""
    n = len(images)
    grey = images.ndim == 3
    if images.shape[1:3] == (spec.height, spec.width) and (spec.channels == 1) == grey:
        # a copy: IDX arrays are read-only views of the file's bytes
        return images[:, None].copy() if grey else np.ascontiguousarray(images.transpose(0, 3, 1, 2)).copy()
    out = np.empty((n, *spec.input_shape), np.uint8)
    for i, img in enumerate(images):
        out[i] = to_array(Image.fromarray(img), spec)
    return out


def _stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = x.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _arrays(name, labels, spec, train, val, test) -> DataSplits:
    """Splits from (images, targets) pairs of numpy arrays."""
    fitted = [(_fit(x, spec), np.asarray(y, np.int64)) for x, y in (train, val, test)]
    mean, std = _stats(fitted[0][0])
    ds = [TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) for x, y in fitted]
    return DataSplits(name, tuple(labels), *ds, mean, std)


def _split(n: int, fractions=(0.7, 0.15), targets=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, seeded, stratified (when targets are given) index split into train/val/test."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = targets if targets is not None and min(np.bincount(targets)) >= 3 else None
    train, rest = train_test_split(idx, train_size=fractions[0], random_state=SPLIT_SEED, stratify=strat)
    val_share = fractions[1] / (1 - fractions[0])
    rest_strat = strat[rest] if strat is not None and min(np.bincount(strat[rest])) >= 2 else None
    val, test = train_test_split(rest, train_size=val_share, random_state=SPLIT_SEED, stratify=rest_strat)
    return train, val, test


# --- digits ---------------------------------------------------------------------------------

def _digits(spec: ModelSpec) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    train, val, test = _split(len(images), (0.6, 0.2), d.target)
    return _arrays("digits", [str(i) for i in range(10)], spec,
                   (images[train], d.target[train]), (images[val], d.target[val]),
                   (images[test], d.target[test]))


# --- IDX (MNIST, Fashion-MNIST; the files: datafiles.py) ---------------------------------------

def _idx(name: str, root: Path, spec: ModelSpec) -> DataSplits:
    x, y = (read_idx(idx_file(root, f"train-{k}")) for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    xt, yt = (read_idx(idx_file(root, f"t10k-{k}")) for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    for imgs, lbls, which in ((x, y, "train"), (xt, yt, "t10k")):
        if imgs.ndim != 3 or lbls.ndim != 1 or len(imgs) != len(lbls):
            raise DataError(f"{root}: {which} images {imgs.shape} and labels {lbls.shape} do not match")
        if len(lbls) and (lbls.min() < 0 or lbls.max() >= 10):
            raise DataError(f"{root}: {which} labels must be 0..9")
    # validation: a fixed, seeded sixth of the training file (10,000 of MNIST's 60,000)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_val = max(1, len(x) // 6)
    val, train = perm[:n_val], perm[n_val:]
    return _arrays(name, LABELS[name], spec, (x[train], y[train]), (x[val], y[val]), (xt, yt))


# --- CIFAR-10 -------------------------------------------------------------------------------

def _cifar10(root: Path, spec: ModelSpec) -> DataSplits:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    batches = sorted(root.glob("data_batch_*"))
    if not batches or not (root / "test_batch").is_file():
        raise DataError(f"{root}: expected data_batch_1..5 and test_batch (CIFAR-10 python version)")
    parts = [cifar_batch(p) for p in batches]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xt, yt = cifar_batch(root / "test_batch")
    labels = LABELS["cifar10"]
    if (root / "batches.meta").is_file():
        meta = unpickle(root / "batches.meta")
        names = meta.get("label_names")
        if names:
            labels = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if max(y.max(), yt.max()) >= len(labels):
        raise DataError(f"{root}: a label is out of range for {len(labels)} classes")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_val = max(1, len(x) // 10)
    val, train = perm[:n_val], perm[n_val:]
    return _arrays("cifar10", labels, spec, (x[train], y[train]), (x[val], y[val]), (xt, yt))


# --- image folder ---------------------------------------------------------------------------

class FolderDataset(Dataset):
    """Image files with class indices, decoded on access through ``cnnserve.core.preprocess``."""

    def __init__(self, items: list[tuple[Path, int]], spec: ModelSpec):
        self.items, self.spec = items, spec

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, target = self.items[i]
        try:
            return torch.from_numpy(load_file(path, self.spec)), target
        except ImageError as e:
            raise DataError(str(e)) from None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, labels: list[str]) -> list[tuple[Path, int]]:
    items = []
    for i, label in enumerate(labels):
        folder = root / label
        if folder.is_dir():
            items += [(p, i) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return items


def _folder(root: Path, spec: ModelSpec) -> DataSplits:
    has_splits = (root / "train").is_dir()
    train_root = root / "train" if has_splits else root
    labels = [p.name for p in _class_dirs(train_root)]
    if not labels:
        raise DataError(f"{train_root}: no class folders (expected one sub-folder of images per class)")
    items = _scan(train_root, labels)
    if not items:
        raise DataError(f"{train_root}: no images in its class folders (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    sets = {}
    for split in ("val", "test"):
        if has_splits and (root / split).is_dir():
            extra = sorted({p.name for p in _class_dirs(root / split)} - set(labels))
            if extra:
                raise DataError(f"{root / split}: classes {extra} do not exist in {train_root}")
            sets[split] = _scan(root / split, labels)
    missing = [s for s in ("val", "test") if s not in sets]
    if missing:  # split what is missing off the training images, fixed and stratified
        targets = np.array([t for _, t in items])
        pick = lambda idx: [items[i] for i in idx]  # noqa: E731
        if len(missing) == 2:
            tr, va, te = _split(len(items), (0.7, 0.15), targets)
            sets["val"], sets["test"] = pick(va), pick(te)
        else:
            tr, a, b = _split(len(items), (0.85, 0.075), targets)
            sets[missing[0]] = pick(np.concatenate([a, b]))
        items = pick(tr)
    train = FolderDataset(items, spec)
    # normalisation statistics from a fixed sample of up to 512 training images
    sample = np.random.default_rng(SPLIT_SEED).permutation(len(train))[:512]
    mean, std = _stats(np.stack([train[i][0].numpy() for i in sample]))
    return DataSplits("folder", tuple(labels), train, FolderDataset(sets["val"], spec),
                      FolderDataset(sets["test"], spec), mean, std)


# --- shapes ---------------------------------------------------------------------------------

def render_shape(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB picture of a shape of ``kind``, random colour, place, size and rotation, on noise."""
    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 24, (size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    fg = tuple(int(c) for c in (bg + rng.choice([-1, 1], 3) * rng.integers(90, 160, 3)) % 256)
    r = rng.uniform(0.18, 0.34) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    angle = rng.uniform(0, 2 * np.pi)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        draw.regular_polygon((cx, cy, r), 4, rotation=np.degrees(angle), fill=fg)
    elif kind == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=np.degrees(angle), fill=fg)
    else:  # cross: two bars
        w = max(2, int(r / 3))
        for a in (angle, angle + np.pi / 2):
            dx, dy = r * np.cos(a), r * np.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=w)
    return img


def _shapes(spec: ModelSpec, per_class: int) -> DataSplits:
    labels = LABELS["shapes"]
    rng = np.random.default_rng(SPLIT_SEED)
    images = np.empty((per_class * len(labels), *spec.input_shape), np.uint8)
    targets = np.repeat(np.arange(len(labels)), per_class)
    for i, t in enumerate(targets):
        images[i] = to_array(render_shape(labels[t], rng), spec)
    tr, va, te = _split(len(images), (0.7, 0.15), targets)
    mean, std = _stats(images[tr])
    ds = [TensorDataset(torch.from_numpy(images[i]), torch.from_numpy(targets[i])) for i in (tr, va, te)]
    return DataSplits("shapes", labels, *ds, mean, std)


def save_png(array: np.ndarray) -> bytes:
    """A uint8 C x H x W array as PNG bytes (for tests, examples and sample images)."""
    a = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, "PNG")
    return buf.getvalue()
