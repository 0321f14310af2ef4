"""Models: every model is an ONNX file plus a sidecar JSON manifest that says how to feed it.

    manifest.py   the manifest schema, reading (sha256 checked), validating and writing it
    precision.py  which export runs: precisions, the parity bar, `--precision auto`
    modelset.py   ModelSet (segmenter + classifier) and load_models (default: the shipped ones)
    export.py     the architectures `cxr models init` exports, their manifests, export_model
    storage.py    ONNX weight-storage rewrites (float16, per-channel INT8, back to float32)
    pack.py       a lean copy of a models directory for shipping

The names below are the package's API: import them from ``engine.models``.
"""

from engine.models.export import (
    INIT_SPECS,
    TRAIN_ONLY_CLASSIFIERS,
    architecture_spec,
    classifier_manifest,
    export_model,
    init_models,
    segmenter_manifest,
)
from engine.models.manifest import (
    INTENSITY_MODES,
    MANIFEST_FORMAT,
    ROLES,
    UNET_SEGMENTERS,
    CropSpec,
    Manifest,
    Preprocess,
    Role,
    TensorSpec,
    UNetShape,
    Variant,
    load_manifest,
    manifest_path,
    parse_manifest,
    save_manifest,
    sha256_file,
)
from engine.models.modelset import PACKAGED_MODELS, ModelSet, load_models
from engine.models.pack import pack_models
from engine.models.precision import (
    AUTO_MAX_AUC_DIFF,
    AUTO_MIN_EMBEDDING_COSINE,
    AUTO_MIN_SAME_DECISION,
    FLOAT_COMPUTE,
    PRECISIONS,
    SEG_MAX_DICE_DROP,
    SEG_MIN_BOX_IOU,
    choose_precision,
    classifier_parity_ok,
    meets_parity_bar,
    segmenter_parity_ok,
    why_precision,
)
from engine.models.storage import float_weights, fp16_weights, w8_weights

__all__ = [
    "AUTO_MAX_AUC_DIFF",
    "AUTO_MIN_EMBEDDING_COSINE",
    "AUTO_MIN_SAME_DECISION",
    "FLOAT_COMPUTE",
    "INIT_SPECS",
    "INTENSITY_MODES",
    "MANIFEST_FORMAT",
    "PACKAGED_MODELS",
    "PRECISIONS",
    "ROLES",
    "SEG_MAX_DICE_DROP",
    "SEG_MIN_BOX_IOU",
    "TRAIN_ONLY_CLASSIFIERS",
    "CropSpec",
    "Manifest",
    "ModelSet",
    "Preprocess",
    "Role",
    "TensorSpec",
    "Variant",
    "UNET_SEGMENTERS",
    "UNetShape",
    "architecture_spec",
    "choose_precision",
    "classifier_manifest",
    "classifier_parity_ok",
    "export_model",
    "float_weights",
    "fp16_weights",
    "init_models",
    "load_manifest",
    "load_models",
    "manifest_path",
    "meets_parity_bar",
    "pack_models",
    "parse_manifest",
    "save_manifest",
    "segmenter_manifest",
    "segmenter_parity_ok",
    "sha256_file",
    "w8_weights",
    "why_precision",
]
