"""Exported ONNX files into BentoML's model store (respects BENTOML_HOME).

Each stored model holds ``model.onnx`` and shows the spec, labels, metrics and
precision in its metadata (``bentoml models get NAME:latest``). The service loads
models from the store by tag.

Verified variants are stored with their parent, not as models of their own: storing
``NAME.onnx`` (fp32) also stores ``NAME.fp16.onnx`` and ``NAME.int8.onnx`` from beside it as
``model.fp16.onnx`` and ``model.int8.onnx``, when they were made from the same weights. One tag
then names one model, and the service's ``precision`` setting picks which variant runs where
(``auto``: the fastest on the machine). A variant file stored on its own is a model of its own
(NAME-fp16), as before.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import onnx

from cnnserve.core.onnxmeta import MODEL_FILE, ModelInfo, variant_file, variant_files
from cnnserve.core.servable import NotServable, check_model
from cnnserve.core.spec import SpecError


class StoreError(ValueError):
    """A model that cannot be stored; the message names the file."""


def read_info(path: str | os.PathLike) -> ModelInfo:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base
        raise StoreError(f"{path}: not an ONNX file: {e}") from None
    try:
        return ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
    except SpecError as e:
        raise StoreError(str(e)) from None


def default_name(info: ModelInfo) -> str:
    name = f"{info.spec.arch}-{info.data}" if info.data else info.spec.arch
    if info.precision != "fp32":
        name += f"-{info.precision}"
    return re.sub(r"[^a-z0-9_.-]", "-", name.lower())


def variants(path: str | os.PathLike, info: ModelInfo | None = None) -> dict[str, Path]:
    """The verified variants beside an fp32 file (NAME.fp16.onnx, NAME.int8.onnx) made from its weights."""
    path = Path(path)
    info = info or read_info(path)
    found = {}
    if info.precision != "fp32":
        return found
    for precision, v in variant_files(path, "fp32").items():
        if precision == "fp32":
            continue
        v = Path(v)
        other = read_info(v)
        if other.precision != precision or not info.same_weights(other):
            raise StoreError(f"{v}: not a {precision} variant of {path} (made from other weights or another spec); "
                             f"export them again together, or remove it")
        found[precision] = v
    return found


def check_servable(path: str | os.PathLike) -> None:
    """Refuse a file a server could never run (``cnnserve.core.servable``), and one whose weights live in
    other files: the store keeps one file per precision, and an export is self-contained."""
    proto = onnx.load_model(str(path), load_external_data=False)
    external = sorted({e.value for t in _tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    if external:
        raise StoreError(f"{path}: its weights are in other files ({', '.join(external)[:200]}); a stored model is "
                         "one self-contained file: export it again, or `cnnserve import` a foreign model")
    try:
        check_model(path)
    except NotServable as e:
        raise StoreError(str(e)) from None


def _tensors(proto):
    """Every tensor of a model: initializers and node attributes, in subgraphs too."""
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)


def store_model(path: str | os.PathLike, name: str | None = None, reuse: bool = False):
    """Save one exported ONNX file, with its variants, under ``name`` (default ARCH-DATA[-fp16]) with an
    automatic version, once each has passed ``check_servable``. ``reuse``: when the newest stored version of
    ``name`` holds the very same files, return it instead of storing them again (``.reused`` is then True)."""
    import bentoml

    info = read_info(path)
    extra = variants(path, info)
    for f in (path, *extra.values()):
        check_servable(f)
    name = name or default_name(info)
    if reuse:
        same = _same_as_newest(name, path, extra)
        if same is not None:
            same.reused = True
            return same
    with bentoml.models.create(
        name,
        module="cnnserve",
        labels={"arch": info.spec.arch, "precision": info.precision, "data": info.data or "none",
                "variants": " ".join(extra) or "none"},
        metadata=info.summary(),
    ) as model:
        shutil.copyfile(path, model.path_of(MODEL_FILE))
        for precision, v in extra.items():
            shutil.copyfile(v, model.path_of(variant_file(MODEL_FILE, precision)))
    return model


def _same_as_newest(name: str, path, extra: dict):
    """The newest stored version of ``name`` when its files are byte for byte ``path`` and its variants ``extra``
    (and no others), else None."""
    import filecmp

    import bentoml

    try:
        newest = bentoml.models.get(f"{name}:latest")
    except (bentoml.exceptions.BentoMLException, ValueError):
        return None
    if newest.info.module != "cnnserve":
        return None
    stored = {p.name for p in Path(newest.path).glob("model*.onnx")}
    wanted = {MODEL_FILE: path, **{variant_file(MODEL_FILE, precision): v for precision, v in extra.items()}}
    if stored != set(wanted) or not all(filecmp.cmp(newest.path_of(f), src, shallow=False)
                                        for f, src in wanted.items()):
        return None
    return newest

