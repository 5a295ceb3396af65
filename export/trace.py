"""A classifier traced to ONNX, and the graph rewrites an export may add: fp16 and simplification.

The graph takes uint8 pixels (N x C x H x W, dynamic N) and normalises inside, so no client can disagree
about preprocessing; it returns logits and softmax probabilities (``cnnserve.core.onnxmeta``).
"""

from __future__ import annotations

import onnx
import torch
from torch import nn

from cnnserve.core import onnxmeta
from cnnserve.core.onnxmeta import DEFAULT_OPSET, ModelInfo
from cnnserve.models.registry import Classifier

from .cam import add_cam_outputs
from .files import quiet, set_metadata



class _WithProbabilities(nn.Module):
    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        logits = self.model(pixels)
        return logits, torch.softmax(logits, dim=1)


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = "batch"


def to_onnx(model: Classifier, info: ModelInfo, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace ``model`` with torch's dynamo exporter; the result is checked and self-contained."""
    spec = model.spec
    model = model.eval()
    example = torch.zeros(2, *spec.input_shape, dtype=torch.uint8)
    with quiet():
        program = torch.onnx.export(
            _WithProbabilities(model), (example,), dynamo=True, opset_version=opset,
            input_names=[onnxmeta.INPUT], output_names=list(onnxmeta.OUTPUTS),
            dynamic_shapes={onnxmeta.INPUT: {0: torch.export.Dim.DYNAMIC}}, verbose=False)
        proto = program.model_proto
    _name_batch_axis(proto)
    add_cam_outputs(proto)  # GAP + linear heads: the maps and weights class activation maps need
    set_metadata(proto, info)
    proto.producer_name, proto.producer_version = "cnnserve", info.versions.get("cnnserve", "")
    proto.doc_string = f"{spec.arch}: uint8 pixels {spec.channels}x{spec.height}x{spec.width} -> {spec.num_classes} classes"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and arithmetic; the uint8 input and float32 outputs stay as they are.

    Uses the converter that ships with onnxruntime. Everything runs in fp16, Softmax included (keeping
    it in fp32 made the converter emit an unsorted graph); outputs are cast back to fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        half = convert_float_to_float16(proto, keep_io_types=True)
    onnx.checker.check_model(half, full_check=True)
    return half


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Graph simplification by onnxslim (constant folding, fusion of redundant nodes)."""
    import onnxslim

    with quiet():
        slim = onnxslim.slim(proto)
    # onnxslim keeps metadata_props; re-check the result
    onnx.checker.check_model(slim, full_check=True)
    return slim
