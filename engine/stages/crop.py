"""Lung crop stage: mask -> lung box (+ margin) -> classifier input cut from the work image.

The CPU path runs kernels/reference.py, the specification the GPU kernels are tested against.
Training uses this same function, so what the classifier learns on is what it is served.

A classifier whose manifest lists box transforms (``tta``) is served the mean of its outputs on
one crop per transform: each moves and scales the lung box as the training's box jitter does
(engine.train.data.jitter_boxes draws the same transforms at random). The crops are laid out
transform-major: rows k * N .. (k + 1) * N - 1 are transform k's crops of the N images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.models import Manifest
from engine.stages.segment import logit_threshold
from kernels.reference import crop_resize_normalize, lung_bbox

MIN_BOX_SIDE = 0.01  # a moved box keeps at least 1% of the image on each side


@dataclass(frozen=True, slots=True)
class LungCrops:
    boxes: np.ndarray  # (N, 4) normalised (x0, y0, x1, y1), margin included
    fraction: np.ndarray  # (N,) share of segmenter pixels labelled lung
    classifier_input: np.ndarray  # (K * N, C, h, w) float32; K = len(tta) or 1


def scale_shift_boxes(
    boxes: np.ndarray,
    sx: np.ndarray | float,
    sy: np.ndarray | float,
    dx: np.ndarray | float,
    dy: np.ndarray | float,
) -> np.ndarray:
    """Boxes (N, 4) with their sides scaled by (sx, sy) and their centres moved by (dx, dy) of
    their sides (each a scalar or (N,)); clipped to [0, 1], keeping MIN_BOX_SIDE."""
    boxes = np.asarray(boxes)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = cx + dx * bw, cy + dy * bh
    half_w, half_h = bw * sx / 2, bh * sy / 2
    out = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    out = np.clip(out, 0.0, 1.0)
    out[:, 2] = np.maximum(out[:, 2], out[:, 0] + MIN_BOX_SIDE)
    out[:, 3] = np.maximum(out[:, 3], out[:, 1] + MIN_BOX_SIDE)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def tta_boxes(boxes: np.ndarray, classifier: Manifest) -> np.ndarray:
    """(K * N, 4): the lung boxes under each of the classifier's box transforms, transform-major;
    the boxes themselves when it has none."""
    if not classifier.tta:
        return np.asarray(boxes, np.float32)
    return np.concatenate([scale_shift_boxes(boxes, *t) for t in classifier.tta])


def classifier_crops(work: np.ndarray, boxes: np.ndarray, classifier: Manifest) -> np.ndarray:
    """The classifier's inputs (K * N, C, h, w) cut from work images (N, S, S) at lung boxes."""
    pre = classifier.preprocess
    per_transform = np.split(tta_boxes(boxes, classifier), max(len(classifier.tta), 1))
    crops = [crop_resize_normalize(work, b, pre.size, pre.mean, pre.std) for b in per_transform]
    return crops[0] if len(crops) == 1 else np.concatenate(crops)


def lung_crops(
    work: np.ndarray, mask_logits: np.ndarray, segmenter: Manifest, classifier: Manifest
) -> LungCrops:
    if classifier.crop is None:
        raise ValueError("classifier manifest has no crop section")
    boxes, fraction = lung_bbox(
        mask_logits,
        logit_threshold(segmenter.threshold),
        classifier.crop.margin,
        segmenter.box_min_region,
    )
    x = classifier_crops(work, boxes, classifier)
    return LungCrops(boxes=boxes, fraction=fraction, classifier_input=x)
