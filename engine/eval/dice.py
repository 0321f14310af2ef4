"""The segmenter's Dice per split, with a patient-bootstrap 95% interval of its mean.

What `cxr train segmenter` stores in the segmenter's card and engine.eval.segmentation recomputes
for an existing models directory; a floor below both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.eval.bootstrap import CONFIDENCE, cluster_bootstrap, patient_codes
from engine.train.splits import SPLITS

BOOTSTRAP_RESAMPLES = 2000
DICE_DEFINITION = (
    "hard Dice per image at the segmenter's input size (mask resized bilinear, >= 0.5), "
    "exported model under ONNX Runtime FP32"
)


def dice_definition(*, seed: int, resamples: int) -> str:
    """The card's metrics definition: the Dice and how its interval was made."""
    return (
        f"{DICE_DEFINITION}; ci95: {CONFIDENCE:.0%} percentile bootstrap of the split's mean "
        "Dice, resampling its patients with replacement (all images of each drawn patient; "
        f"engine.eval.bootstrap), {resamples} resamples, seed {seed}"
    )


def dice_summary(
    dice: np.ndarray,
    patients: Sequence[object],
    *,
    rng: np.random.Generator,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """images, patients, mean, min, median of per-image Dice, and ci95 (None with 0 resamples):
    the percentile interval of the mean over patient-bootstrap resamples."""
    dice = np.asarray(dice, np.float64).reshape(-1)
    if dice.size == 0 or dice.size != len(patients):
        raise ValueError(f"need one patient per Dice value, got {dice.size} and {len(patients)}")
    codes = patient_codes(patients)
    ci = cluster_bootstrap(
        lambda idx: {"mean": float(dice[idx].mean())}, codes, resamples=resamples, rng=rng
    ).get("mean")
    return {
        "images": int(dice.size),
        "patients": int(codes.max()) + 1,
        "mean": float(dice.mean()),
        "min": float(dice.min()),
        "median": float(np.median(dice)),
        "ci95": ci.to_json() if ci is not None else None,
    }


def dice_summaries(
    per_split: Mapping[str, tuple[np.ndarray, Sequence[object]]],
    *,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, dict[str, Any]]:
    """`dice_summary` per split (train, val, test order), each split with its own stream of
    np.random.SeedSequence(seed), so a split's interval does not depend on the others."""
    unknown = sorted(set(per_split) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected {SPLITS}")
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    return {
        name: dice_summary(*per_split[name], rng=np.random.default_rng(stream), resamples=resamples)
        for name, stream in zip(SPLITS, streams, strict=True)
        if name in per_split
    }
