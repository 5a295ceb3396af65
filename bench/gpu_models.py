"""The GPU mode's models (``bench/gpu.py``): ResNets traced without their weights where torch and the exporter
are, given weights by rule on the GPU machine; fp16 variants; real images rendered by the bundled data's
generator. A call to the GPU machine carries 64 MiB and ResNet-50's fp32 file is 98 MB, while a graph without
its weights is tens of kB; throughput does not depend on the weights' values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cnnserve.core import onnxmeta


def prepare(arch: str, size: int, folder: Path) -> Path:
    """``arch`` at ``size`` px (1,000 classes) traced to ONNX with the project's exporter and metadata, its
    weights left out: ``folder/ARCH-SIZE.skeleton.onnx`` (tens of kB). Needs torch and the exporter."""
    import tempfile

    import onnx

    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.export.files import set_metadata
    from cnnserve.export.trace import to_onnx
    from cnnserve.models.registry import build_classifier, spec_for

    spec = spec_for(arch, [f"class{i}" for i in range(1000)], size=size)
    info = ModelInfo(spec=spec, origin={"kind": "benchmark", "weights": "made by rule (bench/gpu.py)"})
    proto = to_onnx(build_classifier(spec).eval(), info)
    set_metadata(proto, info)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{arch}-{size}.skeleton.onnx"
    with tempfile.TemporaryDirectory() as tmp:  # the weights go to a file of their own, left behind
        onnx.save_model(proto, str(Path(tmp) / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=1024)
        out.write_bytes((Path(tmp) / out.name).read_bytes())
    return out


def materialise(skeleton: Path, folder: Path) -> Path:
    """The skeleton's weights made by rule (batch norms the identity where the exporter left any, convolutions
    and linear layers Kaiming-normal, other vectors zero; seeded), saved as ``folder/model.onnx`` (fp32) and ``model.fp16.onnx``
    beside it; returns the fp32 path."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(skeleton), load_external_data=False)
    norm = {n.input[i]: v for n in proto.graph.node if n.op_type == "BatchNormalization"
            for i, v in ((1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0))}
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        dims, dtype = tuple(init.dims), onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if init.name in norm:
            value = np.full(dims, norm[init.name], dtype)
        elif len(dims) <= 1:
            value = np.zeros(dims, dtype)
        else:
            value = rng.normal(0, math.sqrt(2 / math.prod(dims[1:])), dims).astype(dtype)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / onnxmeta.MODEL_FILE
    onnx.save_model(proto, str(fp32))
    with_fp16(fp32, overwrite=True)
    return fp32


def with_fp16(fp32: Path, folder: Path | None = None, overwrite: bool = False) -> Path:
    """An fp32 export's fp16 variant: the export's own beside it unless ``overwrite``, else made by the
    exporter's converter (the fp32 file's metadata, its precision fp16) into ``folder``, default beside it.
    A file this mode did not make gets ``folder``: a variant written beside a user's export would be taken
    for one the export checked (``cnnserve store`` ships the variants beside the file)."""
    from dataclasses import replace

    import onnx

    from cnnserve.core.onnxmeta import ModelInfo
    from cnnserve.export.files import set_metadata
    from cnnserve.export.trace import to_fp16

    path = Path(onnxmeta.variant_file(str(fp32), "fp16"))
    if not overwrite and path.is_file():
        return path
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / path.name
    proto = onnx.load(str(fp32))
    half = to_fp16(proto)
    info = ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props}, str(fp32))
    set_metadata(half, replace(info, precision="fp16"))
    onnx.save_model(half, str(path))
    return path


def shapes(n: int, size: int, seed: int = 0) -> list:
    """``n`` rendered shapes (the bundled data's generator) as Pillow images of ``size`` px."""
    from cnnserve.models.data import LABELS, render_shape

    rng = np.random.default_rng(seed)
    return [render_shape(LABELS["shapes"][i % 4], rng, size=size) for i in range(n)]
