"""engine.train.metrics: ROC AUC, the Youden threshold and the threshold for a sensitivity target
(with ClassifierTrainConfig's choice between them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def test_auc_and_youden_threshold():
    from engine.train.metrics import roc_auc, youden_threshold

    y = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.5)
    assert roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    # Perfect separation anywhere in (0.4, 0.6): the midpoint of the gap is taken.
    assert youden_threshold(np.array([0.1, 0.4, 0.6, 0.9]), y) == pytest.approx(0.5)
    # Two thresholds with the same J: the lower one wins.
    t = youden_threshold(np.array([0.1, 0.3, 0.2, 0.9]), y)
    assert t == pytest.approx(0.15)


def test_sensitivity_threshold_is_the_highest_that_meets_the_target():
    from engine.errors import ConfigError
    from engine.train.classifier_config import ClassifierTrainConfig
    from engine.train.metrics import sensitivity_threshold

    probs = np.array([0.05, 0.2, 0.5, 0.3, 0.6, 0.7, 0.95])
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    assert sensitivity_threshold(probs, y, 1.0) == pytest.approx(0.25)  # all 4 positives
    assert sensitivity_threshold(probs, y, 0.75) == pytest.approx(0.55)  # 3 of 4
    assert sensitivity_threshold(probs, y, 0.5) == pytest.approx(0.65)
    assert sensitivity_threshold(probs, np.zeros(7), 0.9) == 0.5  # no positives
    base = dict(labels=Path("l.csv"), images=Path("."), segmenter=Path("s"), out=Path("o"))
    t, rule = ClassifierTrainConfig(**base, threshold_sensitivity=0.75).threshold(probs, y)
    assert t == pytest.approx(0.55) and "at least 0.75" in rule
    t, rule = ClassifierTrainConfig(**base).threshold(probs, y)
    assert "Youden" in rule
    with pytest.raises(ConfigError, match="threshold-sensitivity"):
        ClassifierTrainConfig(**base, threshold_sensitivity=0.0)
    with pytest.raises(ConfigError, match="context-swap"):
        ClassifierTrainConfig(**base, context_swap=2.0)
