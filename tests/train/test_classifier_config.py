"""engine.train.classifier_config: `cxr train classifier`'s options, checked when the config is
made (each error names its option), and what the run reads from them: the labelled sets, the
excluded groups, the augmentation and the threshold rule."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from engine.errors import ConfigError  # noqa: E402
from engine.train.classifier_config import ClassifierTrainConfig  # noqa: E402
from engine.train.datasets import LabelSet  # noqa: E402
from engine.train.metrics import THRESHOLD_RULE, sensitivity_rule  # noqa: E402


def config(**kw) -> ClassifierTrainConfig:
    base = dict(labels=Path("l.csv"), images=Path("i"), segmenter=Path("s"), out=Path("o"))
    return ClassifierTrainConfig(**(base | kw))


def test_defaults_are_a_valid_config_and_it_is_frozen():
    cfg = config()
    assert cfg.arch == "resnet50" and cfg.standardize and cfg.acquisition
    assert cfg.threshold_sensitivity is None and cfg.exclude == () and cfg.extra == ()
    with pytest.raises(FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ClassifierTrainConfig(Path("l"), Path("i"), Path("s"), Path("o"))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "unet"}, "--arch must be one of"),
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 1}, "--batch-size must be at least 2"),
        ({"patience": 0}, "--patience must be at least 1"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"calibration_images": 0}, "--calibration-images must be at least 1, not 0"),
        ({"int8_tune_epochs": -1}, "--int8-tune-epochs must be 0 or more, not -1"),
        ({"epoch_images": 3, "batch_size": 4}, r"--epoch-images must be at least --batch-size"),
        ({"source_balance": 1.5}, r"--source-balance must be in \[0, 1\], not 1.5"),
        ({"source_balance": -0.1}, r"--source-balance must be in \[0, 1\]"),
        ({"context_swap": 2.0}, r"--context-swap must be in \[0, 1\], not 2.0"),
        ({"threshold_sensitivity": 0.0}, r"--threshold-sensitivity must be in \(0, 1\]"),
        ({"threshold_sensitivity": 1.2}, r"--threshold-sensitivity must be in \(0, 1\]"),
        ({"exclude": ("nih-chestxray14",)}, "expected SOURCE:LABEL"),
        ({"exclude": ("nih:2",)}, "expected SOURCE:LABEL"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_edges_of_the_ranges_are_accepted():
    config(
        source_balance=0.0,
        context_swap=1.0,
        threshold_sensitivity=1.0,
        int8_tune_epochs=0,
        epoch_images=16,
        batch_size=16,
        arch="tiny-classifier",
    )
    config(source_balance=1.0, context_swap=0.0, calibration_images=1, arch="efficientnet-lite0")


def test_sets_start_with_the_primary_one_and_exclusions_are_parsed():
    extra = (LabelSet(Path("b/labels.csv"), Path("b")), LabelSet(Path("c.csv"), Path("c")))
    cfg = config(extra=extra, exclude=("nih-chestxray14:0", "a:b:1"))
    assert cfg.sets == (LabelSet(Path("l.csv"), Path("i")), *extra)
    # the label is after the last colon: a source may itself contain colons
    assert cfg.excluded == (("nih-chestxray14", 0), ("a:b", 1))


def test_augment_follows_hflip():
    assert config().augment.hflip is False
    assert config(hflip=True).augment.hflip is True
    assert config().augment.box_scale > 0  # jitter on: the training crops are augmented


def test_threshold_rule_is_youden_unless_a_sensitivity_is_asked_for():
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t, rule = config().threshold(probs, labels)
    assert rule == THRESHOLD_RULE
    assert t == pytest.approx(0.35)  # all positives above, 3 of 4 negatives below: J = 0.75
    t, rule = config(threshold_sensitivity=0.75).threshold(probs, labels)
    assert rule == sensitivity_rule(0.75)
    assert t == pytest.approx(0.65)  # the highest threshold that still calls 3 of 4 positives
    assert (probs[labels == 1] >= t).mean() == 0.75
