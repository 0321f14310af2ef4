"""The architectures `cxr models init` exports (and the classifiers only `cxr train` makes):
their manifests, and writing an ONNX model with its manifest."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from engine.errors import ModelError
from engine.models.manifest import (
    UNET_SEGMENTERS,
    CropSpec,
    Manifest,
    Preprocess,
    Role,
    TensorSpec,
    save_manifest,
    sha256_file,
)
from engine.models.modelset import ModelSet

INIT_SPECS: dict[str, dict[str, Any]] = {
    "full": {
        "segmenter": {"architecture": "unet", "size": UNET_SEGMENTERS["unet"].size},
        "classifier": {
            "architecture": "resnet50",
            "size": 224,
            "source_size": 512,
            "embedding_dim": 2048,
        },
    },
    "tiny": {
        "segmenter": {"architecture": "tiny-unet", "size": UNET_SEGMENTERS["tiny-unet"].size},
        "classifier": {
            "architecture": "tiny-classifier",
            "size": 64,
            "source_size": 128,
            "embedding_dim": 64,
        },
    },
}


def export_model(model: Any, directory: Path, manifest: Manifest) -> Manifest:
    """Write an onnx.ModelProto and its manifest (with the file's sha256) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / manifest.onnx
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, onnx_path)
    final = replace(manifest, sha256=sha256_file(onnx_path), directory=directory)
    save_manifest(final, directory)
    return final


# Classifiers that only `cxr train` makes (they start from pretrained torch weights, so `cxr models
# init` has no ONNX builder for them); same input, crop and preprocessing as the full family.
TRAIN_ONLY_CLASSIFIERS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {
        "architecture": "efficientnet-lite0",
        "size": 224,
        "source_size": 512,
        "embedding_dim": 1280,
    },
}


def architecture_spec(role: str, architecture: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this role's spec, the classifier spec of the same size family)."""
    if role == "segmenter" and architecture in UNET_SEGMENTERS:
        shape = UNET_SEGMENTERS[architecture]
        spec = {"architecture": architecture, "size": shape.size}
        return spec, INIT_SPECS[shape.family]["classifier"]
    for family in INIT_SPECS.values():
        if family[role]["architecture"] == architecture:
            return family[role], family["classifier"]
    if role == "classifier" and architecture in TRAIN_ONLY_CLASSIFIERS:
        spec = TRAIN_ONLY_CLASSIFIERS[architecture]
        return spec, spec
    choices = sorted(f[role]["architecture"] for f in INIT_SPECS.values())
    if role == "segmenter":
        choices = sorted(UNET_SEGMENTERS)
    if role == "classifier":
        choices += sorted(TRAIN_ONLY_CLASSIFIERS)
    raise ModelError(f"unknown {role} architecture {architecture!r}: choose one of {choices}")


# Input and preprocessing of the architectures `cxr models init` exports (one gray channel,
# named "image"). Trained models record their own.
def _gray_manifest(
    role: Role,
    architecture: str,
    n: int,
    *,
    card: dict[str, Any] | None,
    trained: bool,
    **fields: Any,
) -> Manifest:
    return Manifest(
        role=role,
        architecture=architecture,
        onnx=f"{role}.onnx",
        sha256="",
        inputs=(TensorSpec(name="image", shape=("N", 1, n, n)),),
        preprocess=Preprocess(
            size=(n, n), channels=1, mean=(0.5,), std=(0.25,), intensity="minmax"
        ),
        trained=trained,
        card=card or {},
        **fields,
    )


def segmenter_manifest(
    architecture: str, *, card: dict[str, Any] | None = None, trained: bool = True
) -> Manifest:
    """The manifest of a segmenter architecture (sha256 filled in by export_model)."""
    n = int(architecture_spec("segmenter", architecture)[0]["size"])
    return _gray_manifest(
        "segmenter",
        architecture,
        n,
        card=card,
        trained=trained,
        outputs=(TensorSpec(name="mask_logit", shape=("N", 1, n, n)),),
        threshold=0.5,
    )


def classifier_manifest(
    architecture: str,
    *,
    threshold: float = 0.5,
    card: dict[str, Any] | None = None,
    trained: bool = True,
) -> Manifest:
    """The manifest of a classifier architecture (sha256 filled in by export_model)."""
    spec = architecture_spec("classifier", architecture)[0]
    n, dim = int(spec["size"]), int(spec["embedding_dim"])
    return _gray_manifest(
        "classifier",
        architecture,
        n,
        card=card,
        trained=trained,
        outputs=(
            TensorSpec(name="logit", shape=("N", 1)),
            TensorSpec(name="embedding", shape=("N", dim)),
        ),
        threshold=threshold,
        crop=CropSpec(source_size=int(spec["source_size"]), margin=0.05),
    )


def init_models(
    out_dir: Path, *, size: Literal["full", "tiny"] = "full", seed: int = 0
) -> ModelSet:
    """Export the two architectures UNTRAINED (random weights, fixed seed) with manifests."""
    from engine import arch  # onnx graph builders; only needed here

    spec = INIT_SPECS[size]
    seg_s, clf_s = spec["segmenter"], spec["classifier"]
    untrained_card = {
        "status": "UNTRAINED: random weights from `cxr models init`; predictions are meaningless",
        "seed": seed,
    }
    seg_model = arch.ARCHITECTURES[seg_s["architecture"]](seed=seed, size=seg_s["size"])
    seg = segmenter_manifest(seg_s["architecture"], card=untrained_card, trained=False)
    clf_model = arch.ARCHITECTURES[clf_s["architecture"]](
        seed=seed, in_channels=1, size=clf_s["size"], embedding_dim=clf_s["embedding_dim"]
    )
    clf = classifier_manifest(clf_s["architecture"], card=untrained_card, trained=False)
    return ModelSet(
        segmenter=export_model(seg_model, out_dir, seg),
        classifier=export_model(clf_model, out_dir, clf),
    )
