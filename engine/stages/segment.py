"""Lung segmentation stage: segmenter input -> per-pixel lung logits, and the mask helpers."""

from __future__ import annotations

import math

import numpy as np

from engine.models import Manifest
from engine.runtime.base import Backend


def segment(backend: Backend, manifest: Manifest, seg_input: np.ndarray) -> np.ndarray:
    """(N, 1, h, w) normalised input -> (N, h, w) mask logits."""
    out = backend.infer({manifest.input.name: seg_input})[manifest.outputs[0].name]
    return out.reshape(out.shape[0], out.shape[-2], out.shape[-1])


def logit_threshold(p: float) -> float:
    """The logit equal to probability p, so masks are thresholded without a sigmoid pass."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def upsample_nearest(mask: np.ndarray, side: int) -> np.ndarray:
    """(N, h, w) bool at the segmenter's resolution -> (N, side, side), nearest pixel centre."""
    _, h, w = mask.shape
    rows = np.minimum(((np.arange(side) + 0.5) * h / side).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(side) + 0.5) * w / side).astype(np.intp), w - 1)
    return mask[:, rows[:, None], cols[None, :]]
