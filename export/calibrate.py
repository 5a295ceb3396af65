"""The numbers behind calibrated probabilities: temperature scaling, its measures and the measures of the
out-of-distribution score (the score itself is ``cnnserve.core.confidence``'s, numpy only, which the
service and the batch scorer answer with). Export runs where the ``train`` extra is installed, so the
softmax, the search for T and the AUROC are scipy's and scikit-learn's, not written out here again; the
serving image has neither, and nothing on its path imports this module.

- Temperature scaling (Guo et al. 2017): one T > 0 that minimises the negative log-likelihood of
  softmax(logits / T) on held-out data. The arg-max of every row is unchanged by construction.
- Expected calibration error with equal-width confidence bins (15, as in that paper), NLL, Brier score,
  and a bootstrap interval for the ECE (a few hundred test images leave it uncertain by about a point).
- The score's threshold: the validation split's 95th percentile, so 95% of in-distribution images pass;
  AUROC against an out-of-distribution set, and the false-accept rate (outliers that pass) at it.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special
from sklearn.metrics import roc_auc_score

from cnnserve.core.confidence import BINS, reliability

PASS_RATE = 0.95
LOG_T_RANGE = (np.log(0.05), np.log(20.0))


def log_softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    return special.log_softmax(np.asarray(logits, np.float64) / t, axis=1)


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    return special.softmax(np.asarray(logits, np.float64) / t, axis=1)


def nll(logits: np.ndarray, targets: np.ndarray, t: float = 1.0) -> float:
    return float(-log_softmax(logits, t)[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T in [0.05, 20] minimising NLL, by bounded Brent search on log T. NLL is convex in 1 / T (a mean
    of log-sum-exps of terms linear in it, less a linear term), so it has one minimum on log T's range too;
    where it falls all the way to a bound (a split classified perfectly) the search ends at that bound,
    which the caller checks for."""
    if len(targets) == 0:
        raise ValueError("no labelled images to fit a temperature on")
    found = optimize.minimize_scalar(lambda log_t: nll(logits, targets, np.exp(log_t)), bounds=LOG_T_RANGE,
                                     method="bounded", options={"xatol": 1e-7})
    return float(np.exp(found.x))


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
