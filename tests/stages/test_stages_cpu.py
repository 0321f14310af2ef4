"""engine.stages.cpu: CpuStages runs segment -> lung box -> crop -> classify on host arrays with
any backend, and times each stage; a batch on the device is refused. (Its agreement with the GPU
stages: test_device_batch.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from engine.pipeline import DeviceBatch, Preprocessed
from engine.runtime.null import NullBackend
from engine.stages.base import StageClock
from engine.stages.cpu import CpuStages


@pytest.fixture
def stages(tiny_models):
    seg, clf = NullBackend(tiny_models.segmenter), NullBackend(tiny_models.classifier)
    seg.load()
    clf.load()
    return CpuStages(tiny_models, seg, clf)


def test_predictions_of_a_batch_and_the_time_of_each_stage(stages):
    n = 3
    pre = Preprocessed(
        ok=list(range(n)),
        work=np.random.default_rng(0).random((n, 128, 128), dtype=np.float32),
        seg_input=np.zeros((n, 1, 64, 64), np.float32),
        errors={},
    )
    clock = StageClock()
    got = stages.predict(pre, clock)
    assert stages.device == "cpu"
    assert set(clock.seconds) == {"segment", "crop", "classify"}
    assert got.prob.shape == (n,) and got.embedding.shape == (n, 64)
    np.testing.assert_allclose(got.prob, 1 / (1 + np.exp(-1.0)), rtol=1e-6)  # null logits: 1
    assert got.lung_mask.shape == (n, 64, 64) and got.lung_mask.all()  # null: all lung
    np.testing.assert_allclose(got.fraction, 1.0)
    assert got.work is None  # the work images stay the caller's on the host path


def test_a_device_batch_is_refused(stages):
    batch = object.__new__(DeviceBatch)  # the type is what is checked
    with pytest.raises(ValueError, match="needs the TensorRT backend"):
        stages.predict(batch, StageClock())
