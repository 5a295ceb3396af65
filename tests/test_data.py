"""Data sets from real files that the tests write in each format."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from cnnserve.models import spec_for
from cnnserve.models.data import DataError, load_dataset, read_idx
from tests.conftest import encode

GREY28 = spec_for("lenet5", ())
RGB32 = spec_for("resnet18", (), channels=3, size=32)


def write_idx(path, array, gz=False):
    code = {np.uint8: 0x08}[array.dtype.type]
    raw = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_mnist(root, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8), gz)
    return root


def test_digits_split_is_fixed_and_stratified():
    a = load_dataset("digits", GREY28)
    b = load_dataset("digits", GREY28)
    assert (len(a.train), len(a.val), len(a.test)) == (1078, 359, 360)
    assert a.labels == tuple("0123456789")
    x, y = a.test[0]
    assert x.shape == (1, 28, 28) and str(x.dtype) == "torch.uint8" and int(x.max()) > 200
    assert all((a.test[i][0] == b.test[i][0]).all() for i in range(0, 360, 37))  # same images held out
    test_counts = np.bincount([int(a.test[i][1]) for i in range(len(a.test))], minlength=10)
    assert test_counts.min() >= 34  # every class in the test split, in proportion


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_data_sets(tmp_path, name, gz):
    make_mnist(tmp_path / "raw", gz=gz)  # the torchvision layout (DIR/raw) is found too
    d = load_dataset(name, GREY28, tmp_path)
    assert (len(d.train), len(d.val), len(d.test)) == (50, 10, 20)
    assert len(d.labels) == 10 and (name == "mnist") == (d.labels[0] == "0")
    up = load_dataset(name, spec_for("lenet5_classic", ()), tmp_path)  # resized to 32 by the spec
    assert up.train[0][0].shape == (1, 32, 32)


def test_idx_errors_name_the_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 20) + b"\x01" * 5))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: IDX data has 5 bytes"):
        load_dataset("mnist", GREY28, tmp_path)
    bad.write_bytes(b"garbage!")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    bad.unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_dataset("mnist", GREY28, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", GREY28, tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("mnist", GREY28)


def write_cifar(root, n=30):
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)],
                 b"batch_label": name.encode()}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def test_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", RGB32, tmp_path)
    assert (len(d.train), len(d.val), len(d.test)) == (135, 15, 30)
    assert d.labels[:2] == ("plane", "car")
    assert d.train[0][0].shape == (3, 32, 32)
    grey = load_dataset("cifar10", spec_for("lenet5", ()), tmp_path)  # RGB to grey, 32 to 28
    assert grey.test[0][0].shape == (1, 28, 28)


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_cifar_loader_refuses_foreign_objects(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch: refusing to load"):
        load_dataset("cifar10", RGB32, tmp_path)


def make_folder(root, classes=("cat", "dog"), per_class=12, size=(40, 30)):
    rng = np.random.default_rng(3)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            if i % 3 == 0:  # grey PNG
                (root / c / f"{i}.png").write_bytes(encode(rng.integers(0, 256, size[::-1], dtype=np.uint8)))
            else:  # RGB JPEG of another size
                img = rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)
                (root / c / f"{i}.jpg").write_bytes(encode(img, "JPEG"))
    return root


def test_folder_any_sizes_and_modes(tmp_path):
    make_folder(tmp_path / "imgs")
    d = load_dataset("folder", RGB32, tmp_path / "imgs")
    assert d.labels == ("cat", "dog")
    assert len(d.train) + len(d.val) + len(d.test) == 24
    shapes = {tuple(d.train[i][0].shape) for i in range(len(d.train))}
    assert shapes == {(3, 32, 32)}


def test_folder_with_split_subfolders(tmp_path):
    for split in ("train", "val", "test"):
        make_folder(tmp_path / split, per_class=6)
    d = load_dataset("folder", RGB32, tmp_path)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 12, 12)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("folder", RGB32, tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset("folder", RGB32, tmp_path)
    make_folder(tmp_path / "ok")
    bad = tmp_path / "ok" / "cat" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    d = load_dataset("folder", RGB32, tmp_path / "ok")
    everything = [*d.train.items, *d.val.items, *d.test.items]
    split = next(s for s in (d.train, d.val, d.test) if any(p == bad for p, _ in s.items))
    index = [p for p, _ in split.items].index(bad)
    with pytest.raises(DataError, match=f"{bad}"):
        split[index]
    assert len(everything) == 24


def test_shapes_are_seeded_rgb():
    a = load_dataset("shapes", spec_for("resnet18", (), channels=3, size=32), shapes_per_class=20)
    b = load_dataset("shapes", spec_for("resnet18", (), channels=3, size=32), shapes_per_class=20)
    assert a.labels == ("circle", "square", "triangle", "cross")
    assert len(a.train) + len(a.val) + len(a.test) == 80
    assert (a.train[5][0] == b.train[5][0]).all()
    assert a.train[0][0].shape == (3, 32, 32) and len(a.mean) == 3


def test_unknown_data_set():
    with pytest.raises(DataError, match="valid names: digits, mnist"):
        load_dataset("imagenet", GREY28)
