"""Training data: tables, decoding through the engine's own Preprocessor, masks, lung crops.

Everything a network sees in training is made by the code that serves it: images go through
engine.pipeline.Preprocessor (the DALI CPU pipeline of `cxr screen`), lung boxes come from
kernels.reference.lung_bbox on the trained segmenter's logits, and crops are cut by
kernels.reference.crop_resize_normalize. Augmentation only perturbs the box and the [0, 1]
intensities in between, so with augmentation off a training crop equals the served crop.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, ImageError
from engine.io.reader import to_sample
from engine.models import Manifest, ModelSet
from engine.pipeline import Preprocessed, Preprocessor, Sample
from engine.stages.crop import scale_shift_boxes
from kernels.reference import crop_resize_normalize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since the trainer was imported."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class LabelledImage:
    path: Path  # absolute
    rel: str  # as written in the labels CSV
    label: int
    patient_id: str
    source: str


@dataclass(frozen=True, slots=True)
class MaskPair:
    image: Path
    mask: Path
    patient_id: str
    label: int | None
    source: str


def read_table(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV that must have the required columns; ConfigError naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: CSV file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"{path}: missing column(s) {', '.join(missing)}; the file needs a header row "
                f"with at least {', '.join(required)}"
            )
        rows = list(reader)
    if not rows:
        raise ConfigError(f"{path}: no rows below the header")
    return rows


def read_labels(labels_csv: Path, images_root: Path) -> list[LabelledImage]:
    """Images of a labels CSV (path relative to images_root, label 0/1, patient_id[, source])."""
    rows = read_table(labels_csv, ("path", "label", "patient_id"))
    out, absent = [], []
    for i, row in enumerate(rows, start=2):
        if row["label"].strip() not in ("0", "1"):
            raise ConfigError(
                f"{labels_csv}: line {i}: label {row['label']!r} is not 0 or 1; "
                "use 1 = COVID-19 positive, 0 = negative"
            )
        path = Path(images_root) / row["path"]
        if not path.is_file():
            absent.append(row["path"])
            continue
        pid = row["patient_id"].strip() or f"image:{row['path']}"
        out.append(LabelledImage(path, row["path"], int(row["label"]), pid, row.get("source", "")))
    if absent:
        raise ConfigError(
            f"{labels_csv}: {len(absent)} image(s) not found under {images_root} "
            f"(e.g. {absent[0]}); --images must be the folder the 'path' column is relative to"
        )
    return out


def find_mask_pairs(masks: Path) -> list[MaskPair]:
    """Pairs from an index CSV (image_path, mask_path[, patient_id]), DIR/index.csv, or
    DIR/images/X + DIR/masks/X_mask.png."""
    masks = Path(masks)
    if masks.is_dir() and not (masks / "index.csv").is_file():
        return _pairs_from_folders(masks)
    index = masks / "index.csv" if masks.is_dir() else masks
    rows = read_table(index, ("image_path", "mask_path"))
    pairs = []
    for row in rows:
        image, mask = index.parent / row["image_path"], index.parent / row["mask_path"]
        for p in (image, mask):
            if not p.is_file():
                raise ConfigError(
                    f"{index}: {p} not found; image_path and mask_path are relative to "
                    f"{index.parent}"
                )
        label = row.get("label", "").strip()
        pid = row.get("patient_id", "").strip() or f"image:{row['image_path']}"
        pairs.append(
            MaskPair(image, mask, pid, int(label) if label else None, row.get("source", ""))
        )
    return pairs


def _pairs_from_folders(root: Path) -> list[MaskPair]:
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = []
    for image in images:
        mask = root / "masks" / f"{image.stem}_mask.png"
        if mask.is_file():
            pairs.append(MaskPair(image, mask, f"image:{image.name}", None, ""))
    if not pairs:
        raise ConfigError(
            f"{root}: no image/mask pairs found: give an index.csv (image_path, mask_path, "
            "patient_id) or put images in images/X.png and masks in masks/X_mask.png"
        )
    log(f"warning: {root} has no index.csv: every image counts as its own patient")
    return pairs


def read_sample(path: Path) -> Sample:
    """A pipeline Sample from a file, read as the reader of `cxr screen` reads it (DICOM decoded
    on the CPU, anything else left encoded for the preprocessor)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read ({exc.strerror})") from None
    return to_sample(data)


