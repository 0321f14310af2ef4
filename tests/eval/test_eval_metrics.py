"""engine.eval.metrics: ROC AUC, average precision, curves, confusion counts and rates against
scikit-learn, and known answers (perfect, inverted, constant scores; one class; ECE by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.eval import metrics as m


@pytest.fixture(scope="module")
def sk():
    """scikit-learn's metrics, the reference (a dev dependency; only these tests need it)."""
    return pytest.importorskip("sklearn.metrics")


# ---------------------------------------------------------------------------------------------
# metrics against scikit-learn


def _random_case(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes (sometimes 2% positives) and scores, often heavily tied."""
    n = int(rng.integers(2, 400))
    prevalence = [0.5, 0.02, 0.97, rng.uniform(0.05, 0.95)][i % 4]
    y = (rng.random(n) < prevalence).astype(int)
    y[rng.integers(n)], y[rng.integers(n)] = 0, 1  # both classes, whatever the prevalence
    if y.min() == y.max():
        y[0] = 1 - y[0]
    kind = i % 3
    if kind == 0:
        scores = rng.random(n)
    elif kind == 1:
        scores = np.round(rng.random(n), int(rng.integers(1, 3)))  # many ties
    else:
        scores = rng.choice([0.1, 0.5, 0.5, 0.9], size=n).astype(np.float32)  # few values
    return y, scores


CASES = 120


def test_auc_and_average_precision_agree_with_sklearn(sk):
    rng = np.random.default_rng(20240601)
    for i in range(CASES):
        y, s = _random_case(rng, i)
        assert m.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9), i
        assert m.average_precision(y, s) == pytest.approx(
            sk.average_precision_score(y, s), abs=1e-9
        ), i
        values = m.all_metrics(y, s, s >= 0.5)
        assert values["roc_auc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9)
        assert values["pr_auc"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-9)


def test_curves_agree_with_sklearn_point_for_point(sk):
    rng = np.random.default_rng(7)
    for i in range(CASES):
        y, s = _random_case(rng, i)
        for ours, theirs in (
            (m.roc_curve(y, s), sk.roc_curve(y, s)),
            (
                m.roc_curve(y, s, drop_intermediate=False),
                sk.roc_curve(y, s, drop_intermediate=False),
            ),
            (m.precision_recall_curve(y, s), sk.precision_recall_curve(y, s)),
        ):
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == b.shape, i
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_confusion_and_rates_agree_with_sklearn(sk):
    rng = np.random.default_rng(3)
    for i in range(CASES // 2):  # sklearn's input checks make these calls slow
        y, s = _random_case(rng, i)
        d = s >= rng.choice([0.3, 0.5, 0.7])
        c = m.confusion(y, d)
        (tn, fp), (fn, tp) = sk.confusion_matrix(y, d, labels=[0, 1])
        assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
        r = m.rates(c)
        assert r["accuracy"] == pytest.approx(sk.accuracy_score(y, d), abs=1e-9)
        assert r["sensitivity"] == pytest.approx(sk.recall_score(y, d), abs=1e-9)
        assert r["specificity"] == pytest.approx(sk.recall_score(y, d, pos_label=0), abs=1e-9)
        assert r["f1"] == pytest.approx(sk.f1_score(y, d), abs=1e-9)
        if d.any():
            assert r["ppv"] == pytest.approx(sk.precision_score(y, d), abs=1e-9)
        if not d.all():
            assert r["npv"] == pytest.approx(sk.precision_score(y, d, pos_label=0), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# known answers


def test_perfect_inverted_and_constant_scores():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    perfect = y * 0.8 + 0.1
    assert m.roc_auc(y, perfect) == 1.0
    assert m.average_precision(y, perfect) == 1.0
    assert m.roc_auc(y, 1 - perfect) == 0.0
    constant = np.full(y.size, 0.37)
    assert m.roc_auc(y, constant) == 0.5
    assert m.average_precision(y, constant) == pytest.approx(y.mean(), abs=1e-12)


def test_one_class_makes_the_class_metrics_undefined_not_zero():
    y = np.zeros(5, int)
    s = np.linspace(0.1, 0.9, 5)
    assert np.isnan(m.roc_auc(y, s))
    assert np.isnan(m.average_precision(y, s))
    v = m.all_metrics(y, s, s >= 0.5)
    assert np.isnan(v["sensitivity"]) and np.isnan(v["roc_auc"]) and np.isnan(v["pr_auc"])
    assert v["specificity"] == pytest.approx(2 / 5)  # 0.5, 0.7, 0.9 are called positive
    assert np.isnan(m.rates(m.confusion([1, 0], [False, False]))["ppv"])  # no positive call


def test_ece_hand_computed():
    # bin 0: p 0.05, y 0 -> |0 - 0.05| = 0.05, 1 image
    # bin 1: p 0.15 x2, y 1,0 -> |0.5 - 0.15| = 0.35, 2 images
    # bin 5: p 0.5 (edge -> upper bin), y 1 -> 0.5, 1 image
    # bin 9: p 0.95 x3 and 1.0 (the top edge stays in bin 9), y 1,1,0,1 -> |0.75 - 0.9625|
    p = np.array([0.05, 0.15, 0.15, 0.5, 0.95, 0.95, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1, 1, 0, 1])
    expected = (0.05 + 2 * 0.35 + 0.5 + 4 * abs(0.75 - 0.9625)) / 8
    assert m.ece(y, p) == pytest.approx(expected, abs=1e-12)
    r = m.reliability(y, p)
    assert r.ece == pytest.approx(expected, abs=1e-12)
    assert r.count.tolist() == [1, 2, 0, 0, 0, 1, 0, 0, 0, 4]
    assert r.observed[9] == 0.75 and r.mean_prob[1] == pytest.approx(0.15)
    assert np.isnan(r.observed[2])
    assert r.edges.tolist() == [i / 10 for i in range(11)]


def test_perfectly_calibrated_bins_have_zero_ece():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert m.ece(y, p) == pytest.approx(0.0, abs=1e-12)
