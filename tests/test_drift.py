"""engine/drift.py on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import drift
from engine.errors import ConfigError


def test_psi_of_identical_distributions_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=100_000), rng.uniform(size=100_000)
    assert drift.psi(a, b) < 0.001
    assert drift.psi(a, a) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_the_formula_for_known_bin_shares():
    # reference: uniform, so its deciles are the bins; new: half the mass moved from the lower
    # five deciles to the upper five (shares 0.05 x 5, 0.15 x 5)
    ref = (np.arange(100_000) + 0.5) / 100_000
    lower = np.repeat(np.arange(5) / 10 + 0.05, 5_000)
    upper = np.repeat(np.arange(5, 10) / 10 + 0.05, 15_000)
    new = np.concatenate([lower, upper])
    expected = 5 * (0.05 - 0.1) * math.log(0.5) + 5 * (0.15 - 0.1) * math.log(1.5)
    assert drift.psi(ref, new) == pytest.approx(expected, abs=1e-3)


def test_psi_of_shifted_distributions_is_large_and_finite():
    rng = np.random.default_rng(1)
    ref = rng.beta(2, 5, size=2000)
    new = rng.beta(5, 2, size=2000)
    value = drift.psi(ref, new)
    assert math.isfinite(value) and value > 1.0
    # monotone transforms of both sets leave it unchanged (quantile bins)
    assert drift.psi(np.log(ref), np.log(new)) == pytest.approx(value)


def test_psi_survives_ties_and_empty_bins():
    ref = np.array([0.0] * 50 + [1.0] * 50)  # only two distinct values: edges merge
    assert drift.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi(ref, np.ones(100)) > 0.5
    with pytest.raises(ValueError):
        drift.psi(ref, np.array([]))


def _cluster(rng, center: np.ndarray, n: int, spread: float) -> np.ndarray:
    return drift.unit_rows(center + spread * rng.standard_normal((n, center.size)))


def test_mean_shift_zero_for_same_direction_and_one_for_orthogonal():
    rng = np.random.default_rng(2)
    e0, e1 = np.eye(16)[0], np.eye(16)[1]
    a = _cluster(rng, e0, 500, 0.05)
    assert drift.mean_shift(a, _cluster(rng, e0, 500, 0.05)) < 0.002
    assert drift.mean_shift(a, _cluster(rng, e1, 500, 0.05)) > 0.95
    assert drift.mean_shift(np.tile(e0, (3, 1)), np.tile(e1, (3, 1))) == pytest.approx(1.0)


def test_nn_distances_exact_and_self_excluded():
    base = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
    d = drift.nn_distances(q, base)
    assert d == pytest.approx([0.0, 1 - 1 / math.sqrt(2)], abs=1e-6)
    # against itself, each basis vector's nearest other one is orthogonal: distance 1
    assert drift.nn_distances(base, base, exclude_self=True) == pytest.approx([1.0] * 4)
    # chunking does not change the answer
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 8))
    assert drift.nn_distances(x, x, exclude_self=True, chunk=5) == pytest.approx(
        drift.nn_distances(x, x, exclude_self=True, chunk=512)
    )


def test_ood_share_near_one_percent_in_distribution_and_one_for_a_new_cluster():
    rng = np.random.default_rng(4)
    center = rng.standard_normal(32)
    ref = _cluster(rng, center, 1000, 0.5)
    same = _cluster(rng, center, 1000, 0.5)
    share, cutoff = drift.ood_share(ref, same)
    assert share < 0.04 and cutoff > 0
    far = _cluster(rng, -center, 200, 0.5)
    assert drift.ood_share(ref, far)[0] == 1.0


def test_compare_and_flagged():
    rng = np.random.default_rng(5)
    center = rng.standard_normal(32)
    ref_emb, new_emb = _cluster(rng, center, 400, 0.5), _cluster(rng, center, 400, 0.5)
    ref_p, new_p = rng.beta(2, 5, 400), rng.beta(2, 5, 400)
    t = drift.DriftThresholds()
    same = drift.compare(ref_p, new_p, 0.5, ref_emb, new_emb)
    assert same.n_new == 400 and same.n_reference_sampled == 400
    assert drift.flagged(same, t) == []
    shifted = drift.compare(
        ref_p, rng.beta(5, 2, 400), 0.5, ref_emb, _cluster(rng, -center, 400, 0.5)
    )
    assert shifted.positive_rate_change > 0.5
    assert drift.flagged(shifted, t) == ["psi", "positive_rate", "embedding_shift", "ood_share"]
    # too few new images: measured, not flagged
    few = drift.compare(ref_p, rng.beta(5, 2, 10), 0.5, ref_emb, _cluster(rng, -center, 10, 0.5))
    assert few.psi > t.psi and drift.flagged(few, t) == []
    # no embeddings: the probability measures alone
    bare = drift.compare(ref_p, new_p, 0.5)
    assert bare.embedding_shift is None and bare.ood_share is None
    assert set(bare.to_json()) >= {"psi", "positive_rate_change", "ood_share", "n_new"}


def test_sampling_caps_both_sets_deterministically():
    idx = drift.sample_rows(10_000, cap=100)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, drift.sample_rows(10_000, cap=100))
    assert np.array_equal(drift.sample_rows(7, cap=100), np.arange(7))


def test_thresholds_parse_and_validate():
    t = drift.DriftThresholds.parse(["psi=0.4", "min-images=8", "ood_share=0.2"])
    assert (t.psi, t.min_images, t.ood_share) == (0.4, 8, 0.2)
    assert t.positive_rate == drift.DriftThresholds().positive_rate
    for bad in (["psi"], ["nope=1"], ["psi=abc"], ["psi=-1"], ["min_images=1.5"]):
        with pytest.raises(ConfigError):
            drift.DriftThresholds.parse(bad)


def test_noise_limits_are_exceeded_about_one_time_in_a_hundred_under_no_change():
    rng = np.random.default_rng(6)
    draws, psi_over, rate_over = 2000, 0, 0
    for _ in range(draws):
        ref, new = rng.uniform(size=300), rng.uniform(size=50)
        m = drift.compare(ref, new, 0.7)
        psi_over += m.psi > m.psi_noise_limit
        rate_over += abs(m.positive_rate_change) > m.positive_rate_noise_limit
    assert 0.002 <= psi_over / draws <= 0.03
    assert rate_over / draws <= 0.03
    # the limit shrinks as 1/n + 1/m: a large night is held to a tighter bar
    ref = rng.uniform(size=300)
    assert drift.psi_noise_limit(ref, 1000) < drift.psi_noise_limit(ref, 50) / 3
    assert drift.chi2_quantile(9) == pytest.approx(21.666, rel=0.01)


def test_a_psi_within_noise_is_not_flagged_even_above_the_threshold():
    rng = np.random.default_rng(7)
    t = drift.DriftThresholds(psi=0.01, min_images=10)
    m = drift.compare(rng.uniform(size=300), rng.uniform(size=20), 0.5)
    assert t.psi < m.psi < m.psi_noise_limit
    assert "psi" not in drift.flagged(m, t)
