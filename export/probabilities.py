"""The export step that makes an exported model's probabilities something a caller can act on.

1. Fit one temperature T on the validation split's logits (``calibrate.fit_temperature``) and put it in
   the graph: ``probabilities = Softmax(logits / T)``. The ``logits`` output stays the network's raw
   logits (verification compares them with PyTorch; the OOD score and ``calibrated=false`` start from
   them), so any client, KServe v2 tensors included, gets calibrated probabilities and can still undo it.
2. Fit the out-of-distribution rule on the validation split: the energy score's median and its spread on
   each side there, and the threshold on the distance from them that 95% pass (``ood_scores`` in
   ``core/confidence.py``: two-sided, since uniform noise can get a *lower* energy than the training data);
   measure it on images that are not the training distribution (uniform noise; for a digits model the
   ``shapes`` images and digits rotated 90 degrees; for a shapes model digits): AUROC and false-accept rate
   per set.
3. Measure on the test split ECE (15 bins, with a bootstrap interval), NLL and Brier score before and
   after; top-1 must be unchanged (the export fails otherwise). A reliability diagram is drawn.

The figures go into the model's metadata (``onnxmeta.KEY_TEMPERATURE``, ``KEY_OOD``, ``KEY_CALIBRATION``)
and the verification report; every variant (fp16, int8) inherits T and is checked after it
(``check_probabilities``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cnnserve.core.confidence import energy, ood_scores
from cnnserve.core.onnxmeta import INPUT, LOGITS, PROBABILITIES, ModelInfo

from . import calibrate as cal
from .files import ExportError

TEMPERATURE = "cnnserve_temperature"  # the graph's initializer holding T
SCALED = "cnnserve_scaled_logits"
#: |probabilities - softmax(logits / T)| allowed in each precision's own graph (fp16 runs Softmax in half)
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "int8": 5e-3}


def with_temperature(proto: onnx.ModelProto, t: float) -> onnx.ModelProto:
    """``proto`` with ``probabilities = Softmax(logits / t)`` (a copy). Whatever made ``probabilities``
    before (a Softmax of the logits, or an imported model's own output) is replaced; a graph that already
    has a temperature gets the new value."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    value = numpy_helper.from_array(np.array(t, np.float32), TEMPERATURE)
    for init in g.initializer:
        if init.name == TEMPERATURE:
            init.CopyFrom(value)
            return out
    producers = [n for n in g.node if PROBABILITIES in n.output]
    if len(producers) != 1 or len(producers[0].output) != 1:
        raise ExportError(f"cannot calibrate: the graph's {PROBABILITIES!r} output is not made by one node")
    if any(PROBABILITIES in n.input for n in g.node):
        raise ExportError(f"cannot calibrate: other nodes read {PROBABILITIES!r}")
    g.node.remove(producers[0])
    g.initializer.append(value)
    g.node.extend([helper.make_node("Div", [LOGITS, TEMPERATURE], [SCALED], name="cnnserve_temperature_scaling"),
                   helper.make_node("Softmax", [SCALED], [PROBABILITIES], axis=1, name="cnnserve_calibrated_softmax")])
    onnx.checker.check_model(out, full_check=True)
    return out


def run(model, images: np.ndarray, outputs=(LOGITS, PROBABILITIES), batch: int = 128) -> list[np.ndarray]:
    """``outputs`` of ``model`` (a proto, bytes or a session) on uint8 ``images``, on the CPU provider."""
    import onnxruntime as ort

    if not hasattr(model, "run"):
        blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        model = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    parts = [model.run(list(outputs), {INPUT: images[i:i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]


def ood_sets(spec, data: str, test_images: np.ndarray, n: int = 240) -> dict[str, np.ndarray]:
    """Images that are not the training distribution: uniform noise always; for digits (and MNIST) the
    ``shapes`` images and the test digits rotated 90 degrees; for shapes, digits."""
    from cnnserve.models.data import load_dataset

    rng = np.random.default_rng(29)
    sets = {"noise": rng.integers(0, 256, (n, *spec.input_shape), dtype=np.uint8)}
    if data in ("digits", "mnist") and spec.height == spec.width:
        # the shapes test split is 15% of 4 x per_class images
        shapes = load_dataset("shapes", spec, shapes_per_class=max(n // 2, 8)).test.tensors[0].numpy()
        sets["shapes"] = shapes[:n]
        sets["rotated_digits"] = np.ascontiguousarray(np.rot90(test_images[:n], 1, axes=(2, 3)))
    elif data == "shapes":
        sets["digits"] = load_dataset("digits", spec).test.tensors[0].numpy()[:n]
    return sets


def fit(proto: onnx.ModelProto, info: ModelInfo, val, test, calibrate: bool = True,
        log=print) -> tuple[onnx.ModelProto, ModelInfo, dict]:
    """Steps 1-3 of the module docstring for an fp32 graph; ``val`` and ``test`` are (uint8 images,
    targets). Returns the graph (with T unless ``calibrate`` is false), the info with the figures, and the
    report. Without labelled data (random weights) nothing is fitted."""
    if val[1] is None or test[1] is None or not len(val[1]) or not len(test[1]):
        return proto, info, {"calibrated": False, "why": "no labelled validation and test splits (random weights)"}
    (val_logits,) = run(proto, val[0], (LOGITS,))
    test_logits, raw_probs = run(proto, test[0])
    t = cal.fit_temperature(val_logits, val[1]) if calibrate else 1.0
    separated = calibrate and np.log(t) - cal.LOG_T_RANGE[0] < 0.01
    if separated:
        # every validation image right and T at the search's lower edge: NLL only falls as T -> 0, so the
        # split supports no temperature (a well-trained model whose validation split also chose its epoch);
        # scaling there would make the test split's few errors near-certain. The raw softmax stays.
        log(f"calibration: the validation split is classified perfectly, so no temperature fits it (T ran to "
            f"{t:.3f}); probabilities stay the raw softmax (T = 1)")
        calibrate, t = False, 1.0
    graph = with_temperature(proto, t) if calibrate else proto
    logits_after, probs = run(graph, test[0])
    if not (probs.argmax(1) == raw_probs.argmax(1)).all() or not np.array_equal(logits_after, test_logits):
        raise ExportError(f"temperature {t:.4f} changed a top-1 class or the logits on the test split; not written")
    y = test[1]
    before = cal.measures(raw_probs.astype(np.float64), test_logits, y, 1.0)
    after = cal.measures(probs.astype(np.float64), test_logits, y, t)
    val_energy = energy(val_logits, t)
    lo, center, hi = (float(q) for q in np.quantile(val_energy, [0.025, 0.5, 0.975]))
    rule = {"center": center, "below": max(center - lo, 1e-6), "above": max(hi - center, 1e-6)}  # ood_scores
    val_scores, test_scores = ood_scores(rule, val_logits, t), ood_scores(rule, test_logits, t)
    limit = cal.threshold(val_scores)
    sets = {}
    for name, x in ood_sets(info.spec, info.data, test[0]).items():
        (out,) = run(proto, x, (LOGITS,))
        sets[name] = {**cal.ood_measures(test_scores, ood_scores(rule, out, t), limit),
                      # and the one-sided energy's and the max-softmax baseline's AUROC
                      "auroc_energy": cal.auroc(energy(test_logits, t), energy(out, t)),
                      "auroc_max_softmax": cal.auroc(-cal.softmax(test_logits, t).max(1),
                                                     -cal.softmax(out, t).max(1))}
    ood = {"score": "energy_distance", **rule, "temperature": t, "threshold": limit,
           "validation_pass_rate": cal.PASS_RATE,
           "test_pass_rate": float((test_scores <= limit).mean()), "n_validation": int(len(val[1])),
           "n_test": int(len(y)), "sets": sets,  # and the reference for drift (service/answers.py):
           "test_class_mix": np.round(np.bincount(probs.argmax(1), minlength=info.spec.num_classes) / len(y),
                                      6).tolist()}

    def brief(m):
        return {k: m[k] for k in ("ece", "ece_95", "nll", "brier", "accuracy")}

    calibration = {"calibrated": calibrate, "temperature": t, "fitted_on": "validation split",
                   **({"why": "the validation split is classified perfectly: no temperature fits it"}
                      if separated else {}),
                   "n_validation": int(len(val[1])), "test": {"n": int(len(y)), "bins": cal.BINS,
                                                             "before": brief(before), "after": brief(after)},
                   "top1_unchanged": True,  # at the search's edge: a model near chance (T -> infinity) or odd data
                   "temperature_at_bound": bool(calibrate and min(abs(np.log(t) - b) for b in cal.LOG_T_RANGE) < 0.01)}
    if calibration["temperature_at_bound"]:
        log(f"calibration: T = {t:.3f} is at the edge of the search ({np.exp(cal.LOG_T_RANGE[0]):.2f}-"
            f"{np.exp(cal.LOG_T_RANGE[1]):.0f}): the model is near chance on the validation split, or it is tiny")
    log(f"calibration: T = {t:.3f} {'kept' if separated else 'fitted'} on {len(val[1])} validation images; "
        f"test ({len(y)} images, {cal.BINS} bins) ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
        f"NLL {before['nll']:.4f} -> {after['nll']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}; "
        "top-1 unchanged")
    found = ", ".join(f"{k} AUROC {v['auroc']:.3f} false-accept {v['false_accept_rate']:.1%}" for k, v in sets.items())
    log(f"out-of-distribution (energy's distance from validation's, threshold {limit:.3f}, 95% of validation "
        f"passes): {found}")
    report = {**calibration, "ood": ood, "test": {**calibration["test"], "before": before, "after": after}}
    return graph, replace(info, temperature=t, ood=ood, calibration=calibration), report


def check_probabilities(model_bytes: bytes, images: np.ndarray, t: float, precision: str) -> dict:
    """Whether a written graph (any precision) gives softmax(its own logits / T): the variants inherit T."""
    logits, probs = run(model_bytes, images)
    diff = float(np.abs(cal.softmax(logits, t) - probs).max()) if len(images) else 0.0
    ok = diff <= TOLERANCE[precision]
    return {"temperature": t, "max_abs_diff": diff, "tolerance": TOLERANCE[precision], "passed": ok,
            "failures": [] if ok else [f"probabilities differ from softmax(logits / {t:.4f}) by {diff:.3g} > "
                                       f"{TOLERANCE[precision]:g}"]}


def attach_check(report: dict, model_bytes: bytes, images: np.ndarray, t: float) -> dict:
    """``check_probabilities`` into a verification report: its failures fail the report."""
    check = check_probabilities(model_bytes, images, t, report["precision"])
    report["probabilities"] = check
    report["failures"] = [*report.get("failures", []), *check["failures"]]
    report["passed"] = not report["failures"]
    return report


def reliability_png(report: dict, path: Path, title: str = "") -> Path:
    """The reliability diagram (accuracy against confidence per bin, before and after) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, key in zip(axes, ("before", "after")):
        m = report["test"][key]
        rel = m["reliability"]
        bins = rel["bins"]
        centres = (np.arange(bins) + 0.5) / bins
        counts = np.array(rel["counts"])
        shown = counts > 0
        ax.bar(centres[shown], np.array(rel["accuracy"])[shown], width=1 / bins, edgecolor="k", alpha=0.7,
               label="accuracy")
        ax.plot(centres[shown], np.array(rel["confidence"])[shown], "o", color="C3", label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        t = report["temperature"] if key == "after" else 1.0
        ax.set_title(f"{key} (T = {t:.3f}): ECE {m['ece']:.2%}\n95% interval {m['ece_95'][0]:.2%}-"
                     f"{m['ece_95'][1]:.2%}, {report['test']['n']} test images", fontsize=9)
        ax.set_xlabel(f"confidence ({bins} bins)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
