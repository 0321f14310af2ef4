"""The options of `cxr train classifier`: one frozen dataclass, checked when it is made.

A floor below classifier.py (the run) and classifier_fit.py (its training loop), which both
read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError
from engine.train import loop
from engine.train.augment import CropAugment
from engine.train.datasets import LabelSet, parse_group
from engine.train.metrics import (
    THRESHOLD_RULE,
    sensitivity_rule,
    sensitivity_threshold,
    youden_threshold,
)
from engine.train.specs import CLASSIFIER_ARCHS


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    labels: Path
    images: Path
    segmenter: Path
    out: Path
    epochs: int = 80
    seed: int = 0
    arch: str = "resnet50"
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    # = epochs: run the whole schedule and keep the best validation epoch. On a small validation
    # split the ROC AUC jumps between epochs, so stopping early stops on a lucky epoch
    # (docs/measurements.md).
    patience: int = 80
    hflip: bool = False  # off: anatomy is not mirror-symmetric; turn on only if val shows a gain
    calibration_images: int = 256
    int8_tune_epochs: int = 12  # 0: calibration only
    int8_tune_images: int | None = None  # crops to tune on (None: the calibration crops)
    int8_float_depthwise: bool = False  # depthwise convolutions left in float (export.Int8Recipe)
    int8_float_ends: int = 0  # the first and last N convolutions left in float (export.Int8Recipe)
    threads: int = 2
    precision: str = "auto"
    # Further labelled sets (training data; a seeded slice per source held out), see datasets.py
    extra: tuple[LabelSet, ...] = ()
    holdout: float = 0.05
    exclude: tuple[str, ...] = ()  # SOURCE:LABEL groups never trained on (leave-one-source-out)
    cache: Path | None = None  # crop cache folder (default: OUT/crop-cache)
    epoch_images: int | None = None  # draws per epoch (default: the training images)
    source_balance: float = 0.5  # 0: sources as in the data, 1: equal per source, per class
    select_source: str | None = None  # choose the epoch on this source's validation images
    acquisition: bool = True  # randomise the acquisition look (augment.Acquisition)
    context_swap: float = 0.0  # share of crops whose context comes from another image
    # weight of the two-view term: each training crop is also drawn a second time (another box
    # jitter and augmentation) and the squared difference of the two logits is added (0: off)
    consistency: float = 0.0
    threshold_sensitivity: float | None = None  # None: Youden's J on the validation patients
    standardize: bool = True  # per-image standardisation inside the network
    resume: bool = False

    @property
    def augment(self) -> CropAugment:
        return CropAugment(hflip=self.hflip)

    def threshold(self, probs: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
        """The decision threshold chosen on validation probabilities, and its rule."""
        if self.threshold_sensitivity is None:
            return youden_threshold(probs, labels), THRESHOLD_RULE
        target = self.threshold_sensitivity
        return sensitivity_threshold(probs, labels, target), sensitivity_rule(target)

    @property
    def sets(self) -> tuple[LabelSet, ...]:
        return (LabelSet(self.labels, self.images), *self.extra)

    @property
    def excluded(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_group(g) for g in self.exclude)

    def __post_init__(self) -> None:
        loop.check_common(self, CLASSIFIER_ARCHS)
        if self.calibration_images < 1:
            raise ConfigError(
                f"--calibration-images must be at least 1, not {self.calibration_images}"
            )
        if self.int8_float_ends < 0:
            raise ConfigError(f"--int8-float-ends must be 0 or more, not {self.int8_float_ends}")
        if self.int8_tune_images is not None and self.int8_tune_images < 1:
            raise ConfigError(f"--tune-images must be at least 1, not {self.int8_tune_images}")
        if self.int8_tune_epochs < 0:
            raise ConfigError(f"--int8-tune-epochs must be 0 or more, not {self.int8_tune_epochs}")
        if self.epoch_images is not None and self.epoch_images < self.batch_size:
            raise ConfigError(
                f"--epoch-images must be at least --batch-size ({self.batch_size}), "
                f"not {self.epoch_images}"
            )
        if not 0.0 <= self.source_balance <= 1.0:
            raise ConfigError(f"--source-balance must be in [0, 1], not {self.source_balance}")
        if not 0.0 <= self.context_swap <= 1.0:
            raise ConfigError(f"--context-swap must be in [0, 1], not {self.context_swap}")
        if not 0.0 <= self.consistency <= 100.0:
            raise ConfigError(f"--consistency must be in [0, 100], not {self.consistency}")
        if self.threshold_sensitivity is not None and not 0.0 < self.threshold_sensitivity <= 1:
            raise ConfigError(
                f"--threshold-sensitivity must be in (0, 1], not {self.threshold_sensitivity}"
            )
        _ = self.excluded  # parse now: a typo fails before hours of decoding
