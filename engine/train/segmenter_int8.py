"""INT8 export of a trained segmenter, and its parity with the FP32 one (issue 17).

The segmenter is there for a lung box (and the mask the review page shows), so its INT8 export
is judged on what the engine does with it:

- box IoU with the FP32 export's lung box (the same kernels.reference.lung_bbox, threshold and
  margin as `cxr screen`) on every labelled image: the bar is IoU >= 0.95 on EVERY image;
- Dice against the human masks of the held-out (validation + test) mask patients, FP32 and
  INT8: the bar is a drop of at most 0.005.

Calibration uses the mask images of training patients only (the classifier's splits.csv, which
the segmenter shares). The result is recorded as the manifest's `int8` variant with its parity;
`--precision auto` takes it only where that parity holds and the CPU has VNNI/AMX.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.models import (
    SEG_MAX_DICE_DROP,
    SEG_MIN_BOX_IOU,
    Manifest,
    ModelSet,
    Variant,
    load_manifest,
    manifest_path,
    save_manifest,
    segmenter_parity_ok,
    sha256_file,
)
from engine.stages.segment import logit_threshold
from engine.train.data import decode_all, find_mask_pairs, load_mask, log, read_labels
from engine.train.export import Int8Recipe, ort_run, ort_session, quantize_int8
from engine.train.metrics import dice_per_image
from engine.train.specs import classifier_manifest
from kernels.reference import lung_bbox

INT8_FILE = "segmenter.int8.onnx"
RECIPE = Int8Recipe(method="percentile")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) normalised boxes, row by row."""
    x0, y0 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x1, y1 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.where(area - inter > 0, inter / np.maximum(area - inter, 1e-12), 1.0)


def _splits(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found; it gives the patient split calibration must respect "
            "(the splits.csv `cxr train classifier` writes)"
        )
    with open(path, newline="") as f:
        return {r["patient_id"]: r["split"] for r in csv.DictReader(f)}


def segmenter_inputs(
    paths: list[Path], seg: Manifest, threads: int
) -> tuple[list[int], np.ndarray]:
    """(indices of paths that decoded, their segmenter inputs): the engine's Preprocessor with the
    full family's work image (what `cxr screen` feeds the segmenter beside the ResNet50)."""
    models = ModelSet(segmenter=seg, classifier=classifier_manifest("resnet50", trained=False))
    dec = decode_all(paths, models, threads=threads)
    return dec.ok, dec.seg_input


def lung_boxes(session: Any, seg: Manifest, x: np.ndarray) -> np.ndarray:
    """(N, 4) lung boxes of segmenter inputs x as `cxr screen` finds them: the same
    kernels.reference.lung_bbox, the segmenter's threshold and box_min_region and the full
    classifier's margin."""
    logits = ort_run(session, x, batch=16)[seg.outputs[0].name][:, 0]
    margin = classifier_manifest("resnet50", trained=False).crop.margin  # type: ignore[union-attr]
    return lung_bbox(logits, logit_threshold(seg.threshold), margin, seg.box_min_region)[0]


def box_agreement(iou: np.ndarray) -> dict[str, Any]:
    """Per-image box IoUs summarised against the bar (SEG_MIN_BOX_IOU on every image)."""
    return {
        "images": len(iou),
        "box_iou_min": float(iou.min()),
        "box_iou_mean": float(iou.mean()),
        "box_iou_below_bar": int((iou < SEG_MIN_BOX_IOU).sum()),
    }


def export_segmenter_int8(
    models_dir: Path,
    masks: Path,
    labels: Path,
    images: Path,
    *,
    calibration_images: int = 64,
    float_ends: int = 0,
    box_min_region: float | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Write models_dir/segmenter.int8.onnx and record it (with its parity) as the segmenter
    manifest's int8 variant; returns the parity. box_min_region: set the segmenter's box rule
    (kernels.reference.lung_bbox min_region) first; both exports' boxes follow it."""
    models_dir = Path(models_dir)
    seg = load_manifest(manifest_path(models_dir, "segmenter"))
    if box_min_region is not None:
        if not 0.0 <= box_min_region < 1.0:
            raise ConfigError(f"--box-min-region must be in [0, 1), got {box_min_region}")
        seg = replace(seg, box_min_region=box_min_region)
    if seg.precision != "fp32":
        raise ConfigError(f"{models_dir}: needs the FP32 segmenter, not its {seg.precision} export")
    split = _splits(models_dir / "splits.csv")
    pairs = find_mask_pairs(masks)
    train = [p for p in pairs if split.get(p.patient_id) == "train"][:calibration_images]
    held = [p for p in pairs if split.get(p.patient_id) in ("val", "test")]
    if not train or not held:
        raise ConfigError(
            f"{masks}: {len(train)} mask pairs of training patients and {len(held)} of held-out "
            "ones; both are needed (calibration, Dice)"
        )
    log(f"segmenter INT8: calibrating on {len(train)} training mask images")
    _, calib = segmenter_inputs([p.image for p in train], seg, threads)
    int8_path = models_dir / INT8_FILE
    recipe = replace(RECIPE, float_ends=float_ends)
    quantize_int8(seg.onnx_path, int8_path, calib, recipe)
    fp32_s, int8_s = ort_session(seg.onnx_path, threads), ort_session(int8_path, threads)
    out_name = seg.outputs[0].name

    def logits(sess: Any, x: np.ndarray) -> np.ndarray:
        return ort_run(sess, x, batch=16)[out_name][:, 0]

    thr = logit_threshold(seg.threshold)
    dev = read_labels(labels, images)
    log(f"segmenter INT8: lung boxes of {len(dev)} labelled images, FP32 and INT8")
    _, x = segmenter_inputs([im.path for im in dev], seg, threads)
    iou = box_iou(lung_boxes(fp32_s, seg, x), lung_boxes(int8_s, seg, x))
    ok, xh = segmenter_inputs([p.image for p in held], seg, threads)
    side = tuple(xh.shape[-2:])
    truth = np.stack([load_mask(held[i].mask, side) for i in ok])  # type: ignore[arg-type]
    dice_a = dice_per_image(logits(fp32_s, xh) >= thr, truth)
    dice_b = dice_per_image(logits(int8_s, xh) >= thr, truth)
    parity: dict[str, Any] = {
        **box_agreement(iou),
        "mask_images": len(ok),
        "dice_fp32": float(dice_a.mean()),
        "dice_int8": float(dice_b.mean()),
        "dice_drop": float(dice_a.mean() - dice_b.mean()),
        "bar": f"box IoU >= {SEG_MIN_BOX_IOU} on every image, Dice drop <= {SEG_MAX_DICE_DROP}",
        "box_min_region": seg.box_min_region,
        "calibration": {"images": len(train), **recipe.describe()},
    }
    parity["meets_bar"] = segmenter_parity_ok(parity)
    variant = Variant(onnx=INT8_FILE, sha256=sha256_file(int8_path), parity=parity)
    save_manifest(replace(seg, variants={**seg.variants, "int8": variant}), models_dir)
    log(
        f"segmenter INT8: box IoU min {parity['box_iou_min']:.4f} mean "
        f"{parity['box_iou_mean']:.4f}; Dice {parity['dice_fp32']:.4f} -> "
        f"{parity['dice_int8']:.4f}; meets the bar: {parity['meets_bar']}"
    )
    return parity
