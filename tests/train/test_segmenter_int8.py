"""engine.train.segmenter_int8: the segmenter's INT8 export, calibrated on the training
patients' mask images only and judged on the lung box (IoU with the FP32 box on every labelled
image) and on Dice against the held-out masks; recorded as the manifest's int8 variant.

Synthetic pairs (test_segmenter.mask_pairs) and labelled images (test_data.labelled_set) with
the tiny untrained models, under tmp_path; on real masks: tests/train/test_train.py.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from test_data import labelled_set, write_csv
from test_segmenter import mask_pairs

pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("onnxruntime.quantization")

from engine.errors import ConfigError  # noqa: E402
from engine.models import (  # noqa: E402
    load_manifest,
    save_manifest,
    segmenter_parity_ok,
    sha256_file,
)
from engine.train.segmenter_int8 import INT8_FILE, box_iou, export_segmenter_int8  # noqa: E402


def test_box_iou_row_by_row():
    a = np.array(
        [[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.2, 0.2, 0.8, 0.8], [0.3, 0.3, 0.3, 0.3]],
        np.float32,
    )
    b = np.array(
        [[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 0.6, 0.6], [0.2, 0.2, 0.8, 0.8], [0.3, 0.3, 0.3, 0.3]],
        np.float32,
    )
    np.testing.assert_allclose(box_iou(a, b), [0.5, 0.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(box_iou(b, a), box_iou(a, b))  # symmetric
    inner = np.array([[0.25, 0.25, 0.75, 0.75]], np.float32)
    whole = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    np.testing.assert_allclose(box_iou(inner, whole), [0.25])  # nested: the area ratio


@pytest.fixture
def setup(tmp_path, tiny_models):
    """A models directory (the tiny models), 8 mask pairs of patients m0..m7 (m0-m4 train,
    m5 m6 val, m7 test in its splits.csv) and 4 labelled images."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models.classifier.directory, models)
    index = mask_pairs(tmp_path / "pairs", 8)
    parts = ["train"] * 5 + ["val", "val", "test"]
    write_csv(
        models / "splits.csv", [{"patient_id": f"m{i}", "split": s} for i, s in enumerate(parts)]
    )
    labels = labelled_set(tmp_path / "dev", 4, prefix="d")
    return models, index, labels, labels.parent


def test_export_records_box_and_dice_parity_as_the_int8_variant(setup):
    models, index, labels, images = setup
    before = load_manifest(models / "segmenter.json")
    parity = export_segmenter_int8(
        models, index, labels, images, calibration_images=3, float_ends=1, threads=1
    )
    seg = load_manifest(models / "segmenter.json")
    assert seg.sha256 == before.sha256 and seg.onnx == before.onnx  # the FP32 export stays
    v = seg.variants["int8"]
    assert v.onnx == INT8_FILE and v.sha256 == sha256_file(models / INT8_FILE)
    assert v.parity == parity
    assert parity["images"] == 4  # every labelled image's box
    assert parity["mask_images"] == 3  # the held-out (val + test) mask patients
    assert parity["calibration"]["images"] == 3  # the first training patients, at most 3
    assert parity["calibration"]["method"] == "Percentile"
    assert parity["calibration"]["float_convolutions"] == "the first and last 1"
    assert 0.0 <= parity["box_iou_min"] <= parity["box_iou_mean"] <= 1.0
    assert parity["box_iou_below_bar"] in range(5)
    assert parity["dice_drop"] == pytest.approx(parity["dice_fp32"] - parity["dice_int8"])
    assert parity["meets_bar"] == segmenter_parity_ok(parity)


def test_a_box_rule_given_is_recorded_and_the_boxes_follow_it(setup, monkeypatch):
    import engine.train.segmenter_int8 as si

    models, index, labels, images = setup
    rules = []
    real = si.lung_bbox
    monkeypatch.setattr(si, "lung_bbox", lambda m, t, g, r=0.0: rules.append(r) or real(m, t, g, r))
    parity = export_segmenter_int8(
        models, index, labels, images, calibration_images=3, box_min_region=0.002, threads=1
    )
    seg = load_manifest(models / "segmenter.json")
    assert seg.box_min_region == 0.002 == parity["box_min_region"]
    assert rules == [0.002, 0.002]  # the FP32 and the INT8 boxes, both under the rule
    with pytest.raises(ConfigError, match=r"--box-min-region must be in \[0, 1\)"):
        export_segmenter_int8(models, index, labels, images, box_min_region=1.0, threads=1)


def test_what_the_export_needs_is_checked_first(setup, tmp_path):
    models, index, labels, images = setup
    seg = load_manifest(models / "segmenter.json")
    save_manifest(replace(seg, precision="fp16"), models)
    with pytest.raises(ConfigError, match="needs the FP32 segmenter, not its fp16 export"):
        export_segmenter_int8(models, index, labels, images, threads=1)
    save_manifest(seg, models)
    (models / "splits.csv").rename(tmp_path / "splits.csv")
    with pytest.raises(ConfigError, match="splits.csv: not found; it gives the patient split"):
        export_segmenter_int8(models, index, labels, images, threads=1)
    write_csv(models / "splits.csv", [{"patient_id": f"m{i}", "split": "train"} for i in range(8)])
    with pytest.raises(ConfigError, match="8 mask pairs of training patients and 0 of held-out"):
        export_segmenter_int8(models, index, labels, images, threads=1)
    assert (
        not (models / INT8_FILE).exists() and not load_manifest(models / "segmenter.json").variants
    )
