"""Classification stage: classifier input -> COVID-19 probability and embedding."""

from __future__ import annotations

import numpy as np

from engine.models import Manifest
from engine.runtime.base import Backend


def classify(backend: Backend, manifest: Manifest, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns prob (N,) float32 and embedding (N, D) float32."""
    out = backend.infer({manifest.input.name: x})
    logit = out["logit"].reshape(-1).astype(np.float64)
    prob = 1.0 / (1.0 + np.exp(-logit))
    return prob.astype(np.float32), np.ascontiguousarray(out["embedding"], np.float32)
