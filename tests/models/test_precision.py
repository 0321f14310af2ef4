"""engine.models.precision: which export runs. --precision auto takes INT8 only where its recorded
parity meets the bar and the CPU has an 8-bit dot product; an explicit precision is obeyed or
refused with what the model has."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.errors import ModelError
from engine.models import (
    AUTO_MAX_AUC_DIFF,
    AUTO_MIN_SAME_DECISION,
    SEG_MAX_DICE_DROP,
    SEG_MIN_BOX_IOU,
    Variant,
    choose_precision,
    classifier_parity_ok,
    meets_parity_bar,
    segmenter_parity_ok,
    why_precision,
)
from engine.models.precision import at_precision, why_chosen


def test_auto_precision_takes_int8_only_where_its_parity_holds(tiny_models):
    from dataclasses import replace as _replace

    from engine.cpu import parse_cpuinfo
    from engine.models import Variant, choose_precision, why_precision

    vnni = parse_cpuinfo("model name\t: Zen 4\nflags\t\t: avx2 avx512f avx512_vnni\n")
    amx = parse_cpuinfo("flags\t\t: avx2 avx512f amx_tile amx_int8\n")
    avx2 = parse_cpuinfo("model name\t: old\nflags\t\t: sse2 avx avx2 fma\n")
    clf = tiny_models.classifier
    good = {"same_decision": 0.995, "roc_auc_diff": -0.002}
    bad = {"same_decision": 0.95, "roc_auc_diff": -0.002}
    v = {"int8": Variant(onnx="q.onnx", sha256="a" * 64, parity=good)}
    with_int8 = _replace(clf, variants=v)
    assert choose_precision(with_int8, "auto", vnni).precision == "int8"
    assert choose_precision(with_int8, "auto", amx).precision == "int8"
    assert "avx512_vnni" in why_precision(with_int8, "auto", vnni)
    # no 8-bit dot product on an AVX2-only CPU: INT8 would be slower there, the float export runs
    assert choose_precision(with_int8, "auto", avx2).precision == "fp32"
    assert "no VNNI/AMX" in why_precision(with_int8, "auto", avx2)
    # ...unless asked for
    assert choose_precision(with_int8, "int8", avx2).precision == "int8"
    v["int8"] = Variant(onnx="q.onnx", sha256="a" * 64, parity=bad)
    assert choose_precision(_replace(clf, variants=v), "auto", vnni).precision == "fp32"
    assert "parity" in why_precision(_replace(clf, variants=v), "auto", vnni)
    # a shipped INT8 classifier with its w8 export: auto keeps the INT8 one
    w8 = {"w8": Variant(onnx="w.onnx", sha256="b" * 64, parity=good)}
    shipped = _replace(clf, precision="int8", variants=w8)
    assert choose_precision(shipped, "auto").precision == "int8"
    assert choose_precision(shipped, "w8").onnx == "w.onnx"


def test_the_classifier_bar_counts_held_out_images_and_embeddings_where_recorded(tiny_models):
    from dataclasses import replace as _replace

    from engine.cpu import parse_cpuinfo
    from engine.models import AUTO_MIN_EMBEDDING_COSINE, Variant, choose_precision

    base = {"same_decision": 0.995, "roc_auc_diff": 0.001}
    assert classifier_parity_ok(base)
    full = base | {"same_decision_held_out": 1.0, "embedding_cosine_mean": 0.999}
    assert classifier_parity_ok(full)
    assert not classifier_parity_ok(full | {"same_decision_held_out": 89 / 90})
    assert not classifier_parity_ok(full | {"embedding_cosine_mean": 0.983})
    assert classifier_parity_ok(full | {"embedding_cosine_mean": AUTO_MIN_EMBEDDING_COSINE})
    assert not classifier_parity_ok({"roc_auc_diff": 0.0})  # no decisions recorded
    # --precision auto follows the whole bar
    vnni = parse_cpuinfo("flags\t\t: avx2 avx512f avx512_vnni\n")
    clf = tiny_models.classifier
    for par, want in ((full, "int8"), (full | {"same_decision_held_out": 0.96}, "fp32")):
        v = {"int8": Variant(onnx="q.onnx", sha256="a" * 64, parity=par)}
        assert choose_precision(_replace(clf, variants=v), "auto", vnni).precision == want


def test_the_parity_bars():
    assert meets_parity_bar(AUTO_MIN_SAME_DECISION, AUTO_MAX_AUC_DIFF)
    assert meets_parity_bar(1.0, -AUTO_MAX_AUC_DIFF) and meets_parity_bar(0.995, None)
    assert not meets_parity_bar(0.98, 0.0)
    assert not meets_parity_bar(1.0, AUTO_MAX_AUC_DIFF * 1.5)
    assert segmenter_parity_ok({"box_iou_min": SEG_MIN_BOX_IOU, "dice_drop": SEG_MAX_DICE_DROP})
    assert not segmenter_parity_ok({"box_iou_min": 0.9, "dice_drop": 0.0})
    assert not segmenter_parity_ok({"box_iou_min": 0.99, "dice_drop": 0.01})
    assert not segmenter_parity_ok({"box_iou_min": 0.99})  # nothing recorded: not met
    assert not segmenter_parity_ok({"box_iou_min": "n/a", "dice_drop": 0.0})


def test_an_explicit_precision_is_obeyed_or_refused_with_what_there_is(tiny_models):
    clf = replace(tiny_models.classifier, variants={"w8": Variant(onnx="w.onnx", sha256="b" * 64)})
    assert choose_precision(clf, "fp32") is clf
    w8 = choose_precision(clf, "w8")
    assert (w8.onnx, w8.sha256, w8.precision, w8.variants) == ("w.onnx", "b" * 64, "w8", {})
    with pytest.raises(
        ModelError, match=r"classifier\.json: no int8 export .*\(available: fp32, w8\)"
    ):
        choose_precision(clf, "int8")
    with pytest.raises(ModelError, match="precision must be one of auto, fp32, fp16, w8, int8"):
        choose_precision(clf, "bf16")
    assert why_precision(clf, "w8") == "w8: asked for with --precision w8"


def test_at_precision_falls_back_to_the_model_as_is_and_says_why(tiny_models):
    clf = tiny_models.classifier  # fp32 only
    assert at_precision(clf, "int8") is clf and at_precision(clf, "fp16") is clf
    assert at_precision(clf, "auto") is clf
    assert why_chosen(clf, clf, "int8") == (
        "fp32: the classifier has no int8 export (--precision int8)"
    )
    assert why_chosen(clf, clf, "fp32") == "fp32: asked for with --precision fp32"
    assert why_chosen(clf, clf, "auto") == "fp32: the model has no INT8 export"
