"""Source probe: how well does the embedding tell where an image came from, within one class?

If, among the negatives alone (or the positives alone), a linear model on the classifier's
embedding recognises the source collection, the embedding carries the site's look; when the
classes come from different sites (as in cxr-train), that look is a shortcut to the label. A
probe AUC near 0.5 means the embedding does not carry the source; near 1, it does.

Method: per class with at least two sources, a cross-validated L2 logistic regression on the
first principal components of the centred embeddings (fitted on each training fold only),
one source against the rest; folds are stratified by source and keep each patient's
images together. Reported: ROC AUC per source (one against the rest, out of fold) and their
mean, with the image counts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from engine.eval.metrics import roc_auc

METHOD = (
    "per class: L2 logistic regression (Newton, penalty 1) on the first <= 32 principal "
    "components of the centred embeddings (each scaled to unit variance), fitted on each "
    "training fold; one source against the rest (2 sources: the first against the second); "
    "5 folds stratified by source, a patient's images in one fold; out-of-fold ROC AUC"
)


def _folds(sources: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of each image: groups (patients) dealt round-robin within each source."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(sources), int)
    by_source: dict[str, list[str]] = defaultdict(list)
    for s, g in zip(sources.tolist(), groups.tolist(), strict=True):
        if g not in by_source[s]:
            by_source[s].append(g)
    for s, gs in sorted(by_source.items()):
        order = rng.permutation(len(gs))
        for rank, gi in enumerate(order):
            fold[(sources == s) & (groups == gs[gi])] = rank % k
    return fold


def _logistic(x: np.ndarray, y: np.ndarray, penalty: float = 1.0, iters: int = 25) -> np.ndarray:
    """Weights (bias last) of an L2 logistic regression, by Newton's method."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], penalty)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w


def _project(train: np.ndarray, other: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Both onto the training fold's first principal components, each scaled to unit variance
    (the components, not the raw dimensions: scaling every dimension first would hide a
    direction that differs by source behind the many that do not)."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    v = vt[: min(dims, vt.shape[0])].T
    a, b = (train - mean) @ v, (other - mean) @ v
    std = a.std(0) + 1e-9
    return a / std, b / std


def probe_class(
    emb: np.ndarray,
    sources: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    dims: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Out-of-fold one-vs-rest ROC AUC per source, for the images of one class."""
    names = sorted(set(sources.tolist()))
    fold = _folds(sources, groups, folds, seed)
    scores = {s: np.full(len(sources), np.nan) for s in names}
    for f in range(folds):
        test, train = fold == f, fold != f
        if not test.any() or len(set(sources[train].tolist())) < 2:
            continue
        a, b = _project(emb[train], emb[test], dims)
        for s in names if len(names) > 2 else names[:1]:
            w = _logistic(a, (sources[train] == s).astype(float))
            scores[s][test] = b @ w[:-1] + w[-1]
    out: dict[str, Any] = {"images": dict(sorted((s, int((sources == s).sum())) for s in names))}
    aucs = {}
    for s in names if len(names) > 2 else names[:1]:
        ok = ~np.isnan(scores[s])
        aucs[s] = roc_auc((sources[ok] == s).astype(int), scores[s][ok])
    out["roc_auc_by_source"] = aucs
    valid = [v for v in aucs.values() if v is not None]
    out["roc_auc"] = float(np.mean(valid)) if valid else None
    out["roc_auc_max"] = float(np.max(valid)) if valid else None
    return out


def source_probe(
    embeddings: np.ndarray,
    sources: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """{label=y: probe_class(...)} for every class whose images come from two or more sources."""
    groups = np.arange(len(sources)).astype(str) if groups is None else np.asarray(groups)
    out: dict[str, Any] = {"method": METHOD}
    for y in sorted(set(np.asarray(labels).tolist())):
        sel = np.asarray(labels) == y
        if len(set(sources[sel].tolist())) >= 2:
            out[f"label={y}"] = probe_class(
                np.asarray(embeddings, np.float64)[sel], sources[sel], groups[sel], seed=seed
            )
    return out
