"""Parity of an exported model with PyTorch eager, and the accuracy onnxruntime reaches.

fp32 must match PyTorch to 1e-4 in every logit, agree on every top-1 class, and reach
the checkpoint's test accuracy to 0.1 point. fp16 has looser, stated tolerances.
Export fails when verification fails.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from cnnserve.core.onnxmeta import INPUT, LOGITS
from cnnserve.core.runtime import ort_severity
from cnnserve.models.registry import Classifier

TOLERANCES = {
    "fp32": {"max_abs_logit_diff": 1e-4, "top1_agreement_min": 1.0, "accuracy_delta_max": 0.001},
    # fp16 logits differ in proportion to their size: the bound is relative to the largest |logit|
    "fp16": {"max_rel_logit_diff": 2e-2, "top1_agreement_min": 0.995, "accuracy_delta_max": 0.005},
    # int8 is compared with fp32 onnxruntime (export/quantize.py): agreement and accuracy, no logit bound
    "int8": {"top1_agreement_min": 0.99, "accuracy_delta_max": 0.01},
}


def session(model_bytes: bytes, precision: str) -> ort.InferenceSession:
    """fp32 parity runs on the CPU provider (the reference); fp16 on CUDA when it really loads, else CPU."""
    providers = ["CPUExecutionProvider"]
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    # onnxruntime-gpu lists CUDA even where its libraries are missing and logs an error while falling back
    # to CPU; the report names the provider that really ran (get_providers()). The level is restored after.
    with ort_severity(4 if len(providers) > 1 else None):
        return ort.InferenceSession(model_bytes, providers=providers)


def run_batches(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def verify(model_bytes: bytes, model: Classifier, images: np.ndarray, targets: np.ndarray | None = None,
           precision: str = "fp32", checkpoint_accuracy: float | None = None, batch_size: int = 128) -> dict:
    """Compare onnxruntime with PyTorch eager on ``images`` (uint8 N x C x H x W)."""
    sess = session(model_bytes, precision)
    model = model.eval()
    with torch.no_grad():
        ref = run_batches(lambda b: model(torch.from_numpy(b)).numpy(), images, batch_size)
    got = run_batches(lambda b: sess.run([LOGITS], {INPUT: b})[0], images, batch_size)
    report = compare(got, ref, targets, precision, sess.get_providers()[0], checkpoint_accuracy)
    report["batch_size"] = batch_size
    return report


def compare(got: np.ndarray, ref: np.ndarray, targets: np.ndarray | None, precision: str, provider: str,
            reference_accuracy: float | None = None) -> dict:
    """The report on logits ``got`` against the reference's ``ref``, with ``precision``'s tolerances."""
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if len(ref) else 0.0
    scale = float(np.abs(ref).max()) if len(ref) else 1.0
    agreement = float((got.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0
    report = {
        "precision": precision, "provider": provider, "n_images": int(len(ref)),
        "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / max(scale, 1e-12),
        "max_abs_logit": scale, "top1_agreement": agreement, "tolerances": TOLERANCES[precision],
    }
    if targets is not None and len(targets):
        report["accuracy_onnxruntime"] = float((got.argmax(1) == targets).mean())
        report["accuracy_pytorch" if precision != "int8" else "accuracy_fp32"] = float((ref.argmax(1) == targets).mean())
    if reference_accuracy is not None:
        report["accuracy_checkpoint"] = reference_accuracy
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    return report


def failures(r: dict) -> list[str]:
    tol, out = r["tolerances"], []
    if "max_abs_logit_diff" in tol and r["max_abs_logit_diff"] > tol["max_abs_logit_diff"]:
        out.append(f"max |logit difference| {r['max_abs_logit_diff']:.3g} > {tol['max_abs_logit_diff']:g}")
    if "max_rel_logit_diff" in tol and r["max_rel_logit_diff"] > tol["max_rel_logit_diff"]:
        out.append(f"max relative logit difference {r['max_rel_logit_diff']:.3g} > {tol['max_rel_logit_diff']:g}")
    if r["top1_agreement"] < tol["top1_agreement_min"]:
        out.append(f"top-1 agreement {r['top1_agreement']:.4%} < {tol['top1_agreement_min']:.1%}")
    if "accuracy_onnxruntime" in r and "accuracy_checkpoint" in r:
        delta = abs(r["accuracy_onnxruntime"] - r["accuracy_checkpoint"])
        if delta > tol["accuracy_delta_max"] + 1e-12:
            out.append(f"onnxruntime accuracy {r['accuracy_onnxruntime']:.4f} differs from the checkpoint's "
                       f"{r['accuracy_checkpoint']:.4f} by more than {tol['accuracy_delta_max']:g}")
    return out


def format_report(r: dict) -> str:
    acc = ""
    if "accuracy_onnxruntime" in r:
        ref = ("fp32", r["accuracy_fp32"]) if "accuracy_fp32" in r else ("PyTorch", r["accuracy_pytorch"])
        acc = f"; accuracy onnxruntime {r['accuracy_onnxruntime']:.4f} vs {ref[0]} {ref[1]:.4f}"
        if "accuracy_checkpoint" in r:
            acc += f" (checkpoint {r['accuracy_checkpoint']:.4f})"
    verdict = "PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
    return (f"verify {r['precision']} on {r['provider']}, {r['n_images']} images: max |logit diff| "
            f"{r['max_abs_logit_diff']:.2e}, top-1 agreement {r['top1_agreement']:.2%}{acc} -> {verdict}")
