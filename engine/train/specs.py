"""Manifests of trained models, built from the same specs as `cxr models init`.

A trained model must drop in where the untrained export was: same architecture names, input and
output tensors, preprocessing and crop. So sizes come from engine.models.INIT_SPECS, looked up by
architecture name, and only the weights, threshold, card and ``trained`` differ.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError, ModelError
from engine.models import (
    INIT_SPECS,
    TRAIN_ONLY_CLASSIFIERS,
    UNET_SEGMENTERS,
    architecture_spec,
    classifier_manifest,
    segmenter_manifest,
)

__all__ = ["classifier_manifest", "segmenter_manifest", "work_size", "classifier_for_segmenter"]

SEGMENTER_ARCHS = tuple(UNET_SEGMENTERS)
CLASSIFIER_ARCHS = (
    *(s["classifier"]["architecture"] for s in INIT_SPECS.values()),
    *TRAIN_ONLY_CLASSIFIERS,
)


def _spec(role: str, architecture: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return architecture_spec(role, architecture)
    except ModelError as exc:  # an --arch option: a usage problem here
        raise ConfigError(str(exc)) from None


def work_size(segmenter_arch: str) -> int:
    """Side of the work image the segmenter input is derived from (its family's crop source)."""
    return int(_spec("segmenter", segmenter_arch)[1]["source_size"])


def classifier_for_segmenter(segmenter_arch: str) -> str:
    """The classifier architecture of the segmenter's size family (for preprocessing only)."""
    return str(_spec("segmenter", segmenter_arch)[1]["architecture"])