def decode_all(
    paths: Sequence[Path],
    models: ModelSet,
    *,
    threads: int,
    batch_size: int = 16,
    pre: Preprocessor | None = None,
    require_any: bool = True,
) -> Preprocessed:
    """Every image once through the engine's Preprocessor; unreadable images are listed (`ok`
    and `errors` index `paths`). require_any=False: a part where nothing decodes gives empty
    arrays instead of an error."""
    pre = pre or Preprocessor(models, device="cpu", batch_size=batch_size, threads=threads)
    ok: list[int] = []
    works, segs, errors = [], [], {}
    for start in range(0, len(paths), batch_size):
        idx, samples = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                samples.append(read_sample(paths[i]))
                idx.append(i)
            except ImageError as exc:
                errors[i] = str(exc)
        if not samples:
            continue
        out = pre.run(samples)
        errors.update({idx[j]: msg for j, msg in out.errors.items()})
        ok.extend(idx[j] for j in out.ok)
        works.append(out.work)
        segs.append(out.seg_input)
    for i, msg in errors.items():
        log(f"warning: {paths[i]}: skipped: {msg}")
    if not ok:
        if require_any:
            raise ConfigError(
                f"none of the {len(paths)} images could be decoded (see warnings above)"
            )
        return Preprocessed([], np.empty((0, 0, 0), np.float32), np.empty((0, 1, 0, 0)), errors)
    return Preprocessed(ok, np.concatenate(works), np.concatenate(segs), errors)


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Binary mask resized to (h, w): bilinear (antialiased) on {0, 1}, then >= 0.5."""
    import torch
    from PIL import Image, UnidentifiedImageError  # a dependency of torchvision

    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"), np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(
            f"{path}: cannot read this mask ({exc}); masks must be PNG/JPEG"
        ) from None
    small = torch.nn.functional.interpolate(
        torch.from_numpy(gray)[None, None],
        size=size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return (small[0, 0] >= 0.5).numpy().astype(np.float32)


def jitter_boxes(
    boxes: np.ndarray, rng: np.random.Generator, *, scale: float = 0.08, shift: float = 0.05
) -> np.ndarray:
    """Scale each box by 1 +- scale and move its centre by +- shift of its size; clip to [0, 1]
    (engine.stages.crop.scale_shift_boxes, as the served box transforms of a classifier's tta)."""
    n = len(boxes)
    s = 1 + rng.uniform(-scale, scale, (n, 2))
    dx = rng.uniform(-shift, shift, n)
    dy = rng.uniform(-shift, shift, n)
    return scale_shift_boxes(boxes, s[:, 0], s[:, 1], dx, dy)


def box_transforms(
    k: int, seed: int, *, scale: float = 0.08, shift: float = 0.05
) -> tuple[tuple[float, float, float, float], ...]:
    """k (sx, sy, dx, dy) box transforms drawn from jitter_boxes' distribution: a classifier's
    test-time crops (its manifest's tta)."""
    rng = np.random.default_rng(seed)
    s = 1 + rng.uniform(-scale, scale, (k, 2))
    d = rng.uniform(-shift, shift, (k, 2))
    return tuple(
        (round(float(a), 6), round(float(b), 6), round(float(c), 6), round(float(e), 6))
        for (a, b), (c, e) in zip(s, d, strict=True)
    )


def crops01(work: np.ndarray, boxes: np.ndarray, classifier: Manifest) -> np.ndarray:
    """Classifier crops in [0, 1] (mean 0, std 1): the serving crop before normalisation."""
    pre = classifier.preprocess
    zeros, ones = (0.0,) * pre.channels, (1.0,) * pre.channels
    return crop_resize_normalize(work, boxes, pre.size, zeros, ones)


def normalise(x01: np.ndarray, classifier: Manifest) -> np.ndarray:
    """The manifest's (x - mean) / std, per channel, in float32."""
    pre = classifier.preprocess
    mean = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    return (x01 - mean) / std


def classifier_inputs(work: np.ndarray, boxes: np.ndarray, classifier: Manifest) -> np.ndarray:
    """Unaugmented classifier input, one crop an image: engine.stages.crop.lung_crops'
    classifier_input for a classifier without box transforms (tta)."""
    return normalise(crops01(work, boxes, classifier), classifier)


def labels_split(labels_csv: Path, seed: int) -> dict[str, str]:
    """patient_id -> split over every patient of a labels CSV (shared by both trainers)."""
    from engine.train.splits import patient_strata, split_patients

    rows = read_table(labels_csv, ("label", "patient_id"))
    for i, row in enumerate(rows, start=2):
        if row["label"].strip() not in ("0", "1"):
            raise ConfigError(
                f"{labels_csv}: line {i}: label {row['label']!r} is not 0 or 1; "
                "use 1 = COVID-19 positive, 0 = negative"
            )
    return split_patients(patient_strata(r for r in rows if r["patient_id"].strip()), seed)
