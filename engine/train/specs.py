"""Manifests of trained models, built from the same specs as `cxr models init`.

A trained model must drop in where the untrained export was: same architecture names, input and
output tensors, preprocessing and crop. So sizes come from engine.models.INIT_SPECS, looked up by
architecture name, and only the weights, threshold, card and ``trained`` differ.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError
from engine.models import INIT_SPECS, CropSpec, Manifest, Preprocess, TensorSpec

SEGMENTER_ARCHS = tuple(s["segmenter"]["architecture"] for s in INIT_SPECS.values())
CLASSIFIER_ARCHS = tuple(s["classifier"]["architecture"] for s in INIT_SPECS.values())
# Preprocessing of every architecture `cxr models init` exports: gray, [0,1] -> (x - 0.5) / 0.25.
GRAY_MEAN, GRAY_STD = (0.5,), (0.25,)


def _spec(role: str, architecture: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this role's spec, the classifier spec of the same size family)."""
    for family in INIT_SPECS.values():
        if family[role]["architecture"] == architecture:
            return family[role], family["classifier"]
    choices = SEGMENTER_ARCHS if role == "segmenter" else CLASSIFIER_ARCHS
    raise ConfigError(f"unknown {role} architecture {architecture!r}: choose one of {choices}")


def work_size(segmenter_arch: str) -> int:
    """Side of the work image the segmenter input is derived from (its family's crop source)."""
    return int(_spec("segmenter", segmenter_arch)[1]["source_size"])


def _gray(n: int) -> Preprocess:
    return Preprocess(size=(n, n), channels=1, mean=GRAY_MEAN, std=GRAY_STD, intensity="minmax")


def segmenter_manifest(
    architecture: str, *, card: dict[str, Any] | None = None, trained: bool = True
) -> Manifest:
    n = int(_spec("segmenter", architecture)[0]["size"])
    return Manifest(
        role="segmenter",
        architecture=architecture,
        onnx="segmenter.onnx",
        sha256="",
        inputs=(TensorSpec(name="image", shape=("N", 1, n, n)),),
        outputs=(TensorSpec(name="mask_logit", shape=("N", 1, n, n)),),
        preprocess=_gray(n),
        threshold=0.5,
        trained=trained,
        card=card or {},
    )


def classifier_manifest(
    architecture: str,
    *,
    threshold: float = 0.5,
    card: dict[str, Any] | None = None,
    trained: bool = True,
) -> Manifest:
    spec = _spec("classifier", architecture)[0]
    n, dim = int(spec["size"]), int(spec["embedding_dim"])
    return Manifest(
        role="classifier",
        architecture=architecture,
        onnx="classifier.onnx",
        sha256="",
        inputs=(TensorSpec(name="image", shape=("N", 1, n, n)),),
        outputs=(
            TensorSpec(name="logit", shape=("N", 1)),
            TensorSpec(name="embedding", shape=("N", dim)),
        ),
        preprocess=_gray(n),
        threshold=threshold,
        trained=trained,
        crop=CropSpec(source_size=int(spec["source_size"]), margin=0.05),
        card=card or {},
    )


def classifier_for_segmenter(segmenter_arch: str) -> str:
    """The classifier architecture of the segmenter's size family (for preprocessing only)."""
    return str(_spec("segmenter", segmenter_arch)[1]["architecture"])
