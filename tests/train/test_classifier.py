"""engine.train.classifier: `cxr train classifier` around its loop: metrics per part and
source, the split counts of the card, INT8 calibration crops (training images only, a patient
id per crop), the FP32 export and the INT8 variant with its parity, the recorded split and the
check that a rerun keeps it, the segmenter brought along, and a whole (2-step) training.

Synthetic crops (test_classifier_fit.crop_data) and sets (test_crops.synthetic_sets) with the
tiny models, under tmp_path; short trainings on real images: tests/train/test_train.py.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("onnxruntime.quantization")

from test_classifier_fit import CLF, crop_data, tiny_config  # noqa: E402
from test_crops import synthetic_sets  # noqa: E402

from engine.errors import ConfigError  # noqa: E402
from engine.models import load_manifest, sha256_file  # noqa: E402
from engine.train import classifier  # noqa: E402
from engine.train.classifier import (  # noqa: E402
    HEAD_OPS,
    INT8_FILE,
    PARTS,
    ClassifierTrainConfig,
    calibration_inputs,
    evaluate,
    export_all,
    group_counts_of,
    int8_variant,
    split_counts,
)
from engine.train.metrics import binary_metrics  # noqa: E402
from engine.train.redo import check_same_split  # noqa: E402
from engine.train.resnet import build_classifier  # noqa: E402

SPLIT = ["train"] * 10 + ["val"] * 4 + ["test"] * 4 + ["holdout"] * 2
SOURCES = ["a", "b"] * 9 + ["c", "c"]


def _data():
    return crop_data(SPLIT, sources=SOURCES, dataset=[0] * 18 + [1] * 2)


def test_evaluate_per_part_overall_and_per_source():
    data = _data()
    probs = np.linspace(0.05, 0.95, 20)
    got = evaluate(probs, data, 0.5)
    assert list(got) == ["train", "val", "test", "holdout"]  # PARTS order, parts with images
    assert PARTS[-1] == "unseen" and "unseen" not in got
    for part, rows in got.items():
        sel = data.split == part
        assert rows["all"] == binary_metrics(probs[sel], data.labels[sel], 0.5)
        for src in set(data.sources[sel].tolist()):
            s = sel & (data.sources == src)
            assert rows[f"source={src}"] == binary_metrics(probs[s], data.labels[s], 0.5)
    assert set(got["holdout"]) == {"all", "source=c"}


def test_split_and_group_counts_for_the_card():
    data = _data()
    counts = split_counts(data)
    assert list(counts) == ["train", "val", "test", "holdout"]
    assert counts["train"] == {
        "images": 10,
        "patients": 10,
        "by_label": {"0": 5, "1": 5},
        "by_source_label": {"a:1": 5, "b:0": 5},
    }
    assert counts["holdout"]["images"] == 2
    assert group_counts_of(data, "val") == {"a:1": 2, "b:0": 2}
    assert group_counts_of(data, "unseen") == {}


def test_calibration_crops_are_training_crops_with_their_patients():
    data = _data()
    few, patients = calibration_inputs(data, CLF, 6, seed=0)
    np.testing.assert_array_equal(few, data.inputs[:6])  # unaugmented first
    assert patients.tolist() == [f"p{i}" for i in range(6)]
    many, patients = calibration_inputs(data, CLF, 25, seed=0)
    assert many.shape == (25, 1, 64, 64) and len(patients) == 25
    np.testing.assert_array_equal(many[:10], data.inputs[:10])  # every training crop once ...
    assert not np.allclose(many[10:], data.inputs[:15])  # ... then augmented views
    assert set(patients.tolist()) <= {f"p{i}" for i in range(10)}  # training patients only
    again, same = calibration_inputs(data, CLF, 25, seed=0)
    np.testing.assert_array_equal(again, many)
    assert (same == patients).all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_classifier("tiny-classifier", 64, standardize=True).eval()
    data = _data()
    out = tmp_path_factory.mktemp("export")
    cfg = tiny_config(out, calibration_images=8, int8_tune_epochs=0)
    manifest, outputs, parity = export_all(cfg, model, data, CLF)
    return cfg, model, data, manifest, outputs, parity


def test_export_all_writes_the_fp32_model_and_scores_every_crop(exported):
    cfg, model, data, manifest, outputs, parity = exported
    assert manifest.onnx_path == cfg.out / "classifier.onnx"
    assert manifest.sha256 == sha256_file(manifest.onnx_path)
    assert load_manifest(cfg.out / "classifier.json").sha256 == manifest.sha256
    assert outputs["logit"].shape == (20, 1) and outputs["embedding"].shape == (20, 64)
    with torch.no_grad():
        logit, embedding = model(torch.from_numpy(np.asarray(data.inputs)))
    np.testing.assert_allclose(outputs["logit"], logit.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["embedding"], embedding.numpy(), atol=1e-4)
    assert max(parity.values()) <= 1e-3


def test_int8_variant_is_calibrated_on_training_crops_and_measured_on_the_primary_set(exported):
    cfg, _, data, manifest, outputs, _ = exported
    int8 = int8_variant(cfg, manifest, data, outputs, 0.5)
    path = cfg.out / INT8_FILE
    assert int8["onnx"] == INT8_FILE and int8["sha256"] == sha256_file(path)
    parity = int8["parity"]
    assert parity["images"] == 18  # the first set's images; the second set is training data
    assert parity["held_out_images"] == 8  # its val and test images
    calibration = parity["calibration"]
    assert calibration["images"] == 8 and calibration["float_op_types"] == list(HEAD_OPS)
    assert calibration["tuning"] == {"epochs": 0}  # --int8-tune-epochs 0: calibration only
    assert 0.0 <= parity["same_decision"] <= 1.0 and parity["embedding_cosine_mean"] > 0.9


def test_the_recorded_split_is_checked_on_a_rerun(tmp_path):
    data = _data()
    path = tmp_path / "splits.csv"
    classifier._write_splits(path, data)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "patient_id", "label", "source", "split", "dataset"]
    assert [r["split"] for r in rows] == SPLIT and rows[-1]["dataset"] == "1"
    check_same_split(path, data)  # the same split: fine
    check_same_split(path, replace(data, images=data.images + data.images[:0]))
    moved = data.split.copy()
    moved[[0, 12]] = ["test", "train"]
    with pytest.raises(ConfigError, match="2 images .* fall in another split"):
        check_same_split(path, replace(data, split=moved))


def test_the_segmenter_is_brought_along(tiny_models, tmp_path):
    seg = tiny_models.segmenter
    classifier._copy_segmenter(seg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmenter.json", "segmenter.onnx"]
    assert sha256_file(tmp_path / "segmenter.onnx") == seg.sha256
    before = sorted(p.name for p in seg.directory.iterdir())
    classifier._copy_segmenter(seg, seg.directory)  # already there: nothing to do
    assert sorted(p.name for p in seg.directory.iterdir()) == before


def test_train_classifier_end_to_end_on_synthetic_sets(tiny_models, tmp_path):
    """A 2-step run on two synthetic sets: the FP32 and INT8 exports, the threshold chosen on
    the validation images, the card, splits.csv and the segmenter in the output directory."""
    seg_dir = tmp_path / "seg"
    shutil.copytree(tiny_models.segmenter.directory, seg_dir)
    primary, second = synthetic_sets(tmp_path / "sets")
    cfg = ClassifierTrainConfig(
        labels=primary.labels, images=primary.images, extra=(second,), segmenter=seg_dir,
        out=tmp_path / "out", arch="tiny-classifier", max_steps=2, batch_size=4, epochs=2,
        holdout=0.3, calibration_images=8, int8_tune_epochs=0, threads=1, precision="fp32",
    )  # fmt: skip
    m = classifier.train_classifier(cfg)
    out = cfg.out
    assert m.trained and m.directory == out and 0.0 <= m.threshold <= 1.0
    for name in ("classifier.onnx", INT8_FILE, "segmenter.onnx", "splits.csv", classifier.LOG_FILE):
        assert (out / name).is_file(), name
    assert m.variants["int8"].sha256 == sha256_file(out / INT8_FILE)
    card = load_manifest(out / "classifier.json").card
    assert card["threshold"] == m.threshold and card["status"].startswith("trained")
    assert card["data"]["used"] == 29 and list(card["data"]["skipped"]) == [
        str(primary.images / "images/a5_0.png")
    ]
    assert [s["name"] for s in card["data"]["sets"]] == ["primary", "second"]
    assert card["training"]["epochs_run"] == 1  # --max-steps 2 ends it within the first epoch
    assert {"source_probe", "downscale_agreement", "held_out_by_group"} <= set(card)
    with open(out / "splits.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 29
