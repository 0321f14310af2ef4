"""Lung crop stage: mask -> lung box (+ margin) -> classifier input cut from the work image.

The CPU path runs kernels/reference.py, the specification the GPU kernels are tested against.
Training uses this same function, so what the classifier learns on is what it is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.models import Manifest
from engine.stages.segment import logit_threshold
from kernels.reference import crop_resize_normalize, lung_bbox


@dataclass(frozen=True, slots=True)
class LungCrops:
    boxes: np.ndarray  # (N, 4) normalised (x0, y0, x1, y1), margin included
    fraction: np.ndarray  # (N,) share of segmenter pixels labelled lung
    classifier_input: np.ndarray  # (N, C, h, w) float32


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
    pre = classifier.preprocess
    x = crop_resize_normalize(work, boxes, pre.size, pre.mean, pre.std)
    return LungCrops(boxes=boxes, fraction=fraction, classifier_input=x)
