"""`cxr train segmenter`: the lung U-Net on image/mask pairs, exported as ONNX + manifest.

Inputs are made by the engine's own Preprocessor (DALI CPU: decode -> square work image ->
segmenter size -> (x - mean) / std), so training sees exactly what `cxr screen` feeds the
segmenter. Masks are resized to the segmenter size (bilinear, then >= 0.5). Loss: BCE + soft
Dice. Patients are split with the classifier's split function (pass the classifier's labels CSV
as ``labels`` so no classifier test patient is in segmenter training); early stopping on
validation Dice; Dice per split, with a patient-bootstrap 95% interval of its mean, goes into the
model card (engine.eval.segmentation recomputes it for an existing models directory).
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.eval.dice import BOOTSTRAP_RESAMPLES, dice_definition, dice_summaries
from engine.models import Manifest, ModelSet, export_model
from engine.train import loop
from engine.train.augment import Geometry, Photometry, augment_pair
from engine.train.data import (
    MaskPair,
    decode_all,
    find_mask_pairs,
    labels_split,
    load_mask,
    log,
    read_table,
)
from engine.train.distil import (
    TeacherData,
    check_disjoint,
    held_out,
    pool_images,
    teacher_targets,
)
from engine.train.export import check_parity, ort_run, ort_session, to_onnx
from engine.train.metrics import dice_per_image
from engine.train.segmenter_int8 import box_iou
from engine.train.specs import (
    SEGMENTER_ARCHS,
    classifier_for_segmenter,
    classifier_manifest,
    segmenter_manifest,
    work_size,
)
from engine.train.splits import SPLITS, fallback_split, patient_strata, split_patients
from engine.train.unet import build_unet
from kernels.reference import lung_bbox

SPLITS_FILE = "segmenter_splits.csv"
LOG_FILE = "segmenter_train_log.json"


@dataclass(frozen=True, kw_only=True)
class SegmenterTrainConfig:
    masks: Path
    out: Path
    labels: Path | None = None  # the classifier's labels CSV: share its patient split
    epochs: int = 60
    seed: int = 0
    arch: str = "unet"
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 12
    threads: int = 2
    precision: str = "auto"
    teacher: Path | None = None  # models dir of a segmenter to imitate (engine.train.distil)
    teacher_images: Path | None = None  # its pool: a CSV with a path column, or a folder
    teacher_per_epoch: int = 1024  # pool images drawn per epoch (beside every human pair)
    cache: Path | None = None  # where the teacher targets are kept between runs

    def __post_init__(self) -> None:
        loop.check_common(self, SEGMENTER_ARCHS)
        if (self.teacher is None) != (self.teacher_images is None):
            raise ConfigError("--teacher and --teacher-images go together: give both or neither")
        if self.teacher_per_epoch < 1:
            raise ConfigError(f"--teacher-per-epoch must be >= 1, got {self.teacher_per_epoch}")


@dataclass(frozen=True, slots=True)
class SegData:
    pairs: list[MaskPair]
    split: np.ndarray  # (n,) "train" | "val" | "test"
    x: np.ndarray  # (n, 1, h, w) segmenter input, normalised as served
    masks: np.ndarray  # (n, 1, h, w) {0, 1}


def assign_splits(pairs: list[MaskPair], labels: Path | None, seed: int) -> tuple[list[str], str]:
    """Split per pair, and how it was made (for the card)."""
    if labels is not None:
        shared = labels_split(labels, seed)
        outside = sorted({p.patient_id for p in pairs if p.patient_id not in shared})
        if outside:
            log(
                f"warning: {len(outside)} mask patient(s) are not in {labels} (e.g. {outside[0]}):"
                " their split comes from their patient id hash alone"
            )
        rule = f"split_patients over the patients of {labels} (seed {seed}); others by hash"
        return [shared.get(p.patient_id) or fallback_split(p.patient_id, seed) for p in pairs], rule
    rows = [{"patient_id": p.patient_id, "label": p.label or 0, "source": p.source} for p in pairs]
    split = split_patients(patient_strata(rows), seed)
    log(
        "warning: no --labels given: the split covers the mask patients only; pass the "
        "classifier's labels CSV so its test patients stay out of segmenter training"
    )
    return [
        split[p.patient_id] for p in pairs
    ], f"split_patients over the mask patients (seed {seed})"


def load_data(cfg: SegmenterTrainConfig) -> tuple[SegData, str, dict[str, Any]]:
    pairs = find_mask_pairs(cfg.masks)
    split, rule = assign_splits(pairs, cfg.labels, cfg.seed)
    log(f"decoding {len(pairs)} images through the engine pipeline (work {work_size(cfg.arch)} px)")
    data, skipped = decode_pairs(
        pairs, split, segmenter_manifest(cfg.arch, trained=False), cfg.threads
    )
    for name in SPLITS:
        if not (data.split == name).any():
            raise ConfigError(
                f"{cfg.masks}: no {name} images after the patient split ({rule}); "
                "more mask pairs (patients) are needed"
            )
    return data, rule, skipped


def decode_pairs(
    pairs: list[MaskPair], split: list[str], segmenter: Manifest, threads: int
) -> tuple[SegData, dict[str, str]]:
    """Segmenter inputs as served (the engine's Preprocessor with the segmenter's preprocessing
    and its size family's work image) and masks at the segmenter size; undecodable images are
    dropped and returned as {image path: reason}."""
    clf = classifier_manifest(classifier_for_segmenter(segmenter.architecture), trained=False)
    decoded = decode_all(
        [p.image for p in pairs], ModelSet(segmenter=segmenter, classifier=clf), threads=threads
    )
    kept = [pairs[i] for i in decoded.ok]
    masks = np.stack([load_mask(p.mask, segmenter.preprocess.size) for p in kept])[:, None]
    data = SegData(kept, np.array([split[i] for i in decoded.ok]), decoded.seg_input, masks)
    return data, {str(pairs[i].image): msg for i, msg in decoded.errors.items()}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def predict_masks(model: torch.nn.Module, x: np.ndarray, precision: str) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad(), loop.autocast(precision):
        for start in range(0, len(x), 16):
            xb = torch.from_numpy(x[start : start + 16]).contiguous(
                memory_format=torch.channels_last
            )
            out.append((model(xb).float() >= 0).numpy())
    return np.concatenate(out)


def teacher_agreement(
    model: torch.nn.Module, pool: TeacherData, idx: np.ndarray, precision: str
) -> dict[str, float]:
    """The student against the teacher on held-out pool images, at the student's size: mask
    Dice and lung-box IoU (kernels.reference.lung_bbox with the classifier crop's margin)."""
    pred = predict_masks(model, pool.x[idx], precision)[:, 0]
    teacher = pool.target[idx][:, 0]
    margin = classifier_manifest("resnet50", trained=False).crop.margin  # type: ignore[union-attr]
    iou = box_iou(
        lung_bbox(pred.astype(np.float32), 0.5, margin)[0], lung_bbox(teacher, 0.5, margin)[0]
    )
    return {
        "teacher_dice": float(dice_per_image(pred[:, None], teacher[:, None] >= 0.5).mean()),
        "teacher_box_iou_mean": float(iou.mean()),
        "teacher_box_iou_min": float(iou.min()),
    }


def fit(
    cfg: SegmenterTrainConfig, data: SegData, precision: str, pool: TeacherData | None = None
) -> tuple[torch.nn.Module, loop.EarlyStopping, list[dict[str, Any]]]:
    """Train on the human pairs' training split and, with a teacher, on `teacher_per_epoch`
    pool images per epoch (soft targets); early stopping on the human validation Dice."""
    rng, gen = loop.seed_everything(cfg.seed, cfg.threads)
    model = build_unet(cfg.arch).to(memory_format=torch.channels_last)
    train_idx, val_idx = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    x, targets = data.x, data.masks.astype(np.float32)
    soft = np.zeros(len(x), bool)
    pool_train = pool_held = np.empty(0, np.int64)
    if pool is not None:
        held = held_out(len(pool.x), cfg.seed)
        pool_train = len(x) + np.flatnonzero(~held)
        pool_held = np.flatnonzero(held)
        x, targets = np.concatenate([x, pool.x]), np.concatenate([targets, pool.target])
        soft = np.concatenate([soft, np.ones(len(pool.x), bool)])
    per_epoch = len(train_idx) + min(cfg.teacher_per_epoch, len(pool_train))
    total = min(cfg.max_steps or 10**9, max(1, per_epoch // cfg.batch_size) * cfg.epochs)
    opt, sched = loop.optimiser(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total)
    pre = segmenter_manifest(cfg.arch).preprocess
    mean, std = pre.mean[0], pre.std[0]
    x01 = torch.from_numpy(x) * std + mean  # back to [0, 1] for photometric augmentation
    masks, soft_t = torch.from_numpy(targets), torch.from_numpy(soft)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        image, mask = augment_pair(x01[idx], masks[idx], gen, binarize=False)
        hard = (mask >= 0.5).to(mask.dtype)
        mask = torch.where(soft_t[idx][:, None, None, None], mask, hard)
        xb = ((image - mean) / std).contiguous(memory_format=torch.channels_last)
        with loop.autocast(precision):
            logits = model(xb).float()
        return F.binary_cross_entropy_with_logits(logits, mask) + soft_dice_loss(logits, mask)

    stopper, history, step = loop.EarlyStopping(cfg.patience), [], 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_idx = train_idx
        if pool is not None:
            drawn = rng.choice(pool_train, size=per_epoch - len(train_idx), replace=False)
            epoch_idx = np.concatenate([train_idx, drawn])
        batches = loop.batches(epoch_idx, cfg.batch_size, rng)
        stats = loop.train_epoch(model, opt, sched, batches, batch_loss, total - step)
        step += stats.steps
        pred = predict_masks(model, data.x[val_idx], precision)
        val_dice = float(dice_per_image(pred, data.masks[val_idx]).mean())
        stopper.update(epoch, val_dice, stats.loss, model)
        row = {"epoch": epoch, **stats.as_dict(), "val_dice": val_dice, "steps": step}
        agree = ""
        if pool is not None:
            row |= teacher_agreement(model, pool, pool_held, precision)
            agree = (
                f"  held-out pool vs teacher: Dice {row['teacher_dice']:.4f}, box IoU mean "
                f"{row['teacher_box_iou_mean']:.4f} min {row['teacher_box_iou_min']:.3f}"
            )
        history.append(row)
        log(
            f"segmenter epoch {epoch}/{cfg.epochs}  loss {stats.loss:.4f}  "
            f"val Dice {val_dice:.4f}{agree}  {stats.img_per_s:.1f} img/s"
        )
        if stopper.should_stop or step >= total:
            break
    stopper.restore(model)
    return model, stopper, history


def train_segmenter(cfg: SegmenterTrainConfig) -> Manifest:
    """Train, export segmenter.onnx + segmenter.json into cfg.out, return the manifest."""
    precision = loop.resolve_precision(cfg.precision)
    data, rule, skipped = load_data(cfg)
    pool = load_pool(cfg, data)
    started = time.perf_counter()
    model, stopper, history = fit(cfg, data, precision, pool)
    training = _training_card(cfg, stopper, history, time.perf_counter() - started, precision)
    if pool is not None:
        training["distillation"] = _distillation_card(cfg, pool)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = f"trained U-Net segmenter ({cfg.arch})"
    proto = to_onnx(
        model,
        torch.from_numpy(data.x[:2]),
        output_names=["mask_logit"],
        architecture=cfg.arch,
        doc=doc,
    )
    val_x = data.x[data.split == "val"][:8]
    parity = check_parity(model, proto, val_x, cfg.threads, out / "segmenter.onnx")
    dice = served_dice(proto.SerializeToString(), data, cfg.threads, seed=cfg.seed)
    card = _card(cfg, data, rule, skipped, training, dice, parity)
    manifest = export_model(proto, out, segmenter_manifest(cfg.arch, card=card))
    _write_splits(out / SPLITS_FILE, data)
    log_json: dict[str, Any] = {"config": asdict(cfg), "precision": precision, "history": history}
    log_json |= {"best_epoch": stopper.best_epoch, "dice": dice, "export_parity": parity}
    loop.write_json(out / LOG_FILE, log_json)
    if (out / "classifier.json").is_file():
        log(
            f"warning: {out / 'classifier.json'} was trained on crops of the previous segmenter;"
            " retrain it with `cxr train classifier` before screening"
        )
    test_ci = dice["test"]["ci95"]
    log(
        f"segmenter: best epoch {stopper.best_epoch}, val Dice {dice['val']['mean']:.4f}, "
        f"test Dice {dice['test']['mean']:.4f} "
        f"[{test_ci['low']:.4f}, {test_ci['high']:.4f}] -> {manifest.onnx_path}"
    )
    return manifest


def load_pool(cfg: SegmenterTrainConfig, data: SegData) -> TeacherData | None:
    """The teacher's targets on --teacher-images, refusing images the segmenter is measured on
    (its mask pairs and the images of the classifier's labels CSV)."""
    if cfg.teacher is None or cfg.teacher_images is None:
        return None
    paths = pool_images(cfg.teacher_images)
    measured = {"the mask pairs": [p.image for p in data.pairs]}
    if cfg.labels is not None:
        rows = read_table(cfg.labels, ("path",))
        measured[str(cfg.labels)] = [Path(cfg.labels).parent / r["path"] for r in rows]
    check_disjoint(paths, measured)
    student = segmenter_manifest(cfg.arch, trained=False)
    return teacher_targets(cfg.teacher, student, paths, threads=cfg.threads, cache=cfg.cache)


def _distillation_card(cfg: SegmenterTrainConfig, pool: TeacherData) -> dict[str, Any]:
    held = int(held_out(len(pool.x), cfg.seed).sum())
    return {
        "teacher": {"models": str(cfg.teacher), **pool.teacher},
        "images": str(cfg.teacher_images),
        "pool": len(pool.x),
        "held_out": held,
        "per_epoch": min(cfg.teacher_per_epoch, len(pool.x) - held),
        "target": "the teacher's lung probability centred on its threshold, area-resized to "
        "this model's input; BCE + soft Dice as for the human masks",
        "selection": "the human masks' validation Dice (the teacher agreement is logged)",
    }


def served_dice(
    model: Path | bytes,
    data: SegData,
    threads: int,
    *,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, dict[str, Any]]:
    """Dice of the exported model under ONNX Runtime (what is served), per split with images:
    engine.eval.dice.dice_summary (mean, median, min, patient-bootstrap CI of the mean)."""
    session = ort_session(model, threads)
    per_split = {}
    for name in SPLITS:
        sel = data.split == name
        if not sel.any():
            continue
        pred = ort_run(session, data.x[sel], batch=16)["mask_logit"] >= 0
        patients = [p.patient_id for p, s in zip(data.pairs, sel, strict=True) if s]
        per_split[name] = (dice_per_image(pred, data.masks[sel]), patients)
    return dice_summaries(per_split, seed=seed, resamples=resamples)


def _counts(data: SegData) -> dict[str, dict[str, int]]:
    return {
        name: {
            "images": int((data.split == name).sum()),
            "patients": len(
                {p.patient_id for p, s in zip(data.pairs, data.split, strict=True) if s == name}
            ),
        }
        for name in SPLITS
    }


def _training_card(
    cfg: SegmenterTrainConfig,
    stopper: loop.EarlyStopping,
    history: list[dict[str, Any]],
    seconds: float,
    precision: str,
) -> dict[str, Any]:
    return loop.schedule_card(cfg, stopper, len(history)) | {
        "loss": "BCE + soft Dice",
        "early_stopping": f"validation Dice, patience {cfg.patience}",
        "augmentation": {
            "geometry (image + mask)": asdict(Geometry()),
            "photometry (image)": asdict(Photometry()),
        },
        "precision": precision,
        "seconds": round(seconds, 1),
        "initialisation": "from scratch (no pretrained weights)",
    }


def _card(
    cfg: SegmenterTrainConfig,
    data: SegData,
    rule: str,
    skipped: dict[str, str],
    training: dict[str, Any],
    dice: dict[str, dict[str, Any]],
    parity: dict[str, float],
) -> dict[str, Any]:
    return {
        "status": "trained with `cxr train segmenter`",
        "task": "lung segmentation (mask_logit >= 0 <=> lung probability >= 0.5)",
        "data": {"masks": str(cfg.masks), "pairs": len(data.pairs), "skipped": skipped},
        "splits": {"rule": rule, "seed": cfg.seed, "counts": _counts(data), "file": SPLITS_FILE},
        "training": training,
        "metrics": {
            "dice": dice,
            "definition": dice_definition(seed=cfg.seed, resamples=BOOTSTRAP_RESAMPLES),
        },
        "export_parity_max_rel_diff": parity,
    }


def _write_splits(path: Path, data: SegData) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "mask_path", "patient_id", "split"])
        for p, s in zip(data.pairs, data.split, strict=True):
            w.writerow([p.image, p.mask, p.patient_id, s])
