"""Redo a step after training in a `cxr train classifier` directory, without retraining: the
INT8 export (`cxr train int8`: a better recipe, more crops) or the threshold (`cxr train
threshold`: the other rule). Both rebuild the directory's own crops and split (the seed, the
further sets' hold-out and the groups left out of training as its card records them, checked
against its splits.csv) and score them with its FP32 export, which stays as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.models import Manifest, Variant, load_manifest, manifest_path, save_manifest
from engine.train.augment import CropAugment
from engine.train.classifier import SPLITS_FILE, evaluate, first_set_parity, int8_variant
from engine.train.classifier_config import ClassifierTrainConfig
from engine.train.classifier_fit import CropData
from engine.train.crops import config_of, load_data, load_segmenter, recorded_splits, split_keys
from engine.train.data import box_transforms, log
from engine.train.datasets import LabelSet
from engine.train.export import ort_run, ort_session
from engine.train.generalisation import from_training, served_outputs


def reference_outputs(
    trained: Path,
    labels: Path,
    images: Path,
    *,
    extra: tuple[LabelSet, ...] = (),
    threads: int = 2,
    cache: Path | None = None,
) -> tuple[Manifest, CropData, dict[str, np.ndarray]]:
    """The FP32 classifier of a `cxr train` directory, the unaugmented crops of every labelled
    image of the sets given (its own segmenter, and its split: the seed in its card), and its
    ONNX Runtime outputs on them: the reference every other export of it is compared with."""
    ref = load_manifest(manifest_path(trained, "classifier"))
    cfg = config_of(ref, trained, labels, images, threads, cache=cache, extra=extra)
    data, _ = load_data(cfg, load_segmenter(trained))
    log(f"scoring {len(data.inputs)} crops with {ref.onnx_path}")
    return ref, data, ort_run(ort_session(ref.onnx_path, threads), data.inputs)


def check_same_split(path: Path, data: CropData) -> None:
    """The crops' split must be the one the model was trained on (its splits.csv)."""
    recorded = recorded_splits(path)
    now = {key: str(s) for key, s in zip(split_keys(data), data.split, strict=True)}
    differ = [key[1] for key, s in now.items() if recorded.get(key, s) != s]
    if differ:
        raise ConfigError(
            f"{path}: {len(differ)} images (e.g. {differ[0]}) fall in another split than the "
            "classifier was trained on; pass the labels CSVs it was trained with, in order"
        )


def _trained_fp32(models: Path) -> Manifest:
    m = load_manifest(manifest_path(models, "classifier"))
    if m.precision != "fp32" or not m.trained or m.threshold is None:
        raise ConfigError(
            f"{models}: needs the trained FP32 classifier `cxr train classifier --out` wrote "
            f"(this one is {'trained' if m.trained else 'untrained'}, {m.precision})"
        )
    return m


def _check_sets(m: Manifest, sets: tuple[LabelSet, ...]) -> None:
    """As many labels CSVs as the classifier was trained on: a missing set would silently
    shrink the calibration crops and the figures."""
    trained_on = m.card.get("data", {}).get("sets")
    if trained_on is not None and len(trained_on) != len(sets):
        names = ", ".join(str(s.get("labels")) for s in trained_on)
        raise ConfigError(
            f"{m.directory}: trained on {len(trained_on)} labelled set(s) ({names}); give "
            f"--labels (and --images) for each, in that order, not {len(sets)}"
        )


def _prepare(
    models: Path, sets: tuple[LabelSet, ...], threads: int, cache: Path | None
) -> tuple[Manifest, CropData, dict[str, np.ndarray]]:
    """The trained FP32 classifier, its crops of every set (its split, checked against its
    splits.csv) and its FP32 outputs on them."""
    m = _trained_fp32(models)
    _check_sets(m, sets)
    _, data, fp32 = reference_outputs(
        models, sets[0].labels, sets[0].images, extra=sets[1:], threads=threads, cache=cache
    )
    check_same_split(Path(models) / SPLITS_FILE, data)  # calibration must see training images
    return m, data, fp32


def _config(
    m: Manifest, models: Path, sets: tuple[LabelSet, ...], threads: int, **kw: Any
) -> ClassifierTrainConfig:
    """The config that rebuilds the directory's crops of these sets (crops.config_of)."""
    return config_of(m, models, sets[0].labels, sets[0].images, threads, extra=sets[1:], **kw)


