"""engine/train/redo.py: redoing a step of a trained classifier directory without retraining:
`cxr train threshold` (the other rule; what depends on the threshold rewritten) and `cxr train
int8` over every labelled set the classifier was trained on, tuning on more crops than it
calibrates on; and the calibration crops' order (engine/train/classifier.calibration_inputs).

One tiny classifier is trained on two labelled sets of real dev images (test_train_multiset's
sets), with the shipped segmenter; everything is written under tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")

from conftest import plain  # noqa: E402
from test_train_multiset import DEV, _config, sets  # noqa: E402, F401
from typer.testing import CliRunner  # noqa: E402

from engine.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def trained(sets, tmp_path_factory):  # noqa: F811
    """A tiny classifier trained on both sets (threshold by Youden's J), with an INT8 export
    calibrated on 6 crops and not tuned."""
    from engine.train.classifier import train_classifier

    tmp = tmp_path_factory.mktemp("redo")
    cfg = _config(sets, tmp, calibration_images=6, int8_tune_epochs=0)
    manifest = train_classifier(cfg)
    return {"models": manifest.directory, "cfg": cfg, "cache": tmp / "cache"}


def _copy(trained, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(trained["models"], models, ignore=shutil.ignore_patterns("crop-cache"))
    return models


def _sets_args(sets) -> list[str]:  # noqa: F811
    return [
        "--labels", str(sets["primary"]), "--labels", str(sets["second"]),
        "--images", str(DEV), "--images", str(DEV / "images"),
    ]  # fmt: skip


def _cxr(*argv: object) -> tuple[int, str]:
    from engine.cli import app

    result = CliRunner().invoke(app, [str(a) for a in argv])
    return result.exit_code, plain(result.output)


def test_config_of_restores_the_cards_holdout_and_exclusions(trained):
    from dataclasses import replace

    from engine.models import load_manifest, manifest_path
    from engine.train.crops import config_of

    m = load_manifest(manifest_path(trained["models"], "classifier"))
    cfg = config_of(m, trained["models"], Path("l.csv"), Path("."), 1)
    assert cfg.holdout == trained["cfg"].holdout == 0.3  # not the default 0.05
    assert cfg.exclude == ()
    card = dict(m.card)
    card["data"] = dict(card["data"]) | {"excluded_from_training": ["nih-chestxray14:0"]}
    cfg = config_of(replace(m, card=card), trained["models"], Path("l.csv"), Path("."), 1)
    assert cfg.exclude == ("nih-chestxray14:0",)
    # what the caller passes wins over the card
    assert config_of(m, trained["models"], Path("l.csv"), Path("."), 1, holdout=0.5).holdout == 0.5


def test_calibration_crops_start_with_the_first_sets_and_grow_by_appending(trained):
    from engine.models import load_manifest, manifest_path
    from engine.train.classifier import calibration_inputs
    from engine.train.redo import reference_outputs

    models = trained["models"]
    cfg = trained["cfg"]
    _, data, _ = reference_outputs(
        models, cfg.labels, cfg.images, extra=cfg.extra, threads=1, cache=trained["cache"]
    )

    clf = load_manifest(manifest_path(models, "classifier"))
    train = data.split == "train"
    n_primary = int((train & (data.dataset == 0)).sum())
    n_train = int(train.sum())
    assert 0 < n_primary < n_train
    few, few_patients = calibration_inputs(data, clf, n_primary + 1, seed=0)
    more, more_patients = calibration_inputs(data, clf, n_train + 3, seed=0)
    # every unaugmented primary crop first, in order, then one of the further set's
    primary_idx = np.flatnonzero(train & (data.dataset == 0))
    np.testing.assert_array_equal(few[:n_primary], data.inputs[primary_idx])
    further = {data.images[i].patient_id for i in np.flatnonzero(train & (data.dataset != 0))}
    assert few_patients[n_primary] in further
    # a larger n keeps the smaller one's crops as its start (calibration is a prefix of tuning)
    np.testing.assert_array_equal(more[: len(few)], few)
    np.testing.assert_array_equal(more_patients[: len(few)], few_patients)
    assert len(more) == n_train + 3  # 3 augmented views past the unaugmented crops
    assert set(more_patients[n_train:]) <= {
        data.images[i].patient_id for i in np.flatnonzero(train)
    }


def test_threshold_by_sensitivity_rewrites_what_depends_on_it(trained, sets, tmp_path):  # noqa: F811
    from engine.models import load_manifest, manifest_path, sha256_file
    from engine.train.metrics import THRESHOLD_RULE, sensitivity_rule

    models = _copy(trained, tmp_path)
    before = load_manifest(manifest_path(models, "classifier"))
    assert before.card["threshold_rule"] == THRESHOLD_RULE
    cache = ["--cache", str(trained["cache"]), "--threads", "1"]
    code, out = _cxr("train", "threshold", "--models", models, *_sets_args(sets), *cache,
                     "--threshold-sensitivity", "1.0")  # fmt: skip
    assert code == 0, out
    after = load_manifest(manifest_path(models, "classifier"))
    assert f"threshold {after.threshold:.4f}" in out
    card = after.card
    assert card["threshold_rule"] == sensitivity_rule(1.0)
    assert card["threshold"] == after.threshold
    assert card["threshold_replaced"]["threshold"] == before.threshold
    assert card["threshold_replaced"]["rule"] == THRESHOLD_RULE
    # the rule holds on the validation patients, and the metrics are taken at the new threshold
    assert card["metrics"]["val"]["all"]["sensitivity"] == 1.0
    assert (
        card["metrics"]["val"]["all"]["roc_auc"] == before.card["metrics"]["val"]["all"]["roc_auc"]
    )
    # the INT8 file is the same; its parity is measured again at the new threshold
    assert after.variants["int8"].sha256 == before.variants["int8"].sha256
    assert sha256_file(models / after.variants["int8"].onnx) == after.variants["int8"].sha256
    assert after.variants["int8"].parity["threshold"] == after.threshold
    assert card["int8"]["parity"]["threshold"] == after.threshold
    assert card["int8"]["parity"]["calibration"] == before.card["int8"]["parity"]["calibration"]
    assert "held_out_by_group" in card
    assert card["downscale_agreement"]["threshold"] == after.threshold
    # the weights are untouched
    assert after.sha256 == before.sha256 == sha256_file(models / after.onnx)

    # back to Youden's J: the same threshold and metrics as training chose
    code, out = _cxr("train", "threshold", "--models", models, *_sets_args(sets), *cache)
    assert code == 0, out
    again = load_manifest(manifest_path(models, "classifier"))
    assert again.threshold == pytest.approx(before.threshold)
    assert again.card["threshold_rule"] == THRESHOLD_RULE
    assert again.card["metrics"] == before.card["metrics"]


def test_test_time_crops_choose_the_threshold_for_the_mean_and_one_crop_undoes_them(
    trained,
    sets,  # noqa: F811
    tmp_path,
):
    from engine.models import load_manifest, load_models, manifest_path
    from engine.train.data import box_transforms

    models = _copy(trained, tmp_path)
    before = load_manifest(manifest_path(models, "classifier"))
    cache = ["--cache", str(trained["cache"]), "--threads", "1"]
    code, out = _cxr("train", "threshold", "--models", models, *_sets_args(sets), *cache,
                     "--test-time-crops", "3", "--tta-seed", "5")  # fmt: skip
    assert code == 0, out
    assert "3 test-time crops" in out
    after = load_manifest(manifest_path(models, "classifier"))
    aug = before.card["training"]["augmentation"]
    assert after.tta == box_transforms(3, 5, scale=aug["box_scale"], shift=aug["box_shift"])
    assert after.card["test_time_crops"]["crops"] == 3
    assert after.card["test_time_crops"]["seed"] == 5
    assert after.sha256 == before.sha256  # the weights are untouched
    # every figure is of the mean over the crops: other validation scores than one crop's
    assert after.card["metrics"]["val"]["all"]["roc_auc"] is not None
    val_before, val_after = before.card["metrics"]["val"], after.card["metrics"]["val"]
    assert val_after != val_before
    assert after.card["downscale_agreement"]["threshold"] == after.threshold
    assert "/tta3@" in load_models(models).model_id
    # --test-time-crops 1: back to one crop, the threshold and metrics training chose
    code, out = _cxr("train", "threshold", "--models", models, *_sets_args(sets), *cache,
                     "--test-time-crops", "1")  # fmt: skip
    assert code == 0, out
    again = load_manifest(manifest_path(models, "classifier"))
    assert again.tta == () and "test_time_crops" not in again.card
    assert again.threshold == pytest.approx(before.threshold)
    assert again.card["metrics"] == before.card["metrics"]
    code, out = _cxr("train", "threshold", "--models", models, *_sets_args(sets), *cache,
                     "--test-time-crops", "0")  # fmt: skip
    assert code == 1 and "--test-time-crops must be at least 1, not 0" in out


def test_redo_needs_every_set_the_classifier_was_trained_on(trained, sets, tmp_path):  # noqa: F811
    from engine.train.datasets import LabelSet
    from engine.train.redo import requantize_int8, rethreshold

    models = _copy(trained, tmp_path)
    for redo in (requantize_int8, rethreshold):
        with pytest.raises(ConfigError, match=r"trained on 2 labelled set\(s\).*not 1"):
            redo(models, (LabelSet(sets["primary"], DEV),), threads=1, cache=trained["cache"])
    code, out = _cxr("train", "int8", "--models", models, "--labels", sets["primary"],
                     "--images", DEV, "--threads", "1")  # fmt: skip
    assert code == 1 and "give --labels (and --images) for each" in out


def test_int8_over_both_sets_tunes_on_more_crops_than_it_calibrates_on(trained, sets, tmp_path):  # noqa: F811
    from engine.models import load_manifest, manifest_path, sha256_file

    models = _copy(trained, tmp_path)
    before = load_manifest(manifest_path(models, "classifier"))
    code, out = _cxr("train", "int8", "--models", models, *_sets_args(sets),
                     "--cache", trained["cache"], "--calibration-images", 4, "--tune-images", 9,
                     "--int8-tune-epochs", 1, "--threads", 1)  # fmt: skip
    assert code == 0, out
    assert "same decision as FP32" in out and "embedding cosine min" in out
    after = load_manifest(manifest_path(models, "classifier"))
    cal = after.card["int8"]["parity"]["calibration"]
    assert cal["images"] == 4 and cal["tuning"]["images"] == 9 and cal["tuning"]["epochs"] == 1
    assert (after.sha256, after.threshold) == (before.sha256, before.threshold)
    assert after.variants["int8"].sha256 == sha256_file(models / after.variants["int8"].onnx)
    # parity is measured on the first set's labelled images only
    assert after.card["int8"]["parity"]["images"] == 16
    # a bad tuning-set size is refused before any work
    code, out = _cxr("train", "int8", "--models", models, *_sets_args(sets),
                     "--tune-images", 0, "--threads", 1)  # fmt: skip
    assert code == 1 and "--tune-images must be at least 1" in out
    code, out = _cxr("train", "int8", "--models", models, *_sets_args(sets),
                     "--float-ends", -1, "--threads", 1)  # fmt: skip
    assert code == 1 and "--int8-float-ends must be 0 or more" in out


def test_requantize_needs_a_trained_fp32_classifier(tiny_models, tmp_path):
    from engine.train.datasets import LabelSet
    from engine.train.redo import requantize_int8

    with pytest.raises(ConfigError, match="needs the trained FP32 classifier .* untrained, fp32"):
        requantize_int8(tiny_models.classifier.directory, (LabelSet(tmp_path / "l.csv", tmp_path),))


def test_the_test_time_crops_benchmark_scores_one_crop_and_k_crops(trained, sets):  # noqa: F811
    from benchmarks import tta_crops
    from engine.eval.metrics import roc_auc

    pairs = [(sets["primary"], DEV), (sets["second"], DEV / "images")]
    s = tta_crops.score(trained["models"], pairs, crops=[2, 3], seeds=2, threads=1)
    held = tta_crops.held_images(trained["models"], pairs)
    assert len(s["one"]) == len(held) and {im.path.suffix for im, _ in held} <= {".png", ".jpg"}
    assert set(s["part"].tolist()) <= {"val", "test", "holdout"} and "val" in s["part"]
    assert set(s["many"]) == {(2, 0), (2, 1), (3, 0), (3, 1)}
    assert s["spread"].shape == (3, len(held))  # the largest K's crops, one row each
    # seed 0's K crops are box_transforms(K, 0): their mean logit is the mean of the rows
    np.testing.assert_allclose(s["many"][(3, 0)], s["spread"].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(s["many"][(2, 0)], s["one"])
    summary = tta_crops.summarise(s, [2, 3], 2, resamples=30)
    dev = (s["part"] == "val") | (s["part"] == "test")
    if "val+test" in summary["roc_auc"]:
        row = summary["roc_auc"]["val+test"]
        assert row["images"] == int(dev.sum())
        assert row["one_crop"] == roc_auc(s["label"][dev], s["one"][dev])
        assert row["crops_2"]["min"] <= row["crops_2"]["mean"] <= row["crops_2"]["max"]
        d = summary["paired_difference"]["crops_2 val+test"]
        assert d["diff"] == pytest.approx(
            roc_auc(s["label"][dev], s["many"][(2, 0)][dev]) - row["one_crop"]
        )
    sp = summary["probability_spread"]
    assert sp["crops"] == 3 and 0 <= sp["median"] <= sp["p90"] <= sp["max"] <= 1
    text = tta_crops.format_table(summary, [2, 3])
    assert "| images | n | one crop | 2 crops | 3 crops |" in text
