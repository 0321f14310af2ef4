"""engine.train: short real training runs (segmenter.py, classifier.py, data.py), their INT8
exports (segmenter_int8.py, export.py), train/serve skew, what the cards record, and errors.
The patient split, the export's parity, the metrics and the command's options have their own
files: test_splits, test_train_export, test_train_metrics, test_train_cli; so does each trainer
module's unit behaviour on synthetic data (test_data, test_segmenter, test_segmenter_int8,
test_classifier, ...).

The trainings run the tiny architectures for 3 steps on 8 real mask pairs and 16 real CXRs of
../shared/data, through the same typer functions `cxr train ...` calls; everything is written
under tmp_path.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")

import typer  # noqa: E402
from conftest import DATA, plain  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from engine.train.splits import SPLITS  # noqa: E402

MASKS = DATA / "lung-masks"
DEV = DATA / "cxr-dev"


def _require_train_data() -> None:
    for path in (MASKS / "index.csv", DEV / "labels.csv"):
        if not path.is_file():
            pytest.skip(f"real data not found at {path}: check out shared/ beside the repository")


def _train_app() -> typer.Typer:
    """The commands as the lead registers them: `cxr train segmenter|classifier|int8`."""
    from engine.train.cli import train_classifier, train_int8, train_segmenter

    app = typer.Typer()
    app.command("segmenter")(train_segmenter)
    app.command("classifier")(train_classifier)
    app.command("int8")(train_int8)
    return app


def run_train(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(_train_app(), [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, plain(result.output)


def _screens_all(images, models: Path, out: Path) -> None:
    """`cxr screen` of the images with a models directory: every row ok."""
    from engine.config import ScreenConfig
    from engine.io import parquet
    from engine.runner import screen

    summary = screen(
        ScreenConfig(
            inputs=tuple(images), out=out, models=models, batch_size=4, threads=2, progress=False
        )
    )
    assert summary.ok == len(images) and summary.errors == 0
    status = parquet.read_predictions(out, ["status"])["status"].to_list()
    assert status == ["ok"] * len(images)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> dict[str, Path]:
    """8 mask pairs of 8 different patients, and 16 labelled CXRs: those 8 positives plus
    4 ieee8023 and 4 NIH negatives (distinct patients), as CSVs under tmp."""
    _require_train_data()
    out = tmp_path_factory.mktemp("train-data")
    masks = _read_csv(MASKS / "index.csv")
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for row in masks:
        if row["patient_id"] not in seen and len(pairs) < 8:
            seen.add(row["patient_id"])
            pairs.append(
                {
                    **row,
                    "image_path": str(MASKS / row["image_path"]),
                    "mask_path": str(MASKS / row["mask_path"]),
                }
            )
    labels = _read_csv(DEV / "labels.csv")
    wanted = {p["dev_path"].removeprefix("cxr-dev/") for p in pairs}
    rows = [r for r in labels if r["path"] in wanted]
    for source in ("ieee8023", "nih-chestxray14"):
        negatives = [r for r in labels if r["label"] == "0" and r["source"] == source]
        for r in negatives:
            if (
                r["patient_id"] not in seen
                and sum(x["source"] == source and x["label"] == "0" for x in rows) < 4
            ):
                seen.add(r["patient_id"])
                rows.append(r)
    _write_csv(out / "index.csv", pairs)
    _write_csv(out / "labels.csv", rows)
    return {"masks": out / "index.csv", "labels": out / "labels.csv", "images": DEV}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def trained(subset, tmp_path_factory) -> dict[str, Path]:
    """Tiny segmenter and classifier, 3 steps each, through the CLI functions."""
    seg_dir = tmp_path_factory.mktemp("seg")
    clf_dir = tmp_path_factory.mktemp("clf")
    code, out = run_train(
        "segmenter",
        "--masks",
        subset["masks"],
        "--labels",
        subset["labels"],
        "--out",
        seg_dir,
        "--arch",
        "tiny-unet",
        "--max-steps",
        3,
        "--batch-size",
        4,
        "--threads",
        2,
    )
    assert code == 0, out
    code, out = run_train(
        "classifier",
        "--labels",
        subset["labels"],
        "--images",
        subset["images"],
        "--segmenter",
        seg_dir,
        "--out",
        clf_dir,
        "--arch",
        "tiny-classifier",
        "--max-steps",
        3,
        "--batch-size",
        4,
        "--calibration-images",
        24,
        "--threads",
        2,
    )
    assert code == 0, out
    return {"segmenter": seg_dir, "classifier": clf_dir, **subset}


# --- training runs -------------------------------------------------------------------------------


def test_trained_models_load_and_screen(trained, tmp_path):
    from engine.models import load_models

    models = load_models(trained["classifier"])
    assert models.trained
    assert models.classifier.architecture == "tiny-classifier"
    assert models.segmenter.architecture == "tiny-unet"
    assert 0.0 <= models.classifier.threshold <= 1.0
    card = models.classifier.card
    assert card["threshold"] == models.classifier.threshold and card["threshold_rule"]
    assert set(card["splits"]["counts"]) == set(SPLITS)
    assert models.segmenter.card["metrics"]["dice"]["test"]["images"] >= 1

    images = sorted((DEV / "images").glob("*"))[:4]
    _screens_all(images, trained["classifier"], tmp_path / "out")


def test_a_cheaper_segmenter_trains_and_screens_beside_the_shipped_classifier(subset, tmp_path):
    """issue 17: `cxr train segmenter --arch unet-s8-128` (base 8, input 128: about 1/16 of the
    U-Net's MACs) exports the table's input size, and `cxr screen` runs it with the shipped
    ResNet50, whose crops come from the same 512 px work image as before."""
    import shutil

    from engine.models import PACKAGED_MODELS, load_models

    if not (PACKAGED_MODELS / "classifier.json").is_file():
        pytest.skip("no shipped classifier")
    out = tmp_path / "models"
    args = ["--masks", subset["masks"], "--labels", subset["labels"], "--out", out]
    args += ["--arch", "unet-s8-128", "--max-steps", 2, "--batch-size", 4, "--threads", 1]
    code, text = run_train("segmenter", *args)
    assert code == 0, text
    clf = load_models(None).classifier
    for name in ("classifier.json", clf.onnx):
        shutil.copy(PACKAGED_MODELS / name, out / name)
    models = load_models(out)
    assert models.segmenter.architecture == "unet-s8-128"
    assert models.segmenter.preprocess.size == (128, 128)
    assert models.segmenter.card["training"]["max_steps"] == 2
    assert models.classifier.crop.source_size == 512

    _screens_all(sorted((DEV / "images").glob("*"))[:3], out, tmp_path / "out")


def test_splits_files_share_patients(trained):
    """No classifier val/test patient is a segmenter training patient."""
    with open(trained["classifier"] / "splits.csv", newline="") as f:
        clf = list(csv.DictReader(f))
    with open(trained["segmenter"] / "segmenter_splits.csv", newline="") as f:
        seg_train = {r["patient_id"] for r in csv.DictReader(f) if r["split"] == "train"}
    by_patient = defaultdict(set)
    for r in clf:
        by_patient[r["patient_id"]].add(r["split"])
    assert all(len(parts) == 1 for parts in by_patient.values())
    assert not {p for p, parts in by_patient.items() if parts & {"val", "test"}} & seg_train
    assert (trained["classifier"] / "classifier_train_log.json").is_file()
    log = json.loads((trained["segmenter"] / "segmenter_train_log.json").read_text())
    assert log["history"] and log["history"][-1]["steps"] == 3


def test_segmenter_dice_has_patient_intervals_that_the_entry_point_recomputes(trained):
    """The card's per-split Dice carries a patient-bootstrap interval, and
    engine.eval.segmentation reproduces every stored number from segmenter_splits.csv."""
    from engine.eval.segmentation import recompute
    from engine.models import load_manifest

    metrics = load_manifest(trained["segmenter"] / "segmenter.json").card["metrics"]
    assert "resampling its patients" in metrics["definition"]
    for d in metrics["dice"].values():
        assert d["patients"] == d["images"]  # the subset's 8 pairs are 8 patients
        assert d["ci95"]["low"] <= d["mean"] <= d["ci95"]["high"]
        assert d["ci95"]["valid_resamples"] == d["ci95"]["resamples"] == 2000
    result = recompute(trained["segmenter"], trained["masks"], threads=2)
    assert result.differences() == []
    assert result.dice == metrics["dice"]
    assert result.definition == metrics["definition"]


def test_int8_variant_recorded(trained):
    from engine.models import choose_precision, load_models, sha256_file
    from engine.runtime.onnxrt import OnnxRuntimeBackend

    clf = load_models(trained["classifier"], precision="fp32").classifier
    int8 = clf.card["int8"]
    path = clf.directory / int8["onnx"]
    assert path.is_file() and sha256_file(path) == int8["sha256"]
    parity = int8["parity"]
    assert parity["images"] == 16
    assert 0.0 <= parity["same_decision"] <= 1.0
    assert -1.0 <= parity["embedding_cosine_min"] <= parity["embedding_cosine_mean"] <= 1.0
    assert parity["embedding_cosine_mean"] > 0.9  # INT8 of the same weights, not another model
    # held-out: the images of val and test, which calibration and tuning never saw
    held = sum(c["images"] for k, c in clf.card["splits"]["counts"].items() if k != "train")
    assert parity["held_out_images"] == held and 0.0 <= parity["same_decision_held_out"] <= 1.0
    tuning = parity["calibration"]["tuning"]
    assert tuning["epochs"] == 12 and tuning["images"] == 24 and tuning["learn_scales"]
    assert np.isfinite([tuning["objective_before"], tuning["objective_after"]]).all()
    assert parity["calibration"]["float_op_types"] == ["GlobalAveragePool", "Flatten", "Gemm"]
    # The engine's variant entry points at the same file, and the engine can run it.
    assert clf.variants["int8"].sha256 == int8["sha256"]
    q = choose_precision(clf, "int8")
    assert q.onnx == int8["onnx"] and q.precision == "int8"
    with OnnxRuntimeBackend(q, threads=1) as backend:
        out = backend.infer({"image": np.zeros((2, 1, 64, 64), np.float32)})
    assert out["logit"].shape == (2, 1) and out["embedding"].shape == (2, 64)


def test_train_int8_redoes_the_int8_export_only(trained, tmp_path):
    """`cxr train int8` recalibrates and retunes a trained directory's INT8 export: the FP32
    model, threshold and split stay; the manifest's int8 entries follow the new file."""
    import shutil

    from engine.models import load_manifest, sha256_file

    models = tmp_path / "models"
    shutil.copytree(trained["classifier"], models)
    before = load_manifest(models / "classifier.json")
    args = ["int8", "--models", models, "--labels", trained["labels"]]
    args += ["--images", trained["images"], "--calibration-images", 20]
    code, out = run_train(*args, "--int8-tune-epochs", 0, "--threads", 1)
    assert code == 0, out
    assert "same decision as FP32" in out
    after = load_manifest(models / "classifier.json")
    assert (after.sha256, after.threshold) == (before.sha256, before.threshold)
    int8 = after.card["int8"]
    assert int8["parity"]["calibration"]["images"] == 20
    assert int8["parity"]["calibration"]["tuning"] == {"epochs": 0}
    assert after.variants["int8"].sha256 == int8["sha256"] == sha256_file(models / int8["onnx"])
    assert after.card["splits"] == before.card["splits"]

    # a split other than the trained one is refused, not silently calibrated on test images
    splits = models / "splits.csv"
    rows = _read_csv(splits)
    for row in rows:
        row["split"] = "test" if row["split"] == "train" else "train"
    _write_csv(splits, rows)
    code, out = run_train(*args, "--int8-tune-epochs", 0, "--threads", 1)
    assert code == 1 and "fall in another split than the classifier was trained on" in out


def test_int8_export_keeps_the_calibrated_file_when_the_mirror_cannot_run_it(
    trained, tmp_path, monkeypatch
):
    import shutil

    from engine.errors import ModelError
    from engine.models import load_manifest
    from engine.train import classifier

    def refuse(*args, **kwargs):
        raise ModelError("INT8 tuning: ops not mirrored: HardSwish")

    monkeypatch.setattr(classifier, "tune_int8", refuse)
    models = tmp_path / "models"
    shutil.copytree(trained["classifier"], models)
    args = ["int8", "--models", models, "--labels", trained["labels"], "--images"]
    code, out = run_train(*args, trained["images"], "--calibration-images", 8, "--threads", 1)
    assert code == 0, out
    tuning = load_manifest(models / "classifier.json").card["int8"]["parity"]["calibration"]
    assert tuning["tuning"] == {
        "epochs": 0,
        "skipped": "INT8 tuning: ops not mirrored: HardSwish",
        # the head refit runs all the same; 8 crops are too few for its cross-validation
        "head_refit": {"refit": False, "why": "8 crops are too few to cross-validate"},
    }


def test_training_crop_equals_served_crop(trained):
    """No train/serve skew: the crop cache holds exactly the classifier input `cxr screen` builds
    for the same image (decode, segmenter, box, crop, normalise), and with augmentation off a
    training batch equals it up to the cache's uint8 rounding."""
    from engine.models import load_models
    from engine.pipeline import Preprocessor
    from engine.runtime.onnxrt import OnnxRuntimeBackend
    from engine.stages.crop import lung_crops
    from engine.stages.segment import segment
    from engine.train.augment import CropAugment
    from engine.train.classifier import ClassifierTrainConfig, load_data, train_batch
    from engine.train.data import read_sample

    models = load_models(trained["classifier"])
    cfg = ClassifierTrainConfig(
        labels=trained["labels"],
        images=trained["images"],
        segmenter=trained["classifier"],
        out=trained["classifier"],
        arch="tiny-classifier",
        threads=2,
    )
    data, _ = load_data(cfg, models.segmenter)
    idx = np.arange(5)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    train_x = train_batch(data, idx, models.classifier, CropAugment.off(), rng, gen).numpy()

    pre = Preprocessor(models, batch_size=5, threads=2).run(
        [read_sample(data.images[i].path) for i in idx]
    )
    with OnnxRuntimeBackend(models.segmenter, threads=2) as seg:
        logits = segment(seg, models.segmenter, pre.seg_input)
    served = lung_crops(pre.work, logits, models.segmenter, models.classifier).classifier_input
    assert train_x.shape == served.shape == (5, 1, 64, 64)
    # the crop cache's unaugmented inputs (validation, threshold, metrics, parity) are the
    # served ones; training crops are cut from its uint8 working images, so they differ from
    # the served ones by the rounding alone (half a grey level, in units of the manifest's std)
    np.testing.assert_allclose(data.inputs[idx], served, atol=1e-6, rtol=0)
    std = models.classifier.preprocess.std[0]
    np.testing.assert_allclose(train_x, served, atol=0.5 / 255 / std + 1e-6, rtol=0)
    # ... and the augmentation really changes the crop when it is on.
    on = train_batch(data, idx, models.classifier, CropAugment(), rng, gen).numpy()
    assert np.abs(on - served).max() > 1e-2


# --- errors and records -------------------------------------------------------------------------


def test_segmenter_dir_without_manifest_is_a_clear_error(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\na.png,1,p1\n")
    code, out = run_train(
        "classifier",
        "--labels",
        labels,
        "--images",
        tmp_path,
        "--segmenter",
        tmp_path,
        "--out",
        tmp_path / "o",
    )
    assert code == 1 and "no segmenter.json" in out and "cxr train segmenter" in out


def test_missing_columns_are_a_clear_error(trained, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,1\n")
    code, out = run_train(
        "classifier",
        "--labels",
        bad,
        "--images",
        tmp_path,
        "--segmenter",
        trained["segmenter"],
        "--out",
        tmp_path / "o",
    )
    assert code == 1 and "bad.csv" in out and "path" in out and "patient_id" in out
    code, out = run_train("segmenter", "--masks", bad, "--out", tmp_path / "o")
    assert code == 1 and "bad.csv" in out and "image_path" in out and "mask_path" in out
    assert not (tmp_path / "o").exists()


def test_mask_folder_without_pairs_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    code, out = run_train("segmenter", "--masks", tmp_path, "--out", tmp_path / "o")
    assert code == 1 and "no image/mask pairs found" in out


def test_card_records_the_source_probe_and_downscale_agreement(trained):
    from engine.models import load_manifest

    card = load_manifest(trained["classifier"] / "classifier.json").card
    probe = card["source_probe"]
    # the subset's negatives come from two sources (ieee8023, NIH): the probe runs on them
    assert "label=0" in probe and 0.0 <= probe["label=0"]["roc_auc"] <= 1.0
    down = card["downscale_agreement"]
    test_images = card["splits"]["counts"]["test"]["images"]
    assert down["side"] == 224 and down["images"] + down["failed"] == test_images
    assert 0.0 <= down["same_decision"] <= 1.0


def test_segmenter_int8_export_records_box_and_dice_parity(trained, tmp_path):
    """issue 17: the segmenter's INT8 export is judged on the lung box (IoU with FP32 on every
    labelled image) and on Dice against held-out masks; auto takes it only within that bar and
    on a CPU with VNNI/AMX."""
    import shutil
    from dataclasses import replace as _replace

    from engine.cpu import parse_cpuinfo
    from engine.models import choose_precision, load_manifest, sha256_file
    from engine.train.segmenter_int8 import box_iou, export_segmenter_int8

    models = tmp_path / "m"
    shutil.copytree(trained["classifier"], models)
    parity = export_segmenter_int8(
        models, trained["masks"], trained["labels"], trained["images"], threads=1
    )
    seg = load_manifest(models / "segmenter.json")
    v = seg.variants["int8"]
    assert v.sha256 == sha256_file(models / v.onnx) and v.parity == parity
    assert parity["images"] == 16 and 0 < parity["mask_images"] < 8
    assert 0.0 <= parity["box_iou_min"] <= parity["box_iou_mean"] <= 1.0
    assert parity["dice_drop"] == pytest.approx(parity["dice_fp32"] - parity["dice_int8"])
    assert parity["calibration"]["images"] + parity["mask_images"] <= 8  # train vs held out

    vnni = parse_cpuinfo("flags\t\t: avx2 avx512_vnni\n")
    good = {**parity, "box_iou_min": 0.97, "dice_drop": 0.001}
    for bad in ({"box_iou_min": 0.94}, {"dice_drop": 0.006}):
        m = _replace(seg, variants={"int8": _replace(v, parity={**good, **bad})})
        assert choose_precision(m, "auto", vnni).precision == "fp32"
    m = _replace(seg, variants={"int8": _replace(v, parity=good)})
    assert choose_precision(m, "auto", vnni).precision == "int8"
    a = np.array([[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]], np.float32)
    b = np.array([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 0.6, 0.6]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [0.5, 0.0], atol=1e-6)
