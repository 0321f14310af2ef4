"""The labelled sets as crops: every image decoded, segmented and cropped once (the crop cache,
engine/train/cache.py), with its part of the split, for training, the INT8 export, parity and
the generalisation measurements alike."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError, ModelError
from engine.models import Manifest, load_manifest, manifest_path
from engine.train.cache import open_or_build
from engine.train.classifier_config import ClassifierTrainConfig
from engine.train.classifier_fit import CropData
from engine.train.data import log
from engine.train.datasets import load_sets
from engine.train.segmenter import SPLITS_FILE as SEGMENTER_SPLITS
from engine.train.specs import classifier_manifest
from engine.train.splits import SPLITS


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
    """Every labelled image of every set, decoded, segmented and cropped once (the crop cache),
    with its part of the split; images that cannot be decoded are left out and listed."""
    sel = load_sets(cfg.sets, cfg.seed, holdout=cfg.holdout, exclude=cfg.excluded)
    shared = {
        im.patient_id: str(part)
        for im, part, k in zip(sel.images, sel.split, sel.dataset, strict=True)
        if k == 0
    }
    check_segmenter_split(cfg.segmenter, shared, cfg.labels, cfg.seed)
    clf = classifier_manifest(cfg.arch, trained=False)
    cache_dir = Path(cfg.cache) if cfg.cache else Path(cfg.out) / "crop-cache"
    parts: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for k, label_set in enumerate(cfg.sets):
        rows = np.flatnonzero(sel.dataset == k)
        images = [sel.images[i] for i in rows]
        log(f"{label_set.labels}: {len(images)} images; crop cache under {cache_dir}")
        cached = open_or_build(cache_dir, label_set, images, seg, clf, threads=cfg.threads)
        skipped |= {str(images[i].path): msg for i, msg in cached.errors.items()}
        ok = np.flatnonzero(cached.ok)
        parts.append(
            {
                "images": [images[i] for i in ok],
                "split": sel.split[rows][ok],
                "work": np.asarray(cached.work[ok]),
                "boxes": cached.boxes[ok],
                "inputs": np.asarray(cached.inputs[ok]),
                "masks": np.asarray(cached.masks[ok]),
                "fraction": cached.fraction[ok],
                "dataset": np.full(len(ok), k),
            }
        )
    kept = [im for p in parts for im in p["images"]]
    data = CropData(
        kept,
        np.concatenate([p["split"] for p in parts]),
        np.array([im.label for im in kept]),
        np.concatenate([p["work"] for p in parts]),
        np.concatenate([p["boxes"] for p in parts]),
        np.concatenate([p["inputs"] for p in parts]),
        np.concatenate([p["masks"] for p in parts]),
        np.concatenate([p["fraction"] for p in parts]),
        np.concatenate([p["dataset"] for p in parts]),
        np.array([im.source for im in kept]),
    )
    for name in SPLITS:
        if len(set(data.labels[data.split == name].tolist())) < (2 if name != "test" else 1):
            raise ConfigError(
                f"{cfg.labels}: the {name} part has images of one class only after the patient "
                "split; more labelled patients of both classes are needed"
            )
    return data, skipped


def config_of(
    m: Manifest, trained: Path, labels: Path, images: Path, threads: int, **kw: Any
) -> ClassifierTrainConfig:
    """The config that rebuilds a trained directory's crops and split: its own segmenter and
    architecture, the split seed, the further sets' hold-out share and the groups left out of
    training as its card records them; kw: the rest (e.g. the further sets, the INT8
    settings)."""
    seed = int(m.card.get("splits", {}).get("seed", 0))
    data = m.card.get("data", {})
    recorded: dict[str, Any] = {}
    if "holdout" in data:
        recorded["holdout"] = float(data["holdout"]["fraction"])
    if data.get("excluded_from_training"):
        recorded["exclude"] = tuple(data["excluded_from_training"])
    return ClassifierTrainConfig(
        labels=labels,
        images=images,
        segmenter=trained,
        out=trained,
        arch=m.architecture,
        seed=seed,
        threads=threads,
        **(recorded | kw),
    )


def recorded_splits(path: Path) -> dict[tuple[str, str], str]:
    """A models directory's splits.csv: (set index, image path) -> the part the classifier put
    it in (rows without a `dataset` column belong to the first set)."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: missing; it records the split the classifier was trained on")
    with open(path, newline="") as f:
        return {(row.get("dataset") or "0", row["path"]): row["split"] for row in csv.DictReader(f)}


def split_keys(data: CropData) -> list[tuple[str, str]]:
    """The recorded_splits key of each of data's images."""
    return [(str(int(k)), im.rel) for im, k in zip(data.images, data.dataset, strict=True)]
