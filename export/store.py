"""Exported ONNX files into BentoML's model store (respects BENTOML_HOME).

Each stored model holds ``model.onnx`` and shows the spec, labels, metrics and
precision in its metadata (``bentoml models get NAME:latest``). The service loads
models from the store by tag.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import onnx

from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.core.spec import SpecError

MODEL_FILE = "model.onnx"


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


def store_model(path: str | os.PathLike, name: str | None = None):
    """Save one exported ONNX file under ``name`` (default ARCH-DATA[-fp16]) with an automatic version."""
    import bentoml

    info = read_info(path)
    name = name or default_name(info)
    with bentoml.models.create(
        name,
        module="cnnserve",
        labels={"arch": info.spec.arch, "precision": info.precision, "data": info.data or "none"},
        metadata=info.summary(),
    ) as model:
        shutil.copyfile(path, model.path_of(MODEL_FILE))
    return model
