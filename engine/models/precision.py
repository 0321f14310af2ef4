"""Which export of a model runs: the precisions, the parity bar a faster export must meet,
and the rule of ``--precision auto`` (INT8 only where it kept parity and the CPU runs it fast)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engine.cpu import INT8_FLAGS, CpuInfo, this_cpu
from engine.errors import ModelError
from engine.models.manifest import Manifest

# A variant is used by precision "auto" only if it agrees with the reference this well
# (ARCHITECTURE.md habit 2; the same bar as the throughput issue's parity rule).
AUTO_MIN_SAME_DECISION = 0.99
AUTO_MAX_AUC_DIFF = 0.01
# ...and, where its parity records them, the same decision on every held-out image (never
# calibrated or tuned on) and a mean embedding cosine with FP32 of at least this (the
# embeddings feed `cxr similar`)
AUTO_MIN_EMBEDDING_COSINE = 0.99
SEG_MIN_BOX_IOU = 0.95  # a segmenter export's lung box against the FP32 one, on every image
SEG_MAX_DICE_DROP = 0.005
# fp16 / w8: the FP32 model's weights stored as float16 / per-channel INT8, computed in float32
# (what TensorRT's float plans build from when no FP32 export ships); int8: the QDQ export.
PRECISIONS = ("auto", "fp32", "fp16", "w8", "int8")
FLOAT_COMPUTE = ("fp32", "fp16", "w8")


def choose_precision(m: Manifest, precision: str, cpu: CpuInfo | None = None) -> Manifest:
    """The manifest re-pointed at the export of the wanted precision.

    "auto" takes the INT8 variant only where its recorded parity meets the bar above AND the
    CPU has an 8-bit dot-product instruction (VNNI/AMX; elsewhere INT8 runs slower than float),
    else the reference export. `why_precision` says which rule decided.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        int8 = m.variants.get("int8")
        if m.precision == "int8" or int8 is None or not _parity_ok(int8.parity):
            return m
        if not (cpu or this_cpu()).int8_fast:
            return m
        precision = "int8"
    if precision == m.precision:
        return m
    v = m.variants.get(precision)
    if v is None:
        have = sorted({m.precision, *m.variants})
        raise ModelError(
            f"{m.directory / (m.role + '.json')}: no {precision} export of the {m.role} "
            f"(available: {', '.join(have)})"
        )
    return replace(m, onnx=v.onnx, sha256=v.sha256, precision=precision, variants={})


def why_chosen(raw: Manifest, chosen: Manifest, precision: str) -> str:
    """Why load_models runs `chosen` (raw re-pointed by at_precision) for `--precision`."""
    if precision == "auto":
        return why_precision(raw, "auto")
    if chosen.precision == precision:
        return f"{precision}: asked for with --precision {precision}"
    return f"{chosen.precision}: the {raw.role} has no {precision} export (--precision {precision})"


def why_precision(m: Manifest, precision: str, cpu: CpuInfo | None = None) -> str:
    """One sentence: why `choose_precision(m, precision, cpu)` runs the export it runs."""
    chosen = choose_precision(m, precision, cpu).precision
    if precision != "auto":
        return f"{chosen}: asked for with --precision {precision}"
    int8 = m.variants.get("int8")
    if m.precision == "int8":
        return "int8: the model's only export"
    if int8 is None:
        return f"{chosen}: the model has no INT8 export"
    if not _parity_ok(int8.parity):
        return f"{chosen}: its INT8 export does not meet the parity bar"
    cpu = cpu or this_cpu()
    if chosen == "int8":
        return f"int8: parity bar met and the CPU has {', '.join(sorted(cpu.flags & INT8_FLAGS))}"
    return f"{chosen}: the CPU has no VNNI/AMX (INT8 would run slower than float here)"


def meets_parity_bar(same_decision: float, roc_auc_diff: float | None) -> bool:
    """The parity bar of a faster export against FP32; a None AUC diff (no labels of both
    classes) is judged on decisions alone."""
    return same_decision >= AUTO_MIN_SAME_DECISION and (
        roc_auc_diff is None or abs(roc_auc_diff) <= AUTO_MAX_AUC_DIFF
    )


def classifier_parity_ok(parity: dict[str, Any]) -> bool:
    """A classifier export's whole bar: meets_parity_bar on every labelled image, and where
    recorded, the same decision on all held-out images and the mean embedding cosine."""
    try:
        same = float(parity["same_decision"])
        auc = parity.get("roc_auc_diff")
        ok = meets_parity_bar(same, None if auc is None else float(auc))
        if parity.get("same_decision_held_out") is not None:
            ok = ok and float(parity["same_decision_held_out"]) >= 1.0
        if parity.get("embedding_cosine_mean") is not None:
            ok = ok and float(parity["embedding_cosine_mean"]) >= AUTO_MIN_EMBEDDING_COSINE
        return ok
    except (KeyError, TypeError, ValueError):
        return False


def segmenter_parity_ok(parity: dict[str, Any]) -> bool:
    """A segmenter export's bar (engine/train/segmenter_int8.py measures it): the lung box's
    IoU with the FP32 box on every labelled image, and the Dice drop on held-out masks."""
    try:
        return (
            float(parity["box_iou_min"]) >= SEG_MIN_BOX_IOU
            and float(parity["dice_drop"]) <= SEG_MAX_DICE_DROP
        )
    except (KeyError, TypeError, ValueError):
        return False


def _parity_ok(parity: dict[str, Any]) -> bool:
    """`--precision auto` takes a variant only with its numbers recorded and within the bar
    (a classifier's decisions and ROC AUC, a segmenter's boxes and Dice)."""
    if "box_iou_min" in parity:
        return segmenter_parity_ok(parity)
    if parity.get("roc_auc_diff") is None:  # auto needs both numbers recorded
        return False
    return classifier_parity_ok(parity)


def at_precision(m: Manifest, precision: str) -> Manifest:
    """The export of an explicit precision where the model has one, else the model as is."""
    if precision not in ("auto", "fp32") and precision not in (m.precision, *m.variants):
        return m
    return choose_precision(m, precision)
