"""Classification stage: classifier input -> COVID-19 probability and embedding."""

from __future__ import annotations

import numpy as np

from engine.models import Manifest
from engine.runtime.base import Backend


def classify(backend: Backend, manifest: Manifest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns prob (N,) float32 and embedding (N, D) float32. A classifier with box transforms
    (tta) is given K * N crops, transform-major (engine.stages.crop.classifier_crops)."""
    out = backend.infer({manifest.input.name: x})
    return tta_mean(out["logit"], out["embedding"], manifest)


def tta_mean(
    logit: np.ndarray, embedding: np.ndarray, manifest: Manifest
) -> tuple[np.ndarray, np.ndarray]:
    """prob (N,) float32 and embedding (N, D) from the outputs on K * N transform-major crops:
    the sigmoid of crop_mean's logit (K = len(manifest.tta), 1 without)."""
    mean_logit, emb = crop_mean(logit, embedding, max(len(manifest.tta), 1))
    prob = 1.0 / (1.0 + np.exp(-mean_logit))
    return prob.astype(np.float32), emb


def crop_mean(logit: np.ndarray, embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) float64 mean logit and (N, D) float32 mean embedding over the K crops of each image,
    rows transform-major (k * N + i is image i's crop k)."""
    mean_logit = np.asarray(logit).reshape(k, -1).astype(np.float64).mean(axis=0)
    emb = np.asarray(embedding, np.float32)
    if k > 1:
        emb = emb.reshape(k, len(mean_logit), -1).mean(axis=0, dtype=np.float64)
    return mean_logit, np.ascontiguousarray(emb, np.float32)
