"""engine.eval.bootstrap: the patient bootstrap resamples whole patients, is reproducible with a
seed, and its intervals bracket the spread."""

from __future__ import annotations

import numpy as np

from engine.eval import bootstrap as bs
from engine.eval import metrics as m


def test_resamples_take_whole_patients():
    codes = bs.patient_codes(["p3", "p1", "p3", "p2", "p1", "p3", "p4"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = bs.resample_images(codes, rng)
        times = np.bincount(idx, minlength=codes.size)
        for patient in np.unique(codes):
            assert np.unique(times[codes == patient]).size == 1  # all images of a patient alike
        drawn = sum(times[codes == p][0] for p in np.unique(codes))
        assert drawn == 4  # as many patient draws as there are patients


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.random(60)
    codes = bs.patient_codes(rng.integers(0, 25, 60))

    def run(seed: int):
        return bs.cluster_bootstrap(
            lambda i: m.all_metrics(y[i], s[i], s[i] >= 0.5),
            codes,
            resamples=150,
            rng=np.random.default_rng(seed),
        )

    assert run(5) == run(5)
    assert run(5)["roc_auc"] != run(6)["roc_auc"]


def auc_interval(y: np.ndarray, s: np.ndarray, codes: np.ndarray, resamples: int):
    """The patient-bootstrap interval of the ROC AUC of scores s for labels y (seed 0)."""
    return bs.cluster_bootstrap(
        lambda i: {"roc_auc": m.roc_auc(y[i], s[i])},
        codes,
        resamples=resamples,
        rng=np.random.default_rng(0),
    )["roc_auc"]


def test_bootstrap_resamples_patients_not_images():
    """Two patients with 20 images each, one all positive, one all negative. Drawing patients,
    half the resamples hold one patient only, so the AUC is undefined there and dropped;
    drawing images would almost never miss a class."""
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    s = np.random.default_rng(2).random(40)
    codes = bs.patient_codes(["a"] * 20 + ["b"] * 20)
    ci = auc_interval(y, s, codes, 400)
    assert 140 < ci.valid < 260  # about 200 of 400 (binomial, p = 1/2)
    assert ci.resamples == 400
    by_image = auc_interval(y, s, bs.patient_codes(list(range(40))), 400)
    assert by_image.valid == 400


def test_bootstrap_interval_brackets_the_spread_and_counts_valid():
    y = np.array([0, 1] * 30)
    s = np.where(y == 1, 0.7, 0.3) + np.random.default_rng(4).normal(0, 0.2, 60)
    codes = bs.patient_codes(range(60))
    ci = auc_interval(y, s, codes, 300)
    assert ci.low < m.roc_auc(y, s) < ci.high <= 1.0
    assert ci.valid == 300
