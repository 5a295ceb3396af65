"""Any ONNX classifier into cnnserve: ``cnnserve import model.onnx --mean ... --std ... --labels ...``.

The foreign graph takes float pixels already normalised (as most exports do: the preprocessing
lives in the training script). The importer composes, in ONNX, the project's contract around it:

    pixels (uint8 N x C x H x W) -> Cast -> (x / 255 - mean) / std [-> NHWC] -> the model
        -> logits and probabilities (Softmax added when the model gives logits; Log when it gives
           probabilities)

writes the metadata (spec, labels, origin), and verifies the composed graph against the original
fed with the same preprocessing computed in numpy, on real images decoded by the project's own
preprocessing (max difference <= 1e-4; batches of several images, so a graph whose operations fix the
batch, a ``Reshape`` to ``[1, ...]``, is caught; one that only declares a batch of 1 but computes per image runs
and is kept). Nothing is retrained. Problems are one-line ``ImportError_`` messages.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import ModelInfo
from cnnserve.core.spec import ModelSpec, SpecError

from .cam import add_cam_outputs
from .files import save_verified, set_metadata, unique_opsets, versions
from .store import StoreError, read_info
from .verify import compare, format_report

PREFIX = "imported/"


class ModelImportError(ValueError):
    """An ONNX file that cannot be imported; the message names the file and the problem."""


def _dims(value_info) -> list:
    """Each dimension: an int when fixed, else None."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value_info.type.tensor_type.shape.dim]


def _check(model: onnx.ModelProto, name: str, layout: str, size: tuple[int, int] | None, channels: int,
           labels: list[str]) -> tuple[str, str, int, int]:
    """(input name, output name, height, width), after the checks that the graph is one image classifier:
one float32 4-D input of the given channels and size, one [batch, classes] output with a label per class."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelImportError(f"{name}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                               "an image classifier takes one")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise ModelImportError(f"{name}: input {inp.name!r} is {kind}; a float32 input is expected")
    dims = _dims(inp)
    if len(dims) != 4:
        raise ModelImportError(f"{name}: input {inp.name!r} is {len(dims)}-D; a 4-D image batch is expected")
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    if c is not None and c != channels:
        raise ModelImportError(f"{name}: input {inp.name!r} has {c} channels in {layout} but --mean/--std give "
                               f"{channels} (is it {'nhwc' if layout == 'nchw' else 'nchw'}? pass --layout)")
    if size is None:
        if h is None or w is None:
            raise ModelImportError(f"{name}: input {inp.name!r} has a dynamic height or width; give --size HxW")
        size = (h, w)
    elif (h is not None and h != size[0]) or (w is not None and w != size[1]):
        raise ModelImportError(f"{name}: --size {size[0]}x{size[1]} but the input is fixed at {h}x{w}")
    if len(graph.output) < 1:
        raise ModelImportError(f"{name}: the graph has no output")
    out = graph.output[0]
    odims = _dims(out)
    if len(odims) != 2 or odims[1] is None:
        shape = "x".join("?" if d is None else str(d) for d in odims)
        raise ModelImportError(f"{name}: output {out.name!r} has shape [{shape}], not a class vector "
                               "[batch, classes]")
    if odims[1] != len(labels):
        raise ModelImportError(f"{name}: {len(labels)} labels for an output of {odims[1]} classes")
    return inp.name, out.name, size[0], size[1]


def _free_batch(model: onnx.ModelProto, input_name: str, output_name: str) -> None:
    """Make the batch dimension of the input and output symbolic (many exports fix it at 1)."""
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in (input_name, output_name):
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"


def _wrap(model: onnx.ModelProto, input_name: str, output_name: str, spec: ModelSpec, layout: str,
          outputs: str) -> onnx.ModelProto:
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    c = spec.channels
    scale = (1.0 / (255.0 * np.array(spec.std, np.float32))).reshape(1, c, 1, 1)
    shift = (np.array(spec.mean, np.float32) / np.array(spec.std, np.float32)).reshape(1, c, 1, 1)
    nodes = [helper.make_node("Cast", [onnxmeta.INPUT], ["pre_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pre_float", "pre_scale"], ["pre_scaled"]),
             helper.make_node("Sub", ["pre_scaled", "pre_shift"], ["pre_nchw" if layout == "nhwc" else "pre_out"])]
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["pre_nchw"], ["pre_out"], perm=[0, 2, 3, 1]))
    h, w = spec.height, spec.width
    pre = helper.make_graph(
        nodes, "cnnserve_preprocess",
        [helper.make_tensor_value_info(onnxmeta.INPUT, TensorProto.UINT8, ["batch", c, h, w])],
        [helper.make_tensor_value_info("pre_out", TensorProto.FLOAT,
                                       ["batch", c, h, w] if layout == "nchw" else ["batch", h, w, c])],
        [numpy_helper.from_array(scale, "pre_scale"), numpy_helper.from_array(shift, "pre_shift")])
    k = spec.num_classes
    if outputs == onnxmeta.LOGITS:
        post_nodes = [helper.make_node("Identity", ["post_in"], [onnxmeta.LOGITS]),
                      helper.make_node("Softmax", ["post_in"], [onnxmeta.PROBABILITIES], axis=1)]
        inits = []
    else:  # probabilities: logits = log(p), whose softmax is p again
        post_nodes = [helper.make_node("Identity", ["post_in"], [onnxmeta.PROBABILITIES]),
                      helper.make_node("Max", ["post_in", "post_tiny"], ["post_clipped"]),
                      helper.make_node("Log", ["post_clipped"], [onnxmeta.LOGITS])]
        inits = [numpy_helper.from_array(np.array(1e-30, np.float32), "post_tiny")]
    post = helper.make_graph(
        post_nodes, "cnnserve_outputs", [helper.make_tensor_value_info("post_in", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", k]) for o in onnxmeta.OUTPUTS], inits)

    def as_model(graph):
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version)

    inner = compose.add_prefix(model, PREFIX)
    merged = compose.merge_models(as_model(pre), inner, io_map=[("pre_out", PREFIX + input_name)])
    merged = compose.merge_models(merged, as_model(post), io_map=[(PREFIX + output_name, "post_in")],
                                  outputs=list(onnxmeta.OUTPUTS))
    merged.graph.name = "cnnserve_imported"
    unique_opsets(merged)
    return merged


def _imported_from(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a cnnserve import of the file whose sha256 is ``sha256``."""
    try:
        origin = read_info(path).origin
    except (StoreError, SpecError):
        return False
    return origin.get("kind") == "imported" and origin.get("sha256") == sha256


