"""Binary classification metrics in NumPy, defined as scikit-learn defines them.

Conventions (the tests hold these to scikit-learn within 1e-9):

- ``y`` holds 0/1 labels (1 = COVID-19 positive), ``scores`` probabilities, ``decision`` bools.
- A metric that is undefined on its input (a rate whose denominator is 0, an AUC on one class)
  is ``nan``; callers report it as undefined instead of inventing a value (scikit-learn would
  warn and return 0 or nan, depending on the metric).
- Curves sort scores descending and treat tied scores as one threshold, like
  ``sklearn.metrics._ranking._binary_clf_curve``; that is what makes tied scores count half in
  the ROC AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 10
ECE_BINNING = (
    "10 equal-width bins of the predicted probability: [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]; "
    "bin = min(floor(10 * p), 9); ECE = sum over bins of (images in bin / images) * "
    "|observed positive rate - mean predicted probability|"
)


@dataclass(frozen=True, slots=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def confusion(y: np.ndarray, decision: np.ndarray) -> Confusion:
    y = np.asarray(y).reshape(-1).astype(bool)
    d = np.asarray(decision).reshape(-1).astype(bool)
    # one pass: cell 2 * label + decision counts tn, fp, fn, tp
    tn, fp, fn, tp = np.bincount(2 * y.astype(np.int64) + d, minlength=4).tolist()
    return Confusion(tp=tp, fp=fp, tn=tn, fn=fn)


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def rates(c: Confusion) -> dict[str, float]:
    """accuracy, sensitivity, specificity, ppv, npv, f1 from a confusion matrix (nan: undefined)."""
    return {
        "accuracy": _ratio(c.tp + c.tn, c.n),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "ppv": _ratio(c.tp, c.tp + c.fp),
        "npv": _ratio(c.tn, c.tn + c.fn),
        "f1": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
    }


def _check(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != scores.shape:
        raise ValueError(f"{y.size} labels but {scores.size} scores")
    return (y == 1).astype(np.float64), scores


def binary_clf_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """(false positives, true positives, thresholds) at each distinct score, highest first."""
    y, scores = _check(y, scores)
    if y.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, y = scores[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = 1 + last_of_tie - tps
    return fps, tps, scores[last_of_tie]


def roc_curve(
    y: np.ndarray, scores: np.ndarray, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn.metrics.roc_curve; nan rates when a class is absent."""
    fps, tps, thresholds = binary_clf_curve(y, scores)
    if drop_intermediate and fps.size > 2:
        # keep the corners only: collinear points add nothing to the curve or its area
        corner = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep = np.flatnonzero(np.r_[True, corner, True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids; a tie between classes counts half); nan on one class."""
    return _auc_of(*binary_clf_curve(y, scores)[:2])


def _auc_of(fps: np.ndarray, tps: np.ndarray) -> float:
    if fps.size == 0 or fps[-1] == 0 or tps[-1] == 0:
        return float("nan")
    fpr = np.r_[0.0, fps] / fps[-1]
    tpr = np.r_[0.0, tps] / tps[-1]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def precision_recall_curve(
    y: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) as sklearn.metrics.precision_recall_curve.

    Thresholds ascend; precision and recall have one more element, the point (recall 0,
    precision 1). Recall is nan when there are no positives.
    """
    fps, tps, thresholds = binary_clf_curve(y, scores)
    precision, recall = _precision_recall_of(fps, tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def _precision_recall_of(fps: np.ndarray, tps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = tps / tps[-1] if tps.size and tps[-1] > 0 else np.full_like(tps, np.nan)
    return precision, recall


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score: sum of (R_n - R_{n-1}) * P_n; nan without positives."""
    return _ap_of(*binary_clf_curve(y, scores)[:2])


def _ap_of(fps: np.ndarray, tps: np.ndarray) -> float:
    precision, recall = _precision_recall_of(fps, tps)
    if recall.size == 0 or np.isnan(recall).any():
        return float("nan")
    # thresholds descending here, so recall rises from its first point (sklearn adds recall 0)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True, slots=True)
class Reliability:
    """Per bin of ECE_BINNING: edges (bins + 1), images, mean probability, observed rate."""

    edges: np.ndarray
    count: np.ndarray
    mean_prob: np.ndarray  # nan in empty bins
    observed: np.ndarray  # nan in empty bins
    ece: float


def _bin_of(p: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)


def reliability(y: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Calibration table and expected calibration error with equal-width bins on [0, 1]."""
    y, p = _check(y, scores)
    which = _bin_of(p, bins)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_y = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        observed = np.where(count > 0, sum_y / count, np.nan)
    filled = count > 0
    ece = (
        float(np.sum(count[filled] / p.size * np.abs(observed[filled] - mean_p[filled])))
        if p.size
        else float("nan")
    )
    return Reliability(np.arange(bins + 1) / bins, count, mean_p, observed, ece)


def ece(y: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float:
    """The ECE of `reliability`, without the table (this runs once per bootstrap resample)."""
    y, p = _check(y, scores)
    if p.size == 0:
        return float("nan")
    which = _bin_of(p, bins)
    # (n_b / n) * |mean y_b - mean p_b| == |sum y_b - sum p_b| / n
    gap = np.bincount(which, weights=y - p, minlength=bins)
    return float(np.abs(gap).sum() / p.size)


METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "roc_auc",
    "pr_auc",
    "ece",
)


METRIC_LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "sensitivity": "sensitivity (recall)",
    "specificity": "specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "ece": "ECE (10 bins)",
}


def all_metrics(y: np.ndarray, scores: np.ndarray, decision: np.ndarray) -> dict[str, float]:
    """Every metric of METRICS on one sample (nan where undefined)."""
    out = rates(confusion(y, decision))
    fps, tps, _ = binary_clf_curve(y, scores)  # one sort serves both areas
    out["roc_auc"] = _auc_of(fps, tps)
    out["pr_auc"] = _ap_of(fps, tps)
    out["ece"] = ece(y, scores)
    return out
