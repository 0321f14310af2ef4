"""What test-time crops do to a trained classifier's scores (docs/model-eval/test-time-crops.md).

    python -m benchmarks.tta_crops --models DIR --labels CSV [--images ROOT] [--labels CSV2 ...]
        [--crops 2,4,8] [--seeds 3] [--resamples 2000] [--out JSON]

The images that DIR's splits.csv puts in `val`, `test` or `holdout` (of every labelled set given,
in the order the classifier was trained on them) are decoded once by the engine's Preprocessor,
their lung boxes found by DIR's segmenter under its box rule, and its FP32 classifier scores one
crop an image (the lung box) and, for each K and seed, the mean logit over K crops whose box
transforms are engine.train.data.box_transforms(K, seed) of the training's box jitter (what
`cxr train threshold --test-time-crops K --tta-seed seed` serves). The classifier manifest's own
tta is ignored: its single crop is the baseline.

Per part (val, test, val+test, val+test of each source, holdout of each source): ROC AUC of one
crop and of K crops (mean, min and max over the seeds); per K, the paired patient-bootstrap 95%
interval of the ROC AUC difference (K crops, seed 0, minus one crop) on val+test and on each
holdout source; and how far one image's probability moves from crop to crop (max - min over the
largest K's crops: median, 90th percentile, max).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.eval.bootstrap import patient_codes, resample_images
from engine.eval.metrics import roc_auc
from engine.models import ModelSet, load_manifest, manifest_path
from engine.stages.crop import classifier_crops
from engine.train.data import box_transforms, decode_all, read_labels
from engine.train.export import ort_run, ort_session
from engine.train.redo import training_jitter
from engine.train.segmenter_int8 import lung_boxes

PARTS = ("val", "test", "holdout")


def held_images(models: Path, sets: Sequence[tuple[Path, Path]]) -> list[tuple[Any, str]]:
    """(LabelledImage, split) of every image splits.csv puts in val, test or holdout."""
    split = {}
    with open(models / "splits.csv", newline="") as f:
        for row in csv.DictReader(f):
            split[(int(row.get("dataset") or 0), row["path"])] = row["split"]
    out = []
    for d, (labels, images) in enumerate(sets):
        for im in read_labels(labels, images):
            s = split.get((d, im.path.relative_to(images).as_posix()))
            if s in PARTS:
                out.append((im, s))
    return out


def score(
    models: Path,
    sets: Sequence[tuple[Path, Path]],
    *,
    crops: Sequence[int],
    seeds: int,
    threads: int,
) -> dict[str, Any]:
    """Logits of one crop (n,) and of each (K, seed) (n,), and the per-image facts."""
    seg = load_manifest(manifest_path(models, "segmenter"))
    clf = replace(load_manifest(manifest_path(models, "classifier")), tta=())
    held = held_images(models, sets)
    dec = decode_all([im.path for im, _ in held], ModelSet(segmenter=seg, classifier=clf),
                     threads=threads)  # fmt: skip
    boxes = lung_boxes(ort_session(seg.onnx_path, threads), seg, dec.seg_input)
    session = ort_session(clf.onnx_path, threads)
    jitter = training_jitter(clf)

    def per_crop(m: Any) -> np.ndarray:  # (K, n): each crop's own logit, transform-major
        out = ort_run(session, classifier_crops(dec.work, boxes, m))
        return out["logit"].reshape(max(len(m.tta), 1), -1).astype(np.float64)

    one = per_crop(clf)[0]
    crop_logits = {
        (k, s): per_crop(replace(clf, tta=box_transforms(k, s, **jitter)))
        for k in crops
        for s in range(seeds)
    }
    many = {key: v.mean(axis=0) for key, v in crop_logits.items()}  # the served mean logit
    spread = crop_logits[(max(crops), 0)]
    ok = dec.ok
    return {
        "one": one,
        "many": many,
        "spread": spread,
        "label": np.array([held[i][0].label for i in ok]),
        "part": np.array([held[i][1] for i in ok]),
        "source": np.array([held[i][0].source for i in ok]),
        "patient": np.array([held[i][0].patient_id for i in ok]),
        "threshold": clf.threshold,
        "jitter": jitter,
    }


def parts(s: dict[str, Any]) -> dict[str, np.ndarray]:
    part, src = s["part"], s["source"]
    dev = (part == "val") | (part == "test")
    out = {"val": part == "val", "test": part == "test", "val+test": dev}
    for name in sorted(set(src[dev].tolist())):
        out[f"val+test {name}"] = dev & (src == name)
    for name in sorted(set(src[part == "holdout"].tolist())):
        out[f"holdout {name}"] = (part == "holdout") & (src == name)
    return {k: m for k, m in out.items() if len(set(s["label"][m].tolist())) == 2}


def paired_difference(
    y: np.ndarray, base: np.ndarray, other: np.ndarray, patients: np.ndarray, resamples: int
) -> dict[str, float]:
    """ROC AUC(other) - ROC AUC(base), and its patient-bootstrap 95% interval."""
    codes = patient_codes(patients.tolist())
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(resamples):
        idx = resample_images(codes, rng)
        if len(set(y[idx].tolist())) == 2:
            diffs.append(roc_auc(y[idx], other[idx]) - roc_auc(y[idx], base[idx]))
    d = np.array(diffs)
    return {
        "diff": roc_auc(y, other) - roc_auc(y, base),
        "low": float(np.percentile(d, 2.5)),
        "high": float(np.percentile(d, 97.5)),
        "share_at_or_below_0": float((d <= 0).mean()),
        "valid_resamples": len(d),
    }


def summarise(s: dict[str, Any], crops: Sequence[int], seeds: int, resamples: int) -> dict:
    y = s["label"]
    table = {}
    for name, m in parts(s).items():
        row: dict[str, Any] = {"images": int(m.sum()), "one_crop": roc_auc(y[m], s["one"][m])}
        for k in crops:
            aucs = [roc_auc(y[m], s["many"][(k, i)][m]) for i in range(seeds)]
            row[f"crops_{k}"] = {"mean": float(np.mean(aucs)), "min": min(aucs), "max": max(aucs)}
        table[name] = row
    diffs = {}
    for k in crops:
        for name, m in parts(s).items():
            if name == "val+test" or name.startswith("holdout"):
                diffs[f"crops_{k} {name}"] = paired_difference(
                    y[m], s["one"][m], s["many"][(k, 0)][m], s["patient"][m], resamples
                )
    prob = 1 / (1 + np.exp(-s["spread"]))
    moved = prob.max(axis=0) - prob.min(axis=0)
    return {
        "roc_auc": table,
        "paired_difference": diffs,
        "probability_spread": {
            "crops": max(crops),
            "median": float(np.median(moved)),
            "p90": float(np.percentile(moved, 90)),
            "max": float(moved.max()),
        },
        "jitter": s["jitter"],
        "seeds": seeds,
    }


def format_table(summary: dict[str, Any], crops: Sequence[int]) -> str:
    head = "| images | n | one crop | " + " | ".join(f"{k} crops" for k in crops) + " |"
    lines = [head, "|---" * (3 + len(crops)) + "|"]
    for name, row in summary["roc_auc"].items():
        cells = [f"{row[f'crops_{k}']['mean']:.3f} ({row[f'crops_{k}']['min']:.3f}-"
                 f"{row[f'crops_{k}']['max']:.3f})" for k in crops]  # fmt: skip
        lines.append(f"| {name} | {row['images']} | {row['one_crop']:.3f} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    lines += ["", "| K crops, images | ROC AUC difference | 95% CI | resamples <= 0 |",
              "|---|---|---|---|"]  # fmt: skip
    for name, d in summary["paired_difference"].items():
        lines.append(f"| {name} | {d['diff']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | "
                     f"{d['share_at_or_below_0']:.3f} |")  # fmt: skip
    sp = summary["probability_spread"]
    lines += ["", f"probability max - min over {sp['crops']} crops: median {sp['median']:.3f}, "
              f"p90 {sp['p90']:.3f}, max {sp['max']:.3f}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--labels", type=Path, action="append", required=True)
    p.add_argument("--images", type=Path, action="append", default=[])
    p.add_argument("--crops", default="2,4,8")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    images = a.images + [lab.parent for lab in a.labels[len(a.images) :]]
    crops = [int(k) for k in a.crops.split(",")]
    s = score(a.models, list(zip(a.labels, images, strict=True)), crops=crops, seeds=a.seeds,
              threads=a.threads)  # fmt: skip
    summary = summarise(s, crops, a.seeds, a.resamples)
    print(format_table(summary, crops))
    if a.out:
        a.out.write_text(json.dumps({"models": str(a.models), **summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
