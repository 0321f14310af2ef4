"""Percentile bootstrap confidence intervals that resample patients, not images.

Images of one patient are correlated (a time series of films, the same lungs), so resampling
images as if independent gives intervals that are too narrow. The cluster bootstrap draws
patients with replacement and takes every image of each drawn patient, as often as the patient
was drawn. A resample in which a metric is undefined (e.g. only one class was drawn, so there is
no AUC) is dropped for that metric, and the number of resamples that remained is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
METHOD = (
    "95% percentile bootstrap, resampling patients with replacement (all images of each drawn "
    "patient); resamples where a metric is undefined are dropped for that metric"
)


@dataclass(frozen=True, slots=True)
class Interval:
    low: float  # nan when no resample was valid
    high: float
    valid: int  # resamples in which the metric was defined
    resamples: int

    def to_json(self) -> dict[str, object]:
        finite = self.valid > 0
        return {
            "low": self.low if finite else None,
            "high": self.high if finite else None,
            "valid_resamples": self.valid,
            "resamples": self.resamples,
        }


def patient_codes(patients: Sequence[object]) -> np.ndarray:
    """Dense integer code per image: images of the same patient share a code."""
    _, codes = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1).astype(np.int64)


def resample_images(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of the images of one cluster resample: P patients drawn from the P with
    replacement; each image appears as many times as its patient was drawn."""
    n_patients = int(codes.max()) + 1 if codes.size else 0
    drawn = rng.integers(0, n_patients, size=n_patients)
    times = np.bincount(drawn, minlength=n_patients)
    return np.repeat(np.arange(codes.size), times[codes])


Statistic = Callable[[np.ndarray], Mapping[str, float]]


def cluster_bootstrap(
    statistic: Statistic,
    codes: np.ndarray,
    *,
    resamples: int,
    rng: np.random.Generator,
    confidence: float = CONFIDENCE,
) -> dict[str, Interval]:
    """Percentile intervals of every value `statistic(image_indices)` returns (nan = undefined)."""
    if resamples < 1 or codes.size == 0:
        return {}
    values: dict[str, list[float]] = {}
    for _ in range(resamples):
        for name, value in statistic(resample_images(codes, rng)).items():
            values.setdefault(name, []).append(value)
    tail = (1.0 - confidence) / 2 * 100
    intervals = {}
    for name, series in values.items():
        arr = np.asarray(series, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        low, high = np.percentile(arr, [tail, 100 - tail]) if arr.size else (np.nan, np.nan)
        intervals[name] = Interval(float(low), float(high), int(arr.size), resamples)
    return intervals
