"""Small, dependency-free metrics for model selection: ROC AUC, Youden threshold, Dice."""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLD_RULE = (
    "maximise Youden's J = sensitivity + specificity - 1 on the validation patients' images "
    "(FP32 ONNX probabilities); candidates are midpoints between consecutive distinct "
    "probabilities; ties go to the lower threshold; decision is prob >= threshold"
)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney ROC AUC with ties counted half; None when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _candidates(probs: np.ndarray) -> np.ndarray:
    """Thresholds the rules try, ascending: 0, the midpoints between consecutive distinct
    probabilities, 1."""
    values = np.unique(probs)
    return np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]])


def sensitivity_rule(target: float) -> str:
    """THRESHOLD_RULE's counterpart for a sensitivity target (--threshold-sensitivity)."""
    return (
        f"the highest threshold whose sensitivity on the validation patients' positives is at "
        f"least {target} (FP32 ONNX probabilities); candidates are midpoints between consecutive "
        "distinct probabilities; decision is prob >= threshold"
    )


def sensitivity_threshold(probs: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The threshold of sensitivity_rule(target) (0.5 when there are no positives)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    if not labels.any():
        return 0.5
    best = 0.0
    for t in _candidates(probs):  # ascending: the last one that still meets the target
        if (probs[labels] >= t).mean() >= target - 1e-12:
            best = float(t)
    return best


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold of THRESHOLD_RULE (0.5 when one class is absent)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return 0.5
    best_t, best_j = 0.5, -np.inf
    for t in _candidates(probs):  # ascending, so a strict > keeps the lowest of tied thresholds
        pred = probs >= t
        j = pred[labels].mean() + (~pred[~labels]).mean() - 1
        if j > best_j + 1e-12:
            best_t, best_j = float(t), j
    return best_t


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    pred = probs >= threshold
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return {
        "n": len(labels),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "roc_auc": roc_auc(probs, labels),
        "sensitivity": float(pred[labels].mean()) if n_pos else None,
        "specificity": float((~pred[~labels]).mean()) if n_neg else None,
        "accuracy": float((pred == labels).mean()) if len(labels) else None,
    }


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Hard Dice of binary (N, ...) masks; 1.0 where both are empty."""
    pred, truth = pred.reshape(len(pred), -1) > 0.5, truth.reshape(len(truth), -1) > 0.5
    inter = (pred & truth).sum(axis=1)
    total = pred.sum(axis=1) + truth.sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
