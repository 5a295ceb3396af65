"""Class activation map outputs for networks whose head is global average pooling and one linear layer.

For such a network (ResNet, GoogLeNet, DenseNet, MobileNet) the logits are ``W @ mean(F) + b``,
with ``F`` the last feature maps (C x h x w), so the map of class k is ``sum_c W[k, c] F[c]``
(Zhou et al., 2016). ``add_cam_outputs`` finds that head in an exported graph and adds two outputs:
``features`` (N x C x h x w, a value the graph computes anyway) and ``cam_weights`` (the linear
layer's weights, classes x C, through an Identity). A server asks for them only when it explains
(``service/explain.py``); ``/classify`` requests neither. Networks without that head (LeNet-5,
AlexNet, VGG: flattened maps into fully connected layers) get no outputs, and the service says so.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from cnnserve.core.onnxmeta import CAM_WEIGHTS, FEATURES, LOGITS
_PASS = {"Reshape", "Flatten", "Squeeze", "Identity", "Dropout"}


def _global_pool_input(node: onnx.NodeProto, consts: dict) -> str | None:
    """The pooled tensor when ``node`` averages over every spatial position of an N x C x H x W value."""
    if node.op_type == "GlobalAveragePool":
        return node.input[0]
    if node.op_type == "ReduceMean":
        axes = None
        if len(node.input) > 1 and node.input[1] in consts:
            axes = [int(a) for a in consts[node.input[1]].ravel()]
        for a in node.attribute:
            if a.name == "axes":
                axes = list(a.ints)
        return node.input[0] if axes is not None and sorted(a % 4 for a in axes) == [2, 3] else None
    return None


def find_cam_head(proto: onnx.ModelProto, logits: str = LOGITS) -> tuple[str, str, bool] | None:
    """(feature tensor, weight initializer, whether it is stored classes x C) or None."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    linear = producers.get(logits)
    while linear is not None and linear.op_type == "Identity":  # an imported graph's logits output
        linear = producers.get(linear.input[0])
    if linear is not None and linear.op_type == "Add":  # MatMul + bias, as some exporters write a linear layer
        matmul = next((producers[i] for i in linear.input if i in producers and producers[i].op_type == "MatMul"), None)
        if matmul is None or not any(i in inits for i in linear.input) or matmul.input[1] not in inits:
            return None
        linear, attrs = matmul, {"transB": 0}
    elif linear is not None and linear.op_type == "Gemm" and linear.input[1] in inits:
        attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
    else:
        return None
    node = producers.get(linear.input[0])
    while node is not None and node.op_type in _PASS:
        node = producers.get(node.input[0])
    features = _global_pool_input(node, consts) if node is not None else None
    if features is None:
        return None
    return features, linear.input[1], bool(attrs.get("transB", 0))


def add_cam_outputs(proto: onnx.ModelProto) -> bool:
    """Add ``features`` and ``cam_weights`` outputs where the head allows (see the module docstring)."""
    head = find_cam_head(proto)
    if head is None or any(o.name in (FEATURES, CAM_WEIGHTS) for o in proto.graph.output):
        return False
    features, weight, trans_b = head
    g = proto.graph
    g.node.append(helper.make_node("Identity", [features], [FEATURES], name="cnnserve_cam_features"))
    if trans_b:  # Gemm stores W as classes x C
        g.node.append(helper.make_node("Identity", [weight], [CAM_WEIGHTS], name="cnnserve_cam_weights"))
    else:  # C x classes
        g.node.append(helper.make_node("Transpose", [weight], [CAM_WEIGHTS], perm=[1, 0], name="cnnserve_cam_weights"))
    w = next(t for t in g.initializer if t.name == weight)
    classes, channels = (w.dims[0], w.dims[1]) if trans_b else (w.dims[1], w.dims[0])
    g.output.append(helper.make_tensor_value_info(FEATURES, w.data_type, ["batch", channels, "h", "w"]))
    g.output.append(helper.make_tensor_value_info(CAM_WEIGHTS, w.data_type, [classes, channels]))
    return True
