"""The numbers behind calibrated probabilities: temperature scaling, its measures and the measures of the
out-of-distribution score (the score itself is ``cnnserve.core.confidence``'s, numpy only, which the
service and the batch scorer answer with). Export runs where the ``train`` extra is installed, so the
AUROC is scikit-learn's, not written out here again; the serving image has no scikit-learn, and nothing
on its path imports this module.

- Temperature scaling (Guo et al. 2017): one T > 0 that minimises the negative log-likelihood of
  softmax(logits / T) on held-out data. The arg-max of every row is unchanged by construction.
- Expected calibration error with equal-width confidence bins (15, as in that paper), NLL, Brier score,
  and a bootstrap interval for the ECE (a few hundred test images leave it uncertain by about a point).
- The score's threshold: the validation split's 95th percentile, so 95% of in-distribution images pass;
  AUROC against an out-of-distribution set, and the false-accept rate (outliers that pass) at it.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

BINS = 15
PASS_RATE = 0.95
LOG_T_RANGE = (np.log(0.05), np.log(20.0))


def log_softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, t))


def nll(logits: np.ndarray, targets: np.ndarray, t: float = 1.0) -> float:
    return float(-log_softmax(logits, t)[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T in [0.05, 20] minimising NLL: a grid on log T, then golden-section search around its best point
    (NLL is smooth and, in log T, unimodal in practice)."""
    if len(targets) == 0:
        raise ValueError("no labelled images to fit a temperature on")
    grid = np.linspace(*LOG_T_RANGE, 121)
    losses = [nll(logits, targets, np.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, targets, np.exp(a)), nll(logits, targets, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, targets, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, targets, np.exp(b))
    return float(np.exp((lo + hi) / 2))


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


def ece_interval(probs: np.ndarray, targets: np.ndarray, bins: int = BINS, rounds: int = 1000,
                 seed: int = 0) -> list[float]:
    """A 95% bootstrap interval of the ECE (images resampled with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    values = [reliability(probs[i], targets[i], bins)["ece"] for i in (rng.integers(0, n, n) for _ in range(rounds))]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(targets)), targets] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def measures(probs: np.ndarray, logits: np.ndarray, targets: np.ndarray, t: float, bins: int = BINS) -> dict:
    """ECE (with its bootstrap interval and bins), NLL, Brier and accuracy of ``probs`` (softmax(logits / t))."""
    rel = reliability(probs, targets, bins)
    return {"ece": rel["ece"], "ece_95": ece_interval(probs, targets, bins), "nll": nll(logits, targets, t),
            "brier": brier(probs, targets), "accuracy": float((probs.argmax(1) == targets).mean()), "reliability": rel}


def threshold(scores: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The score at or under which ``pass_rate`` of ``scores`` (the validation split's) lie."""
    return float(np.quantile(np.asarray(scores, np.float64), pass_rate))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that an outlier scores higher than an inlier (ties count half), Mann-Whitney's U over
    the number of pairs: the area under the ROC curve with the outliers as the positives."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.concatenate([inside, outside])))


def ood_measures(inside: np.ndarray, outside: np.ndarray, limit: float) -> dict:
    return {"n": int(len(outside)), "auroc": auroc(inside, outside),
            "false_accept_rate": float((np.asarray(outside) <= limit).mean())}
