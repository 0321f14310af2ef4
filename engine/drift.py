"""Drift between a reference set of screened images and a new one: pure NumPy, no I/O.

Four measures, each blind to a different kind of change:

    psi                 population stability index of the probabilities, over the reference's
                        deciles: the score distribution moved (a new population, a broken
                        preprocessing step) even where the decisions did not
    positive_rate       change in the share of positive decisions (new - reference), at one
                        threshold for both sets, so a changed --threshold is not read as drift
    embedding_shift     1 - cosine between the mean unit embeddings of the two sets: the images
                        look different on average, whatever the classifier makes of them
    ood_share           share of new images whose nearest reference neighbour (cosine distance)
                        is farther than the reference's own 99th percentile of nearest-neighbour
                        distances (each reference image against the others): images unlike
                        anything in the reference, e.g. a new scanner, protocol or age group

The thresholds that turn these into a flag are `DriftThresholds`; the defaults were chosen on
the real data (benchmarks/drift_calibration.py, results and reasoning in docs/nightly.md).
PSI and the positive-rate change of two samples that come from one population are not zero:
their sampling noise grows as 1/n_new + 1/n_reference. So each is flagged only when it passes
both its threshold and its noise limit, the value that sampling alone exceeds one time in a
hundred (PSI ~ chi-square(bins - 1) * (1/n + 1/m); the rate change, a two-proportion normal
limit). Below `min_images` new images nothing is flagged at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from engine.errors import ConfigError

PSI_BINS = 10
OOD_QUANTILE = 0.99
NOISE_Z_ONE_SIDED = 2.3263  # standard normal 99th percentile (PSI is one-sided)
NOISE_Z_TWO_SIDED = 2.5758  # 99.5th: a rate change may go either way
# Both sets are sampled down to this many images (seeded) before the nearest-neighbour search:
# the search is quadratic, and at this size the OOD share's standard error is below 0.3 points.
MAX_SAMPLE = 2000
SAMPLE_SEED = 0


@dataclass(frozen=True, kw_only=True)
class DriftThresholds:
    """A run is flagged when any measure passes its threshold (with >= min_images new images)."""

    psi: float = 0.35
    positive_rate: float = 0.25  # absolute change of the positive share
    embedding_shift: float = 0.015
    ood_share: float = 0.15
    min_images: int = 50

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"drift threshold {f.name} must be >= 0, not {value!r}")

    @classmethod
    def parse(cls, items: list[str] | tuple[str, ...]) -> DriftThresholds:
        """`["psi=0.3", "min_images=20"]` -> thresholds (the rest keep their defaults)."""
        names = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ConfigError(
                    f"--drift-threshold {item!r}: expected NAME=VALUE with NAME one of "
                    f"{', '.join(names)}"
                )
            try:
                values[name] = int(text) if name == "min_images" else float(text)
            except ValueError:
                raise ConfigError(f"--drift-threshold {item!r}: {text!r} is not a number") from None
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class DriftMetrics:
    n_reference: int
    n_new: int
    psi: float
    psi_noise_limit: float  # the PSI sampling alone exceeds 1% of the time at these sizes
    positive_rate_reference: float
    positive_rate_new: float
    positive_rate_change: float
    positive_rate_noise_limit: float  # likewise for |positive_rate_change|
    embedding_shift: float | None  # None when either set has no embeddings
    ood_share: float | None
    ood_cutoff: float | None  # the reference's own 99th percentile NN distance
    n_reference_sampled: int
    n_new_sampled: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quantile_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged, so bins may be fewer)."""
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.unique(np.quantile(np.asarray(reference, np.float64), qs))


