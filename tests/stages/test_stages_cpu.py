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


def test_a_classifier_with_test_time_crops_is_served_their_mean(tiny_models):
    from dataclasses import replace

    from engine.runtime.onnxrt import OnnxRuntimeBackend
    from engine.stages.crop import scale_shift_boxes
    from kernels.reference import crop_resize_normalize

    transforms = ((1.06, 0.95, 0.03, -0.02), (0.93, 1.04, -0.04, 0.01), (1.0, 1.0, 0.0, 0.0))
    models = replace(tiny_models, classifier=replace(tiny_models.classifier, tta=transforms))
    rng = np.random.default_rng(4)
    pre = Preprocessed(
        ok=[0, 1],
        work=rng.random((2, 128, 128), dtype=np.float32),
        seg_input=rng.normal(0, 1, (2, 1, 64, 64)).astype(np.float32),
        errors={},
    )
    with (
        OnnxRuntimeBackend(models.segmenter) as seg,
        OnnxRuntimeBackend(models.classifier) as clf,
    ):
        got = CpuStages(models, seg, clf).predict(pre, StageClock())
        one = CpuStages(tiny_models, seg, clf).predict(pre, StageClock())
        # by hand: each transform's crops through the classifier, logits and embeddings averaged
        p = models.classifier.preprocess
        outs = [
            clf.infer({models.classifier.input.name: crop_resize_normalize(
                pre.work, scale_shift_boxes(got.boxes, *t), p.size, p.mean, p.std)})
            for t in transforms
        ]  # fmt: skip
    logit = np.mean([o["logit"].reshape(-1).astype(np.float64) for o in outs], axis=0)
    np.testing.assert_allclose(got.prob, 1 / (1 + np.exp(-logit)), rtol=1e-5)
    np.testing.assert_allclose(got.embedding, np.mean([o["embedding"] for o in outs], axis=0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(got.boxes, one.boxes)  # the row's box is the lung box itself
    assert got.prob.shape == (2,) and got.embedding.shape == one.embedding.shape
    assert not np.allclose(got.prob, one.prob)  # the other crops do count
