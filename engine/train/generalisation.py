"""Two shortcut measurements of a classifier, for its card: the source probe on the embeddings
of every labelled image it was not trained on, and the primary set's test images screened at
full size and downscaled to 224 px (cxr-train's resolution).

`cxr train classifier` records them at the end of training (`from_training`); `cxr train
generalisation` measures them for any models directory afterwards (e.g. a classifier shipped
before these measurements existed), from its splits.csv: an image is "trained on" where that file
says `train`, every other labelled image of the sets given is held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.eval.resolution import downscale_agreement
from engine.eval.source_probe import source_probe
from engine.models import Manifest
from engine.stages.classify import crop_mean
from engine.stages.crop import classifier_crops
from engine.train.classifier_fit import CropData
from engine.train.data import log

HELD_OUT = "every labelled image not trained on (val, test, holdout, unseen, further sets)"
TTA_CHUNK = 256  # images whose test-time crops are cut and scored at once


def served_outputs(
    clf: Manifest, data: CropData, single: dict[str, np.ndarray], threads: int
) -> dict[str, np.ndarray]:
    """The classifier's outputs ("logit" (n,), "embedding" (n, D)) as `cxr screen` serves them:
    `single` (its outputs on data.inputs, one crop an image) when it has no test-time crops;
    else the mean over its box transforms' crops (engine.stages.crop.classifier_crops), cut
    from data.work, whose uint8 steps leave them within 1/255 of the served crops."""
    if not clf.tta:
        return single
    from engine.train.export import ort_run, ort_session

    session = ort_session(clf.onnx_path, threads)
    log(f"scoring {len(clf.tta)} test-time crops of each of {len(data.boxes)} images")
    logits, embeddings = [], []
    for start in range(0, len(data.boxes), TTA_CHUNK):
        work = np.asarray(data.work[start : start + TTA_CHUNK], np.float32)
        if data.work.dtype == np.uint8:
            work /= 255.0
        x = classifier_crops(work, data.boxes[start : start + TTA_CHUNK], clf)
        out = ort_run(session, x)
        logit, emb = crop_mean(out["logit"], out["embedding"], len(clf.tta))
        logits.append(logit)
        embeddings.append(emb)
    return {"logit": np.concatenate(logits), "embedding": np.concatenate(embeddings)}


def held_out_by_group(
    probs: np.ndarray, data: CropData, held: np.ndarray, threshold: float
) -> dict[str, dict[str, Any]]:
    """Per source:label of the held-out images: how many, and the share the classifier gets
    right at its threshold (specificity for label 0, sensitivity for label 1)."""
    out: dict[str, dict[str, Any]] = {}
    for src in sorted(set(data.sources[held].tolist())):
        for y in (0, 1):
            sel = held & (data.sources == src) & (data.labels == y)
            if sel.any():
                called = probs[sel] >= threshold
                right = called if y == 1 else ~called
                out[f"{src}:{y}"] = {
                    "images": int(sel.sum()),
                    "specificity" if y == 0 else "sensitivity": float(right.mean()),
                }
    return out


def measure(
    directory: Path,
    data: CropData,
    outputs: dict[str, np.ndarray],
    trained: np.ndarray,
    threshold: float,
    threads: int,
) -> dict[str, Any]:
    """{"source_probe", "downscale_agreement", "held_out_by_group"} of the classifier in
    `directory`: outputs are its ONNX outputs on data.inputs ("logit", "embedding"); trained
    marks the images it was trained on; threshold is its decision threshold."""
    held = ~np.asarray(trained, bool)
    patients = np.array([im.patient_id for im in data.images])
    embedding = outputs["embedding"]
    probe = source_probe(embedding[held], data.sources[held], data.labels[held], patients[held])
    probe["images"] = HELD_OUT
    probs = 1 / (1 + np.exp(-outputs["logit"].reshape(-1).astype(np.float64)))
    groups = held_out_by_group(probs, data, held, threshold)
    test = np.flatnonzero((data.split == "test") & (data.dataset == 0))
    log(f"downscale agreement on {len(test)} test images")
    res = downscale_agreement(
        directory, [data.images[i].path for i in test], data.labels[test], threads=threads
    )
    return {"source_probe": probe, "downscale_agreement": res, "held_out_by_group": groups}


def from_training(
    directory: Path, data: CropData, fp32: dict[str, np.ndarray], threshold: float, threads: int
) -> dict[str, Any]:
    """The measurements at the end of `cxr train classifier` (its own split)."""
    return measure(directory, data, fp32, data.split == "train", threshold, threads)


def trained_mask(splits_csv: Path, data: CropData) -> np.ndarray:
    """Which of data's images a models directory's splits.csv lists as `train`."""
    from engine.train.crops import recorded_splits, split_keys

    recorded = recorded_splits(splits_csv)
    return np.array([recorded.get(key) == "train" for key in split_keys(data)])


def measure_models(
    models: Path,
    labels: list[Path],
    images: list[Path],
    *,
    cache: Path,
    threads: int,
) -> dict[str, Any]:
    """Load every labelled image of the sets (the crop cache), run the classifier of `models`
    on the served crops and measure both figures."""
    from engine.models import load_manifest, manifest_path
    from engine.train.crops import config_of, load_data, load_segmenter
    from engine.train.datasets import pair_sets
    from engine.train.export import ort_run, ort_session

    clf = load_manifest(manifest_path(models, "classifier"))
    sets = pair_sets(labels, images)
    cfg = config_of(
        clf, models, sets[0].labels, sets[0].images, threads, extra=sets[1:], cache=cache
    )
    data, _ = load_data(cfg, load_segmenter(models))
    trained = trained_mask(Path(models) / "splits.csv", data)
    log(
        f"embedding {len(data.inputs)} crops with {clf.onnx_path} ({int(trained.sum())} trained on)"
    )
    out = served_outputs(
        clf, data, ort_run(ort_session(clf.onnx_path, threads), data.inputs), threads
    )
    threshold = 0.5 if clf.threshold is None else clf.threshold
    return measure(Path(models), data, out, trained, threshold, threads)