def requantize_int8(
    models: Path,
    sets: tuple[LabelSet, ...],
    *,
    calibration_images: int = 256,
    int8_tune_epochs: int = 12,
    int8_tune_images: int | None = None,
    float_depthwise: bool = False,
    float_ends: int = 0,
    cache: Path | None = None,
    threads: int = 2,
) -> Manifest:
    """Redo the INT8 export (e.g. after the INT8 recipe improved): the same FP32 model, split
    and threshold; classifier.int8.onnx and the manifest's int8 entries are rewritten, nothing
    else. sets: every labelled set the classifier was trained on, in order."""
    m, data, fp32 = _prepare(models, sets, threads, cache)
    cfg = _config(
        m,
        models,
        sets,
        threads,
        calibration_images=calibration_images,
        int8_tune_epochs=int8_tune_epochs,
        int8_tune_images=int8_tune_images,
        int8_float_depthwise=float_depthwise,
        int8_float_ends=float_ends,
    )
    int8 = int8_variant(cfg, m, data, fp32, m.threshold)
    variant = Variant(onnx=int8["onnx"], sha256=int8["sha256"], parity=int8["parity"])
    out = replace(m, card=dict(m.card) | {"int8": int8}, variants={"int8": variant})
    save_manifest(out, m.directory)
    return out


def rethreshold(
    models: Path,
    sets: tuple[LabelSet, ...],
    *,
    threshold_sensitivity: float | None = None,
    test_time_crops: int | None = None,
    tta_seed: int = 0,
    cache: Path | None = None,
    threads: int = 2,
) -> Manifest:
    """Choose the threshold again on the validation patients by a rule (Youden's J, or the
    highest threshold with validation sensitivity >= threshold_sensitivity) and rewrite what
    depends on it: the threshold, its rule, the card's metrics, the INT8 export's parity
    (re-measured: its decisions are taken at the threshold; the file is unchanged) and the
    end-of-training figures (held-out specificity per group, downscale agreement). The card
    keeps the threshold it replaced under `threshold_replaced`.

    test_time_crops K > 1 serves the classifier the mean of K crops an image (its manifest's
    tta: K box transforms drawn with tta_seed from the box jitter it was trained with), and every
    figure above is of that mean; 1 removes them; None keeps the manifest's. The INT8 parity
    stays that of the network on one crop an image."""
    m, data, fp32 = _prepare(models, sets, threads, cache)
    if test_time_crops is not None:
        m = replace(m, tta=test_time_transforms(m, test_time_crops, tta_seed))
    served = served_outputs(m, data, fp32, threads)
    rule = _config(m, models, sets, threads, threshold_sensitivity=threshold_sensitivity)
    probs = 1 / (1 + np.exp(-served["logit"].reshape(-1).astype(np.float64)))
    val = data.split == "val"
    threshold, rule_text = rule.threshold(probs[val], data.labels[val])
    log(f"threshold {m.threshold:.4f} -> {threshold:.4f} ({rule_text})")
    card: dict[str, Any] = dict(m.card)
    card["threshold_replaced"] = {
        "threshold": m.threshold,
        "rule": card.get("threshold_rule"),
        "by": "cxr train threshold (same FP32 model and validation patients)",
    }
    card |= {"threshold": threshold, "threshold_rule": rule_text}
    card.pop("test_time_crops", None)
    if m.tta:
        card["test_time_crops"] = {
            "crops": len(m.tta),
            "seed": tta_seed if test_time_crops is not None else None,
            "drawn_from": "the box jitter of its training (card: training.augmentation)",
            "note": "threshold, metrics and held-out figures are of the mean logit over the "
            "crops; the INT8 parity is of one crop an image",
        }
    card["metrics"] = evaluate(probs, data, threshold)
    variants = dict(m.variants)
    if "int8" in variants and "int8" in card:
        par = first_set_parity(fp32, m.directory / variants["int8"].onnx, data, threshold, threads)
        par["calibration"] = card["int8"]["parity"].get("calibration")
        card["int8"] = dict(card["int8"]) | {"parity": par}
        variants["int8"] = replace(variants["int8"], parity=par)
    out = replace(m, threshold=threshold, card=card, variants=variants)
    # saved first: the figures score the directory through the engine at its manifest threshold
    save_manifest(out, m.directory)
    figures = from_training(m.directory, data, served, threshold, threads)
    out = replace(out, card=out.card | figures)
    save_manifest(out, m.directory)
    return out


def test_time_transforms(
    m: Manifest, crops: int, seed: int
) -> tuple[tuple[float, float, float, float], ...]:
    """`crops` box transforms drawn from the box jitter the classifier was trained with (its
    card's training.augmentation; the trainer's defaults where it has none); () for one crop."""
    if crops < 1:
        raise ConfigError(f"--test-time-crops must be at least 1, not {crops}")
    if crops == 1:
        return ()
    return box_transforms(crops, seed, **training_jitter(m))


def training_jitter(m: Manifest) -> dict[str, float]:
    """The box jitter ("scale", "shift") a classifier was trained with: its card's
    training.augmentation, the trainer's defaults where it has none."""
    aug = m.card.get("training", {}).get("augmentation", {})
    default = CropAugment()
    return {
        "scale": float(aug.get("box_scale", default.box_scale)),
        "shift": float(aug.get("box_shift", default.box_shift)),
    }