def psi(reference: np.ndarray, new: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of `new` against `reference`, over the reference's quantiles.

    sum_i (q_i - p_i) * ln(q_i / p_i) with p, q the shares of each set per bin; half a count is
    added to every bin of both sets so that an empty bin gives a large, finite value.
    """
    reference = np.asarray(reference, np.float64)
    new = np.asarray(new, np.float64)
    if reference.size == 0 or new.size == 0:
        raise ValueError("psi needs at least one value in each set")
    edges = quantile_edges(reference, bins)
    n_bins = edges.size + 1
    p = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=n_bins) + 0.5
    q = np.bincount(np.searchsorted(edges, new, side="right"), minlength=n_bins) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_quantile(df: int, z: float = NOISE_Z_ONE_SIDED) -> float:
    """Chi-square quantile by the Wilson-Hilferty approximation (within 1% for df >= 3)."""
    if df < 1:
        return 0.0
    a = 2.0 / (9.0 * df)
    return float(df * (1.0 - a + z * math.sqrt(a)) ** 3)


def psi_noise_limit(reference: np.ndarray, n_new: int, bins: int = PSI_BINS) -> float:
    """The PSI two samples of one population (sizes len(reference), n_new) exceed 1% of the time.

    PSI is close to the two-sample chi-square statistic times 1/n + 1/m, which under no change
    follows chi-square with (bins - 1) degrees of freedom.
    """
    df = quantile_edges(reference, bins).size  # bins - 1, fewer where quantiles tie
    return chi2_quantile(df) * (1.0 / n_new + 1.0 / len(reference))


def rate_noise_limit(rate_ref: float, rate_new: float, n_ref: int, n_new: int) -> float:
    """|rate change| that sampling alone exceeds 1% of the time (pooled two-proportion limit)."""
    pooled = (rate_ref * n_ref + rate_new * n_new) / (n_ref + n_new)
    return NOISE_Z_TWO_SIDED * math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_ref + 1.0 / n_new))


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_shift(reference: np.ndarray, new: np.ndarray) -> float:
    """1 - cosine between the mean unit embeddings of two sets (0: same direction)."""
    a = unit_rows(reference).mean(axis=0, dtype=np.float64)
    b = unit_rows(new).mean(axis=0, dtype=np.float64)
    denom = max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return float(1.0 - np.dot(a, b) / denom)


def nn_distances(
    queries: np.ndarray, base: np.ndarray, *, exclude_self: bool = False, chunk: int = 512
) -> np.ndarray:
    """Cosine distance from each query to its nearest row of `base` (exact, chunked).

    With `exclude_self`, queries and base are the same set and each row's match with itself is
    left out (a duplicate image elsewhere in the set still counts, at distance ~0).
    """
    q, b = unit_rows(queries), unit_rows(base)
    if exclude_self and b.shape[0] < 2:
        raise ValueError("a set needs at least two rows to measure its own NN distances")
    out = np.empty(q.shape[0], np.float64)
    for start in range(0, q.shape[0], chunk):
        sims = q[start : start + chunk] @ b.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        out[start : start + chunk] = 1.0 - sims.max(axis=1)
    return np.clip(out, 0.0, 2.0)


def ood_cutoff(reference: np.ndarray, quantile: float = OOD_QUANTILE) -> float:
    """The `quantile` of the reference's own nearest-neighbour distances."""
    return float(np.quantile(nn_distances(reference, reference, exclude_self=True), quantile))


def ood_share(
    reference: np.ndarray,
    new: np.ndarray,
    quantile: float = OOD_QUANTILE,
    *,
    cutoff: float | None = None,
) -> tuple[float, float]:
    """(share of new rows farther from the reference than its own `quantile`, that cutoff).

    Pass `cutoff` (from `ood_cutoff` of the same reference) to skip recomputing it."""
    if cutoff is None:
        cutoff = ood_cutoff(reference, quantile)
    far = nn_distances(new, reference) > cutoff
    return float(far.mean()), cutoff


def sample_rows(n: int, cap: int = MAX_SAMPLE, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Indices of at most `cap` of n rows, seeded and sorted (all rows when n <= cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def compare(
    ref_prob: np.ndarray,
    new_prob: np.ndarray,
    threshold: float,
    ref_emb: np.ndarray | None = None,
    new_emb: np.ndarray | None = None,
    *,
    cap: int = MAX_SAMPLE,
    ood_cutoff: float | None = None,
) -> DriftMetrics:
    """All four measures of `new` against `reference` (probabilities, optional embeddings)."""
    ref_prob = np.asarray(ref_prob, np.float64)
    new_prob = np.asarray(new_prob, np.float64)
    rate_ref = float(np.mean(ref_prob >= threshold))
    rate_new = float(np.mean(new_prob >= threshold))
    shift = share = cutoff = None
    n_ref_s = n_new_s = 0
    if (
        ref_emb is not None
        and new_emb is not None
        and len(ref_emb) >= 2
        and len(new_emb) >= 1
        and ref_emb.shape[1:] == new_emb.shape[1:]
    ):
        shift = mean_shift(ref_emb, new_emb)
        ri, ni = sample_rows(len(ref_emb), cap), sample_rows(len(new_emb), cap)
        share, cutoff = ood_share(ref_emb[ri], new_emb[ni], cutoff=ood_cutoff)
        n_ref_s, n_new_s = len(ri), len(ni)
    return DriftMetrics(
        n_reference=int(ref_prob.size),
        n_new=int(new_prob.size),
        psi=psi(ref_prob, new_prob),
        psi_noise_limit=psi_noise_limit(ref_prob, new_prob.size),
        positive_rate_reference=rate_ref,
        positive_rate_new=rate_new,
        positive_rate_change=rate_new - rate_ref,
        positive_rate_noise_limit=rate_noise_limit(
            rate_ref, rate_new, ref_prob.size, new_prob.size
        ),
        embedding_shift=shift,
        ood_share=share,
        ood_cutoff=cutoff,
        n_reference_sampled=n_ref_s,
        n_new_sampled=n_new_s,
    )


def flagged(metrics: DriftMetrics, thresholds: DriftThresholds) -> list[str]:
    """Names of the measures past their threshold (PSI and rate: and their noise limit); none
    below `min_images` new images."""
    m, t = metrics, thresholds
    if m.n_new < t.min_images:
        return []
    found = []
    if m.psi > max(t.psi, m.psi_noise_limit):
        found.append("psi")
    if abs(m.positive_rate_change) > max(t.positive_rate, m.positive_rate_noise_limit):
        found.append("positive_rate")
    if metrics.embedding_shift is not None and metrics.embedding_shift > thresholds.embedding_shift:
        found.append("embedding_shift")
    if metrics.ood_share is not None and metrics.ood_share > thresholds.ood_share:
        found.append("ood_share")
    return found
