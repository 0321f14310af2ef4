"""segment -> lung box -> crop -> classify on host arrays, with any backend.

The masks come to the host after the segmenter, the lung box and the crop are
kernels/reference.py (through engine/stages/crop.py), and the classifier input goes back to the
backend: the specification the GPU stages (engine/stages/gpu.py) are tested against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.models import ModelSet
from engine.pipeline import DeviceBatch, ImagePreprocessor, Preprocessed, Sample
from engine.runtime.base import Backend
from engine.stages.base import Predictions, StageClock
from engine.stages.classify import classify
from engine.stages.crop import lung_crops
from engine.stages.segment import logit_threshold, segment


class CpuStages:
    """The Stages of every backend that takes host arrays (engine/stages/base.py)."""

    device = "cpu"

    def __init__(self, models: ModelSet, segmenter: Backend, classifier: Backend) -> None:
        self.models = models
        self.seg, self.clf = segmenter, classifier

    def ingest(self, preprocessor: ImagePreprocessor, samples: Sequence[Sample]) -> Preprocessed:
        return preprocessor.run(samples)

    def predict(self, pre: Preprocessed | DeviceBatch, clock: StageClock) -> Predictions:
        if isinstance(pre, DeviceBatch):
            raise ValueError("a batch on the device needs the TensorRT backend")
        m = self.models
        t0 = time.perf_counter()
        masks = segment(self.seg, m.segmenter, pre.seg_input)
        t1 = time.perf_counter()
        crops = lung_crops(pre.work, masks, m.segmenter, m.classifier)
        t2 = time.perf_counter()
        prob, emb = classify(self.clf, m.classifier, crops.classifier_input)
        t3 = time.perf_counter()
        clock.add("segment", t1 - t0)
        clock.add("crop", t2 - t1)
        clock.add("classify", t3 - t2)
        return Predictions(
            prob=prob,
            boxes=crops.boxes,
            fraction=crops.fraction,
            embedding=emb,
            lung_mask=masks >= logit_threshold(m.segmenter.threshold),
        )

    def close(self) -> None:
        pass  # nothing of its own: the backends belong to the Screener
