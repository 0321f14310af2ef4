"""engine.train.segmenter: `cxr train segmenter`'s options, the patient split (the classifier's
when its labels are given), segmenter inputs made by the serving pipeline with masks at the
segmenter's size, the loss, the served Dice per split, and a whole (3-step) training of the tiny
U-Net: its files, card and split file.

Synthetic image/mask pairs (`mask_pairs`, shared with test_segmenter_int8.py) under tmp_path;
short trainings on real pairs: tests/train/test_train.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import write_csv, write_png

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from engine.errors import ConfigError  # noqa: E402
from engine.train import segmenter  # noqa: E402
from engine.train.data import MaskPair, find_mask_pairs, labels_split  # noqa: E402
from engine.train.segmenter import (  # noqa: E402
    SegData,
    SegmenterTrainConfig,
    assign_splits,
    decode_pairs,
    predict_masks,
    served_dice,
    soft_dice_loss,
)
from engine.train.specs import segmenter_manifest  # noqa: E402
from engine.train.splits import SPLITS  # noqa: E402
from engine.train.unet import build_unet  # noqa: E402

SEG = segmenter_manifest("tiny-unet", trained=False)


def mask_pairs(root: Path, n: int, *, label_csv: bool = True) -> Path:
    """root/index.csv over n image/mask pairs of n patients (m0, m1, ...): noise images with a
    bright block, the block as the mask. Returns the index."""
    rows = []
    for i in range(n):
        image = write_png(root / "images" / f"m{i}.png", seed=100 + i)
        with Image.open(image) as im:
            pixels = np.asarray(im)
        mask = np.where(pixels > 150, 255, 0).astype(np.uint8)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"m{i}_mask.png")
        row = {
            "image_path": f"images/m{i}.png",
            "mask_path": f"masks/m{i}_mask.png",
            "patient_id": f"m{i}",
        }
        if label_csv:
            row |= {"label": str(i % 2), "source": "site-m"}
        rows.append(row)
    return write_csv(root / "index.csv", rows)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "tiny-classifier"}, "--arch must be one of"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 1}, "--batch-size must be at least 2"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"teacher": Path("models")}, "--teacher and --teacher-images go together"),
        ({"teacher_images": Path("pool")}, "--teacher and --teacher-images go together"),
        ({"teacher_per_epoch": 0}, "--teacher-per-epoch must be >= 1"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        SegmenterTrainConfig(masks=Path("m"), out=Path("o"), **options)
    assert SegmenterTrainConfig(masks=Path("m"), out=Path("o")).arch == "unet"


def test_splits_are_the_classifier_s_when_its_labels_are_given(tmp_path, capsys):
    from engine.train.splits import fallback_split

    labels = write_csv(
        tmp_path / "labels.csv",
        [{"path": f"{i}.png", "label": i % 2, "patient_id": f"p{i}"} for i in range(20)],
    )
    pairs = [MaskPair(Path(f"{p}.png"), Path("m.png"), p, None, "") for p in ("p1", "p7", "zz")]
    split, rule = assign_splits(pairs, labels, seed=4)
    shared = labels_split(labels, 4)
    assert split == [shared["p1"], shared["p7"], fallback_split("zz", 4)]
    assert "split_patients over the patients of" in rule and "seed 4" in rule
    assert "1 mask patient(s) are not in" in capsys.readouterr().err
    # no labels: the mask patients alone, with a warning to pass the classifier's labels
    many = [MaskPair(Path(f"{i}.png"), Path("m.png"), f"q{i}", i % 2, "s") for i in range(12)]
    alone, rule = assign_splits(many, None, seed=0)
    assert set(alone) == set(SPLITS) and rule == "split_patients over the mask patients (seed 0)"
    assert "no --labels given" in capsys.readouterr().err
    assert assign_splits(many, None, seed=0)[0] == alone


def test_soft_dice_loss():
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    inverse = -perfect
    assert soft_dice_loss(inverse, target).item() == pytest.approx(
        1 - 1 / 17, abs=1e-4
    )  # no overlap: 1 / (12 + 4 + 1)
    half = torch.zeros(2, 1, 4, 4)  # p = 0.5 everywhere: 2 * 2 + 1 / (8 + 4 + 1)
    assert soft_dice_loss(half, target).item() == pytest.approx(1 - 5 / 13, abs=1e-6)


def test_predict_masks_thresholds_logits_at_zero():
    torch.manual_seed(0)
    model = build_unet("tiny-unet")
    x = np.random.default_rng(0).normal(size=(20, 1, 16, 16)).astype(np.float32)
    pred = predict_masks(model, x, "fp32")
    assert pred.dtype == bool and pred.shape == (20, 1, 16, 16) and not model.training
    with torch.no_grad():
        np.testing.assert_array_equal(pred, model(torch.from_numpy(x)).numpy() >= 0)


def test_decode_pairs_gives_served_inputs_and_masks_and_drops_bad_images(tmp_path):
    index = mask_pairs(tmp_path, 5)
    (tmp_path / "images" / "m3.png").write_bytes(b"broken")
    pairs = find_mask_pairs(index)
    data, skipped = decode_pairs(pairs, ["train", "val", "test", "train", "val"], SEG, 1)
    assert [p.patient_id for p in data.pairs] == ["m0", "m1", "m2", "m4"]
    assert data.split.tolist() == ["train", "val", "test", "val"]
    assert list(skipped) == [str(tmp_path / "images" / "m3.png")]
    assert data.x.shape == (4, 1, 64, 64) and data.x.dtype == np.float32
    assert data.masks.shape == (4, 1, 64, 64) and set(np.unique(data.masks)) <= {0.0, 1.0}
    # the input is what the engine feeds the segmenter
    from engine.models import ModelSet
    from engine.train.data import decode_all
    from engine.train.specs import classifier_manifest

    models = ModelSet(segmenter=SEG, classifier=classifier_manifest("tiny-classifier"))
    served = decode_all([pairs[i].image for i in (0, 1, 2, 4)], models, threads=1)
    np.testing.assert_array_equal(data.x, served.seg_input)


def test_served_dice_per_split_of_the_exported_model(tmp_path):
    from engine.train.export import to_onnx

    torch.manual_seed(0)
    model = build_unet("tiny-unet").eval()
    x = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    proto = to_onnx(
        model,
        torch.from_numpy(x[:2]),
        output_names=["mask_logit"],
        architecture="tiny-unet",
        doc="t",
    )
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy() >= 0
    masks = pred.astype(np.float32)
    masks[4:] = 1 - masks[4:]  # the test images: the opposite mask
    pairs = [MaskPair(Path(f"{i}.png"), Path("m"), f"p{i // 2}", None, "") for i in range(6)]
    data = SegData(pairs, np.array(["train", "train", "val", "val", "test", "test"]), x, masks)
    dice = served_dice(proto.SerializeToString(), data, 1, seed=0, resamples=50)
    assert list(dice) == list(SPLITS)
    assert dice["train"]["mean"] == pytest.approx(1.0) and dice["val"]["mean"] == pytest.approx(1.0)
    assert dice["test"]["mean"] == pytest.approx(0.0)
    assert dice["train"]["images"] == 2 and dice["train"]["patients"] == 1
    assert dice["test"]["ci95"]["resamples"] == 50
    only = SegData(pairs[:2], np.array(["val", "val"]), x[:2], masks[:2])
    assert list(served_dice(proto.SerializeToString(), only, 1, seed=0, resamples=10)) == ["val"]


def test_a_split_without_images_is_refused(tmp_path):
    index = mask_pairs(tmp_path, 2, label_csv=False)  # 2 patients: no test part
    cfg = SegmenterTrainConfig(masks=index, out=tmp_path / "o", arch="tiny-unet", threads=1)
    with pytest.raises(ConfigError, match=r"no \w+ images after the patient split"):
        segmenter.load_data(cfg)


def test_train_segmenter_writes_the_model_its_card_splits_and_log(tmp_path):
    index = mask_pairs(tmp_path / "pairs", 8)
    labels = write_csv(
        tmp_path / "labels.csv",
        [{"path": f"{i}.png", "label": i % 2, "patient_id": f"m{i}"} for i in range(8)],
    )
    out = tmp_path / "out"
    (out).mkdir()
    (out / "classifier.json").write_text("{}")  # a classifier trained on the old segmenter
    cfg = SegmenterTrainConfig(
        masks=index, out=out, labels=labels, arch="tiny-unet", max_steps=3, batch_size=2,
        epochs=2, threads=1, precision="fp32",
    )  # fmt: skip
    m = segmenter.train_segmenter(cfg)
    assert m.trained and m.architecture == "tiny-unet" and m.onnx_path == out / "segmenter.onnx"
    from engine.models import load_manifest, sha256_file

    assert load_manifest(out / "segmenter.json").sha256 == sha256_file(out / "segmenter.onnx")
    card = m.card
    assert card["data"]["pairs"] == 8 and card["splits"]["seed"] == 0
    assert set(card["metrics"]["dice"]) == set(SPLITS)
    assert max(card["export_parity_max_rel_diff"].values()) <= 1e-3
    counts = card["splits"]["counts"]
    assert sum(c["images"] for c in counts.values()) == 8
    with open(out / segmenter.SPLITS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    shared = labels_split(labels, 0)
    assert [r["split"] for r in rows] == [shared[r["patient_id"]] for r in rows]
    log = json.loads((out / segmenter.LOG_FILE).read_text())
    assert (
        log["history"][-1]["steps"] == 3 and log["best_epoch"] == m.card["training"]["best_epoch"]
    )


def test_with_a_teacher_the_pool_trains_beside_the_pairs_and_the_card_says_so(
    tmp_path, tiny_models_dir
):
    index = mask_pairs(tmp_path / "pairs", 8)
    labels = write_csv(
        tmp_path / "labels.csv",
        [{"path": f"{i}.png", "label": i % 2, "patient_id": f"m{i}"} for i in range(8)],
    )
    images = [write_png(tmp_path / "pool" / f"p{i}.png", seed=500 + i) for i in range(6)]
    cfg = SegmenterTrainConfig(
        masks=index, out=tmp_path / "out", labels=labels, arch="tiny-unet", batch_size=2,
        epochs=2, threads=1, precision="fp32", teacher=tiny_models_dir,
        teacher_images=tmp_path / "pool", teacher_per_epoch=4, cache=tmp_path / "cache",
    )  # fmt: skip
    m = segmenter.train_segmenter(cfg)
    card = m.card["training"]["distillation"]
    assert card["pool"] == 6 and card["held_out"] == 1 and card["per_epoch"] == 4
    assert card["teacher"]["sha256"] == load_manifest_of(tiny_models_dir).sha256
    log = json.loads((tmp_path / "out" / segmenter.LOG_FILE).read_text())
    n_train = m.card["splits"]["counts"]["train"]["images"]
    first = log["history"][0]
    assert first["steps"] == (n_train + 4) // 2  # every training pair + 4 pool images, batch 2
    assert 0.0 <= first["teacher_dice"] <= 1.0
    assert 0.0 <= first["teacher_box_iou_min"] <= first["teacher_box_iou_mean"] <= 1.0
    assert list((tmp_path / "cache").glob("teacher-*.npz")) and len(images) == 6


def test_a_pool_holding_the_mask_images_is_refused(tmp_path, tiny_models_dir):
    index = mask_pairs(tmp_path / "pairs", 8, label_csv=False)
    cfg = SegmenterTrainConfig(
        masks=index, out=tmp_path / "out", arch="tiny-unet", threads=1,
        teacher=tiny_models_dir, teacher_images=tmp_path / "pairs" / "images",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"holds 8 image\(s\) of the mask pairs"):
        segmenter.train_segmenter(cfg)


def load_manifest_of(models: Path):
    from engine.models import load_manifest, manifest_path

    return load_manifest(manifest_path(models, "segmenter"))
