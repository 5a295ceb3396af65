"""What every classification answer says about its own probabilities, so a caller can act on them.

The export fitted a temperature T (the graph's ``probabilities`` are softmax(logits / T); its ``logits``
are raw) and an out-of-distribution threshold on the energy score ``-T logsumexp(logits / T)``'s
distance from the validation split's energies, that 95% of the validation split passes
(``onnxmeta.KEY_TEMPERATURE``, ``KEY_OOD``). Each answer gets:

- ``ood_score``: how far the energy score lies from the validation split's (``ood_scores``; higher: less
  like the training data);
- ``in_distribution``: whether it is at or under the threshold (null for a model exported without one);
- ``calibrated``: whether the probabilities are temperature-scaled; ``calibrated=false`` asks for the raw
  softmax of the logits instead.

numpy only, on rows the model already returned (logits and probabilities side by side): the service
(``service/engine.py``) and the batch scorer (``scoring/``) answer alike, and the serving image has no
scipy. The export (``export/calibrate.py``) fits and measures with scipy's softmax, but computes the
energy score it fits the threshold on with this module's, the one every answer is scored with.
"""

from __future__ import annotations

import numpy as np


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Each row's log-sum-exp as an N x 1 column, shifted by the row's maximum so that no exp overflows."""
    m = z.max(axis=1, keepdims=True)
    return m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def energy(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    """The energy score ``-T logsumexp(logits / T)`` per row (Liu et al. 2020; lower: more like the data
    the network was trained on, up to the failure ``ood_scores`` guards against)."""
    return -t * _logsumexp(np.asarray(logits, np.float64) / t)[:, 0]


def ood_scores(ood: dict, logits: np.ndarray, t: float) -> np.ndarray:
    """Each row's out-of-distribution score: how far its energy lies from the validation split's median
    energy (``center``), on either side in units of that side's spread (``below``: the median less the
    2.5th percentile; ``above``: the 97.5th less the median; ``export/probabilities.py`` records all
    three), so 1 is the edge of the band that holds the middle 95% of validation energies. Two-sided, as a
    typicality test is (Nalisnick et al. 2019): a ReLU network can answer inputs far from its data, uniform
    noise among them, with logits larger than any it gives its own data (Hein et al. 2019), so their energy
    is *lower* than the training data's and a one-sided rule calls them the most familiar of all. A model
    exported before this rule (no ``center``) scores the energy itself, as it was exported to."""
    energies = energy(logits, t)
    center, below, above = ood.get("center"), ood.get("below"), ood.get("above")
    if all(isinstance(v, (int, float)) for v in (center, below, above)) and below > 0 and above > 0:
        return np.maximum((center - energies) / below, (energies - center) / above)
    return energies


def raw_softmax(logits: np.ndarray) -> np.ndarray:
    """softmax(logits) per row, float32 as the graph's own probabilities: what ``calibrated=false`` answers."""
    z = np.asarray(logits, np.float64)
    return np.exp(z - _logsumexp(z)).astype(np.float32)


def threshold(info) -> float | None:
    value = info.ood.get("threshold")
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


class NotFinite(ValueError):
    """A model answered NaN or infinity for some rows (``rows``: their indices): the model's fault, not the
    input's, and nothing an answer can carry (JSON has no NaN)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"the model's outputs are not finite (NaN or infinity) for rows {rows[:10]}")
        self.rows = rows


def not_finite_rows(*arrays: np.ndarray | None) -> list[int]:
    """The indices of the rows that hold a NaN or an infinity in any of ``arrays`` (N rows each; None skipped).
    One check per array when all is well (always, but for a broken model): a few microseconds an answer."""
    for a in arrays:  # a loop, not all() over a generator: a generator's frames were 3% of a v2 request's CPU
        if a is not None and not np.isfinite(a).all():
            break
    else:
        return []
    bad = None
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a)
        ok = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        bad = ~ok if bad is None else bad | ~ok
    return [] if bad is None or not bad.any() else np.flatnonzero(bad).tolist()


def assess(info, logits: np.ndarray, probs: np.ndarray, calibrated: bool = True, scores: np.ndarray | None = None,
           finite: bool = True) -> tuple[np.ndarray, list[dict]]:
    """A model's ``logits`` and ``probs`` (N x K each) to the probabilities to answer with (raw softmax unless
    ``calibrated``) and per row ``{"ood_score", "in_distribution", "calibrated"}``. ``scores``: the rows'
    ``ood_scores`` where the batch that made them already has them (the service's batcher scores each batch
    once, in its inference thread: per request, on the event loop, that numpy work cost LeNet-5 a tenth of
    its throughput), else computed here. ``NotFinite`` where a row of the answer would hold NaN or infinity
    (a model can be finite on blank images and NaN on a real one), unless ``finite`` is false (the batch
    scorer writes such rows as they are, for the rest of its batch)."""
    scaled = info.temperature != 1.0
    answered = probs if calibrated or not scaled else raw_softmax(logits)
    if scores is None:
        scores = ood_scores(info.ood, logits, info.temperature)
    if finite:
        bad = not_finite_rows(logits, probs, scores)  # the raw softmax of finite logits is finite
        if bad:
            raise NotFinite(bad)
    limit = threshold(info)
    rows = [{"ood_score": round(float(s), 4), "in_distribution": None if limit is None else bool(s <= limit),
             "calibrated": bool(calibrated and scaled)} for s in scores]
    return answered, rows


def score_rows(model, pixels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """A ``runtime.Model``'s calibrated probabilities and per-row OOD fields for uint8 ``pixels``."""
    from .onnxmeta import OUTPUTS

    probs, rows = assess(model.info, *model.run(pixels, list(OUTPUTS)), finite=False)
    return probs, rows


#: Equal-width bins of the top-1 confidence for the expected calibration error (the export's and evaluate's).
BINS = 15


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> dict:
    """ECE over ``bins`` equal-width confidence bins, and each bin's count, mean confidence and accuracy."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi] bins
    counts = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, conf, minlength=bins)
    acc_sum = np.bincount(which, correct.astype(np.float64), minlength=bins)
    nonzero = np.maximum(counts, 1)
    ece = float(np.abs(acc_sum - conf_sum).sum() / max(len(targets), 1))
    return {"ece": ece, "bins": bins, "counts": counts.tolist(),
            "confidence": np.round(conf_sum / nonzero, 6).tolist(), "accuracy": np.round(acc_sum / nonzero, 6).tolist()}
