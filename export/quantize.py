"""INT8: a verified, statically quantized variant of an exported model, for CPU serving.

onnxruntime's static quantization (QDQ format, per-channel weights) is calibrated on images
from the model's own training split (or a folder, for imported models). The calibration
method is measured, not assumed: with ``method="auto"`` each of ``AUTO_METHODS`` quantizes the
model and the one whose top-1 agrees best with fp32 on held-out selection images (training
images not used for calibration, never the test split) is kept. The result is then verified
like fp32 and fp16 (``verify.compare``): top-1 agreement with fp32 onnxruntime at least 99% and
accuracy within 1 point, on the test split; otherwise the report is written and no model.

The integer formats follow onnxruntime's guidance for CPUs: ``u8s8-reduce`` (uint8 activations,
7-bit int8 weights) where x86 has no VNNI, ``u8s8`` where it has, ``s8s8`` on ARM.
By default each of ``format_candidates()`` (u8s8-reduce and u8u8 on x86 without VNNI) is tried with
each method and the best on the selection images is kept; ``--int8-format`` forces one.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from cnnserve.core.onnxmeta import INPUT, LOGITS

FORMATS = {
    # name: (activation type, weight type, reduce_range)
    "s8s8": ("QInt8", "QInt8", False),
    "u8s8": ("QUInt8", "QInt8", False),
    "u8s8-reduce": ("QUInt8", "QInt8", True),
    "u8u8": ("QUInt8", "QUInt8", False),
}
METHODS = ("minmax", "percentile", "entropy")
AUTO_METHODS = ("minmax", "percentile")  # entropy keeps every activation of every image: opt-in
CALIBRATION_BATCH = 16


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this x86 CPU has fast int8 dot products (AVX-512 VNNI or AVX-VNNI)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_format() -> str:
    """onnxruntime's advice for this CPU (``quantize_static``'s docstring): see the module docstring."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "s8s8"
    return "u8s8" if has_vnni() else "u8s8-reduce"


def format_candidates() -> tuple[str, ...]:
    """The formats worth trying on this CPU: its advised one, and on x86 without VNNI also u8u8 (the
    other choice onnxruntime's guide gives for such CPUs against int8 saturation)."""
    fmt = cpu_format()
    return (fmt, "u8u8") if fmt == "u8s8-reduce" else (fmt,)


class _Reader:
    """Calibration batches of uint8 images as onnxruntime's CalibrationDataReader wants them."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.images, self.batch, self.at = images, batch, 0

    def get_next(self):
        if self.at >= len(self.images):
            return None
        b = self.images[self.at:self.at + self.batch]
        self.at += self.batch
        return {INPUT: b}

    def rewind(self) -> None:
        self.at = 0


def quantize(fp32: onnx.ModelProto, calibration: np.ndarray, method: str = "minmax",
             fmt: str = "u8s8-reduce") -> onnx.ModelProto:
    """One static quantization of ``fp32`` (uint8 images N x C x H x W for calibration). The final
    Softmax stays in float (probabilities from int8 would be coarse steps)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in FORMATS:
        raise ValueError(f"int8 format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)} or auto, got {method!r}")
    act, weight, reduce_range = FORMATS[fmt]
    domains = [o.domain or "ai.onnx" for o in fp32.opset_import]
    if len(domains) != len(set(domains)):  # files imported before the importer made one opset per domain
        from .files import unique_opsets

        fp32 = onnx.ModelProto.FromString(fp32.SerializeToString())
        unique_opsets(fp32)
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration)
    from .files import quiet

    with tempfile.TemporaryDirectory(prefix="cnnserve-int8-") as tmp, quiet():
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(fp32, str(pre))
        proto = onnx.load_model(str(pre))
        softmax = [n.name for n in proto.graph.node if n.op_type == "Softmax"]
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=getattr(QuantType, act),
                        weight_type=getattr(QuantType, weight), nodes_to_exclude=softmax,
                        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method])
        return onnx.load_model(str(out))


def ops_in_float(proto: onnx.ModelProto) -> dict[str, int]:
    """Computing nodes left in float (by op type, with counts). A node runs in int8 when onnxruntime
    can fuse it with its QDQ pairs: an input from a DequantizeLinear and an output into a
    QuantizeLinear. Casts, shapes and the graph's own plumbing are left out."""
    dq_outputs = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    plumbing = {"QuantizeLinear", "DequantizeLinear", "Cast", "Shape", "Reshape", "Flatten", "Constant",
                "Unsqueeze", "Squeeze", "Concat", "Gather", "Identity", "Transpose"}
    return dict(Counter(n.op_type for n in proto.graph.node if n.op_type not in plumbing
                        and not (any(i in dq_outputs for i in n.input) and any(o in q_inputs for o in n.output))))


def logits(proto_or_bytes, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort

    from .verify import run_batches

    blob = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return run_batches(lambda b: sess.run([LOGITS], {INPUT: b})[0], images, batch)


def quantize_verified(fp32: onnx.ModelProto, calibration: np.ndarray, selection: np.ndarray,
                      test: np.ndarray, targets: np.ndarray | None, *, method: str = "auto",
                      fmt: str | None = None, source: str = "", log=print) -> tuple[onnx.ModelProto, dict]:
    """The int8 model and its verification report (``report["passed"]`` gates the write)."""
    from .verify import compare

    formats = (fmt,) if fmt else format_candidates()
    methods = AUTO_METHODS if method == "auto" else (method,)
    fp32_blob = fp32.SerializeToString()
    choose = len(methods) * len(formats) > 1
    ref_select = logits(fp32_blob, selection) if choose else None
    tried, best = [], None
    for f in formats:
        for m in methods:
            t = time.perf_counter()
            q = quantize(fp32, calibration, m, f)
            row = {"format": f, "method": m, "seconds": round(time.perf_counter() - t, 2)}
            if choose:
                row["selection_top1_agreement"] = float((logits(q, selection).argmax(1) == ref_select.argmax(1)).mean())
            tried.append(row)
            log(f"int8 {f}, {m} calibration on {len(calibration)} images: {row['seconds']} s"
                + (f", top-1 agreement with fp32 on {len(selection)} selection images "
                   f"{row['selection_top1_agreement']:.2%}" if choose else ""))
            if best is None or row.get("selection_top1_agreement", 0) > best[1].get("selection_top1_agreement", 0):
                best = (q, row)
    q, chosen = best
    ref = logits(fp32_blob, test)
    report = compare(logits(q, test), ref, targets, "int8", "CPUExecutionProvider",
                     float((ref.argmax(1) == targets).mean()) if targets is not None and len(targets) else None)
    report.update(reference="fp32 onnxruntime (CPU)", format=chosen["format"], per_channel=True, quant_format="QDQ",
                  calibration={"source": source, "images": int(len(calibration)), "method": chosen["method"],
                               "method_requested": method, "selection_images": int(len(selection)),
                               "tried": tried},
                  ops_in_float=ops_in_float(q))
    return q, report
