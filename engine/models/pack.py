"""A lean copy of a models directory for shipping (`cxr models pack`, the release)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.errors import ModelError
from engine.models.export import export_model
from engine.models.manifest import Variant, save_manifest
from engine.models.modelset import ModelSet, load_models
from engine.models.storage import fp16_weights, w8_weights


def pack_models(src: Path, out: Path, *, classifier_precision: str) -> ModelSet:
    """A lean copy of a models directory for shipping: the chosen classifier export
    (``int8``: its QDQ variant, with a w8 variant, the FP32 weights stored as INT8, that
    TensorRT's float plans build from; ``fp16``: float16-stored weights; ``fp16+int8``: the
    float16-stored weights with the trained INT8 export as their variant, which `--precision
    auto` runs on CPUs with VNNI/AMX where its recorded parity meets the bar), the segmenter as
    is, with its variants' files (its INT8 export, which `--precision auto` takes on the same
    terms).

    The manifests keep the training card, including the INT8 parity measured against FP32.
    """
    import shutil

    import onnx

    models = load_models(src, precision="fp32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg = models.segmenter
    for name in seg.onnx_files:
        shutil.copy2(seg.directory / name, out / name)
    save_manifest(replace(seg, directory=out), out)
    clf = models.classifier
    # as given (relative paths stay relative: a shipped card names no build machine's folders)
    card = dict(clf.card) | {"packed_from": str(src), "reference": "fp32"}
    if classifier_precision == "int8":
        variant = clf.variants.get("int8")
        if variant is None:
            raise ModelError(f"{src}: the classifier has no int8 export to pack")
        shutil.copy2(clf.directory / variant.onnx, out / variant.onnx)
        w8 = replace(clf, onnx="classifier.w8.onnx", precision="w8", variants={}, card=card)
        w8 = export_model(w8_weights(onnx.load(str(clf.onnx_path))), out, w8)
        packed = replace(
            clf,
            onnx=variant.onnx,
            sha256=variant.sha256,
            precision="int8",
            variants={"w8": Variant(onnx=w8.onnx, sha256=w8.sha256)},
            card=card,
            directory=out,
        )
        save_manifest(packed, out)
    elif classifier_precision in ("fp16", "fp16+int8"):
        variants = {}
        if classifier_precision == "fp16+int8":
            variant = clf.variants.get("int8")
            if variant is None:
                raise ModelError(f"{src}: the classifier has no int8 export to pack")
            shutil.copy2(clf.directory / variant.onnx, out / variant.onnx)
            variants = {"int8": variant}
        proto = fp16_weights(onnx.load(str(clf.onnx_path)))
        half = replace(
            clf, onnx="classifier.fp16.onnx", precision="fp16", variants=variants, card=card
        )
        export_model(proto, out, half)
    else:
        raise ModelError(
            "pack: classifier precision must be int8, fp16 or fp16+int8, not "
            f"{classifier_precision!r}"
        )
    return load_models(out, precision="auto")
