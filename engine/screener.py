"""The Screener: models, backends, preprocessor and stages that turn samples into predictions.

Shared by `cxr screen` (local and on Ray), `cxr similar` and the evaluation tools, so an image
goes through exactly the same code wherever it is screened. The Screener picks its objects
once: the backend class (engine/runtime), the Stages (engine/stages/cpu.py, or
engine/stages/gpu.py when both backends keep tensors on the device) and the preprocessor (DALI
on the stages' device, or its Pillow twin); after that it only delegates.
"""

from __future__ import annotations

import time

from engine.config import resolve_decoder
from engine.models import ModelSet
from engine.pipeline import (
    Decoded,
    DeviceBatch,
    ImagePreprocessor,
    Preprocessed,
    Preprocessor,
    Sample,
    assemble,
    decode_one,
)
from engine.runtime import get_backend, resolve_backend
from engine.runtime.base import Backend, DeviceBackend
from engine.stages.base import Predictions, StageClock, Stages
from engine.stages.cpu import CpuStages


class Screener:
    """Turns samples into predictions (see the module docstring)."""

    def __init__(
        self,
        models: ModelSet,
        *,
        backend: str,
        batch_size: int,
        threads: int,
        device: str = "cpu",
        decoder: str = "auto",
    ) -> None:
        self.models = models
        self.backend_name = resolve_backend(backend, models=models)
        cls = get_backend(self.backend_name)
        self._seg = cls(models.segmenter, threads=threads)
        self._clf = cls(models.classifier, threads=threads)
        self._seg.load()
        self._clf.load()
        self.stages = pick_stages(models, self._seg, self._clf)
        self.device = device if self.stages.device == "cpu" else self.stages.device
        self.decoder = resolve_decoder(decoder, self.device)
        self.pipeline = make_preprocessor(
            models, self.decoder, device=self.device, batch_size=batch_size, threads=threads
        )
        self.clock = StageClock()

    def preprocess(self, samples: list[Sample]) -> Preprocessed:
        """The batch preprocessed to host arrays."""
        t = time.perf_counter()
        pre = self.pipeline.run(samples)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return pre

    @property
    def per_image(self) -> bool:
        """Whether images may be preprocessed one at a time in the caller's threads
        (`preprocess_one`) and their batch `assemble`d: the Pillow preprocessor with the CPU
        stages (whose `ingest` is the preprocessor's `run`)."""
        return self.pipeline.per_image and self.stages.device == "cpu"

    def preprocess_one(self, sample: Sample) -> Decoded:
        """One image preprocessed (when `per_image`), or why it failed; thread-safe."""
        t = time.perf_counter()
        done = decode_one(self.pipeline, sample)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return done

    def assemble(self, done: list[Decoded]) -> Preprocessed:
        """The batch of `preprocess_one`'s results, as `preprocess_batch` returns it."""
        t = time.perf_counter()
        pre = assemble(done)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return pre

    def preprocess_batch(self, samples: list[Sample]) -> Preprocessed | DeviceBatch:
        """The batch preprocessed into the stages' memory: with the GPU stages it stays on the
        device, copied there in the calling (pipeline) thread, so DALI may reuse its buffers
        for the next batch at once."""
        t = time.perf_counter()
        pre = self.stages.ingest(self.pipeline, samples)
        self.clock.add("decode+preprocess", time.perf_counter() - t)
        return pre

    def infer(self, pre: Preprocessed | DeviceBatch) -> Predictions:
        return self.stages.predict(pre, self.clock)

    def close(self) -> None:
        self.stages.close()
        self.pipeline.close()
        self._seg.close()
        self._clf.close()


def pick_stages(models: ModelSet, segmenter: Backend, classifier: Backend) -> Stages:
    """The GPU stages where both backends keep their tensors on the device, else the CPU ones."""
    if isinstance(segmenter, DeviceBackend) and isinstance(classifier, DeviceBackend):
        # Masks, boxes and the classifier input stay on the device between the two plans
        # (kernels/*.cu); DALI decodes on the GPU too.
        from engine.stages.gpu import GpuStages

        return GpuStages(models, segmenter, classifier)
    return CpuStages(models, segmenter, classifier)


def make_preprocessor(
    models: ModelSet, decoder: str, *, device: str, batch_size: int, threads: int
) -> ImagePreprocessor:
    """The preprocessor `decoder` names ("dali", "pillow", "pillow-draft") on `device`."""
    if decoder == "dali":
        return Preprocessor(models, device=device, batch_size=batch_size, threads=threads)
    from engine.pipeline_pil import PilPreprocessor

    return PilPreprocessor(
        models,
        batch_size=batch_size,
        threads=threads,
        draft=2 if decoder == "pillow-draft" else 0,
    )


def embedding_dim(models: ModelSet) -> int:
    """The length of the classifier's embedding (the index's and the sidecars' dimension)."""
    return int(models.classifier.output("embedding").shape[-1])
