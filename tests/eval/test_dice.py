"""engine.eval.dice: segmenter Dice with patient-bootstrap intervals: known answers and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from engine.eval import dice as dice_mod
from engine.train.metrics import dice_per_image


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# dice_summary: known answers


def test_perfect_masks_give_dice_one_with_interval_one():
    truth = (_rng().random((6, 1, 16, 16)) > 0.5).astype(np.float32)
    truth[5] = 0  # empty mask predicted empty: Dice 1 by definition
    dice = dice_per_image(truth.copy(), truth)
    s = dice_mod.dice_summary(dice, ["a", "a", "b", "c", "c", "c"], rng=_rng(), resamples=500)
    assert (s["images"], s["patients"]) == (6, 3)
    assert s["mean"] == s["min"] == s["median"] == 1.0
    assert s["ci95"] == {"low": 1.0, "high": 1.0, "valid_resamples": 500, "resamples": 500}


def test_one_patient_gives_a_degenerate_interval_at_the_mean():
    """Every resample draws the one patient, so every resample mean is the mean itself: the
    interval is a point. Resampling images instead would give a real interval here."""
    dice = np.array([0.80, 0.90, 0.95, 0.70])
    s = dice_mod.dice_summary(dice, ["p"] * 4, rng=_rng(), resamples=300)
    assert s["patients"] == 1
    assert s["ci95"]["low"] == pytest.approx(dice.mean(), abs=1e-12)
    assert s["ci95"]["high"] == pytest.approx(dice.mean(), abs=1e-12)
    by_image = dice_mod.dice_summary(dice, list("wxyz"), rng=_rng(), resamples=300)["ci95"]
    assert by_image["low"] < dice.mean() < by_image["high"]


def test_two_patients_interval_spans_the_patient_means():
    """Two patients: a quarter of the resamples draw each patient twice, so the 2.5% and 97.5%
    percentiles are exactly the two patients' own mean Dice."""
    dice = np.array([0.6, 0.8, 0.9])  # patient a: 0.7, patient b: 0.9
    ci = dice_mod.dice_summary(dice, ["a", "a", "b"], rng=_rng(), resamples=2000)["ci95"]
    assert ci["low"] == pytest.approx(0.7) and ci["high"] == pytest.approx(0.9)


def test_bootstrap_is_reproducible_with_a_seed_and_each_split_has_its_own_stream():
    rng = _rng(1)
    per_split = {
        name: (rng.uniform(0.8, 1.0, n), rng.integers(0, n // 2, n).tolist())
        for name, n in (("train", 40), ("val", 12), ("test", 14))
    }
    a = dice_mod.dice_summaries(per_split, seed=5, resamples=400)
    assert a == dice_mod.dice_summaries(per_split, seed=5, resamples=400)
    assert (
        a["test"]["ci95"]
        != dice_mod.dice_summaries(per_split, seed=6, resamples=400)["test"]["ci95"]
    )
    alone = dice_mod.dice_summaries({"test": per_split["test"]}, seed=5, resamples=400)
    assert alone["test"] == a["test"]
    for s in a.values():
        assert s["ci95"]["low"] < s["mean"] < s["ci95"]["high"]
        assert s["ci95"]["valid_resamples"] == 400
    assert "0 resamples" in dice_mod.dice_definition(seed=0, resamples=0)
    assert dice_mod.dice_summary(np.ones(3), list("abc"), rng=_rng(), resamples=0)["ci95"] is None
