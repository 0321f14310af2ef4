"""The one interface of segment -> lung box -> crop -> classify, on the CPU or the GPU.

A `Stages` object takes the preprocessor's batches in (`ingest`: a host `Preprocessed`, or with
the GPU stages a `DeviceBatch` left in GPU memory) and turns them into one `Predictions` type
(`predict`). The Screener (engine/screener.py) picks the object from its backends: CpuStages
(engine/stages/cpu.py) runs the stages on host arrays, GpuStages (engine/stages/gpu.py) keeps
everything between the two models on the device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.pipeline import DeviceBatch, ImagePreprocessor, Preprocessed, Sample


@dataclass(frozen=True, slots=True)
class Predictions:
    prob: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) normalised, margin included
    fraction: np.ndarray  # (n,) share of segmenter pixels labelled lung
    embedding: np.ndarray  # (n, D) float32
    lung_mask: np.ndarray  # (n, h, w) bool, at the segmenter's resolution (for previews)
    work: np.ndarray | None = None  # (n, S, S) work images, when the batch was on the device


class StageClock:
    """Busy seconds per stage (stages overlap, so these add up to more than the wall time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class Stages(Protocol):
    """What the Screener runs between the preprocessor and the rows."""

    @property
    def device(self) -> str:
        """Where the preprocessor runs for these stages: "cpu", or "gpu" (DALI on the GPU)."""
        ...

    def ingest(
        self, preprocessor: ImagePreprocessor, samples: Sequence[Sample]
    ) -> Preprocessed | DeviceBatch:
        """Preprocess `samples` into memory these stages can run on (called in the pipeline
        thread, so that preprocessing batch n+1 overlaps `predict` on batch n)."""
        ...

    def predict(self, pre: Preprocessed | DeviceBatch, clock: StageClock) -> Predictions:
        """Predictions for the batch's decoded images (in `pre.ok` order); busy time on `clock`."""
        ...

    def close(self) -> None:
        """Free what the stages hold (the backends belong to their owner)."""
        ...
