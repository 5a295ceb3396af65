"""The standard files of the public data sets, read safely: IDX (MNIST, Fashion-MNIST; gzipped or not,
downloaded on request and checked against their published MD5 sums) and CIFAR-10's python-pickle batches
(an unpickler that accepts only what those files contain). ``data.py`` makes the splits from them.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import urllib.request
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the path and the problem."""


IDX_SOURCES = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not) as a numpy array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != want:
        raise DataError(f"{path}: IDX data has {len(raw) - header} bytes, its header promises {want}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def idx_file(root: Path, stem: str) -> Path:
    for folder in (root, root / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{root}: no {stem} or {stem}.gz (expected the standard IDX files; "
                    "--download fetches them)")


def download_idx(name: str, root: Path) -> None:
    base, files = IDX_SOURCES[name]
    root.mkdir(parents=True, exist_ok=True)
    for fname, md5 in files.items():
        dest = root / fname
        if dest.is_file() and hashlib.md5(dest.read_bytes()).hexdigest() == md5:
            continue
        print(f"downloading {base}{fname}")
        try:
            with urllib.request.urlopen(base + fname, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise DataError(f"{dest}: download from {base}{fname} failed: {e}") from None
        got = hashlib.md5(data).hexdigest()
        if got != md5:
            raise DataError(f"{dest}: downloaded file has MD5 {got}, expected {md5}")
        part = dest.with_suffix(dest.suffix + ".part")
        part.write_bytes(data)
        part.replace(dest)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = unpickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(d["data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(d["labels"]):
        raise DataError(f"{path}: CIFAR-10 data must be N x 3072 with N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d["labels"], np.int64)