def sample_images(spec: ModelSpec, folder: str | os.PathLike | None = None, n: int = 24) -> np.ndarray:
    """Real images through the project's preprocessing: the files of ``folder`` (sorted, at most
    ``n``), else pictures of shapes drawn with Pillow and PNG-encoded, as the service would get them."""
    from cnnserve.core.preprocess import load_folder, preprocess

    if folder is not None:
        try:
            return load_folder(folder, spec, n)
        except ValueError as e:
            raise ModelImportError(f"{e}: none to verify with") from None
    from cnnserve.models.data import LABELS, render_shape

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        render_shape(LABELS["shapes"][i % 4], rng, size=max(64, spec.height)).save(buf, "PNG")
        out.append(preprocess(buf.getvalue(), spec))
    return np.stack(out)


def numpy_preprocess(pixels: np.ndarray, spec: ModelSpec, layout: str) -> np.ndarray:
    """What the foreign model expects, computed without the graph: (x / 255 - mean) / std."""
    c = spec.channels
    x = (pixels.astype(np.float32) / 255.0 - np.array(spec.mean, np.float32).reshape(1, c, 1, 1)) \
        / np.array(spec.std, np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "nhwc" else x


def import_onnx(path: str | os.PathLike, *, mean, std, labels: list[str], size: tuple[int, int] | None = None,
                layout: str = "nchw", outputs: str = onnxmeta.LOGITS, resize: str = "center-crop",
                crop_pct: float = 0.875, interpolation: str = "bilinear", out: str | os.PathLike | None = None,
                images: str | os.PathLike | None = None, overwrite: bool = False, log=print) -> dict:
    """Wrap, verify and write; returns {"path", "report_path", "report", "info"} like an export. An existing
    ``out`` is replaced only when it is an earlier import of the same file, or with ``overwrite``."""
    import onnxruntime as ort

    from cnnserve.models.checkpoint import file_sha256

    path = Path(path)
    if layout not in ("nchw", "nhwc"):
        raise ModelImportError(f"--layout must be nchw or nhwc, not {layout!r}")
    if outputs not in onnxmeta.OUTPUTS:
        raise ModelImportError(f"--outputs must be {' or '.join(onnxmeta.OUTPUTS)}, not {outputs!r}")
    try:
        model = onnx.load_model(str(path))
    except FileNotFoundError:
        raise ModelImportError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - protobuf errors have no common base
        raise ModelImportError(f"{path}: not an ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(onnxmeta.KEY_FORMAT) == onnxmeta.FORMAT:
        raise ModelImportError(f"{path}: already a cnnserve export; store it with `cnnserve store`")
    input_name, output_name, h, w = _check(model, str(path), layout, size, len(mean), labels)
    stem = path.name.removesuffix(".onnx")
    out = Path(out) if out else Path("runs") / f"imported-{stem}" / onnxmeta.MODEL_FILE
    if out.exists() and not overwrite and not _imported_from(out, file_sha256(path)):
        raise ModelImportError(f"{out} exists and is not an earlier import of {path}: imports never replace it "
                               "silently; --out another file, or --overwrite to replace it")
    try:
        spec = ModelSpec(arch=f"onnx:{stem}", channels=len(mean), height=h, width=w, mean=mean, std=std,
                         resize=resize, crop_pct=crop_pct, labels=labels, interpolation=interpolation)
    except SpecError as e:
        raise ModelImportError(f"{path}: {e}") from None
    original = onnx.load_model(str(path))  # untouched, for the reference run
    _free_batch(model, input_name, output_name)
    try:
        wrapped = _wrap(model, input_name, output_name, spec, layout, outputs)
        cam = add_cam_outputs(wrapped)  # a GAP + linear head: the outputs /classify/explain?method=cam reads
        onnx.checker.check_model(wrapped, full_check=True)
    except Exception as e:  # noqa: BLE001 - composition failures come from onnx with many types
        raise ModelImportError(f"{path}: the graph could not be wrapped ({type(e).__name__}: {str(e)[:300]})") from None
    info = ModelInfo(spec=spec, precision="fp32", versions=versions(),
                     origin={"kind": "imported", "file": path.name, "sha256": file_sha256(path), "layout": layout,
                             "outputs": outputs, "input": input_name, "output": output_name})
    set_metadata(wrapped, info)

    # -- verify: the wrapped graph on uint8 pixels (batches of 8) against the original on the same
    # pixels normalised in numpy (in batches of its own fixed size, if it has one)
    pixels = sample_images(spec, images)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures become one-line errors below, not log lines
    blob = wrapped.SerializeToString()
    try:
        ref = ort.InferenceSession(original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's load errors have several types
        raise ModelImportError(f"{path}: onnxruntime cannot load it ({str(e)[:300]})") from None
    step = _dims(next(i for i in original.graph.input if i.name == input_name))[0] or len(pixels)
    want = outputs  # the contract's output that holds what the original gives
    t0 = time.time()
    expect = np.concatenate([ref.run([output_name], {input_name: numpy_preprocess(pixels[i:i + step], spec, layout)})[0]
                             for i in range(0, len(pixels), step)])
    try:
        answer = np.concatenate([got.run([want], {onnxmeta.INPUT: pixels[i:i + 8]})[0]
                                 for i in range(0, len(pixels), 8)])
    except Exception as e:  # noqa: BLE001
        raise ModelImportError(f"{path}: the wrapped graph fails on a batch of 8 images ({str(e)[:200]}); "
                               "export the model with a dynamic batch axis") from None
    # the export's fp32 gate (export/verify.py), with the original model as the reference
    report = compare(answer, expect, None, "fp32", "CPUExecutionProvider")
    report.update(images=str(images) if images else "shapes drawn with Pillow, sent as PNG", compared=want,
                  seconds=round(time.time() - t0, 2), source=str(path), origin=info.origin, spec=spec.to_dict(),
                  cam=cam)
    log(format_report(report).replace("verify fp32", f"verify the wrapped graph ({want})", 1)
        + ("; class activation maps available (global average pooling + linear head found)" if cam else ""))
    report_path = save_verified(wrapped, out, report, "the wrapped graph differs from the original: "
                                + "; ".join(report["failures"]), len(blob), log, ModelImportError)
    return {"path": out, "report_path": report_path, "report": report, "info": info}

