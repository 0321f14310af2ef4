"""engine.stages.crop: the lung box (margin included) from the mask logits, the share of lung
pixels, and the classifier's input cut from the work image (kernels/reference.py, whose own tests
are tests/test_kernels_reference.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.stages.crop import lung_crops


def test_the_box_frames_the_lung_with_the_margin(tiny_models):
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    side = clf.crop.source_size
    work = np.random.default_rng(0).random((2, side, side), dtype=np.float32)
    logits = np.full((2, 64, 64), -5.0, np.float32)
    logits[0, 16:48, 8:40] = 5.0  # a 32 x 32 "lung" at x 8..40, y 16..48 of 64
    crops = lung_crops(work, logits, seg, clf)
    pad = clf.crop.margin * 0.5  # the margin is a share of the box's side (here 32/64)
    np.testing.assert_allclose(
        crops.boxes[0], [8 / 64 - pad, 16 / 64 - pad, 40 / 64 + pad, 48 / 64 + pad], atol=1e-6
    )
    assert crops.fraction[0] == pytest.approx(32 * 32 / 64**2)
    assert crops.fraction[1] == 0.0  # no lung found: the fraction says so
    assert crops.boxes.shape == (2, 4) and crops.fraction.shape == (2,)
    assert crops.classifier_input.shape == (2, 1, *clf.preprocess.size)
    assert crops.classifier_input.dtype == np.float32


def test_a_classifier_without_a_crop_section_is_refused(tiny_models):
    clf = replace(tiny_models.classifier, crop=None)
    work = np.zeros((1, 128, 128), np.float32)
    with pytest.raises(ValueError, match="no crop section"):
        lung_crops(work, np.zeros((1, 64, 64), np.float32), tiny_models.segmenter, clf)


def test_the_crop_depends_on_the_box_alone_not_on_the_segmenter_size():
    """A cheaper segmenter (engine.models.UNET_SEGMENTERS: unet-128, ...) reads the same work image
    at a smaller size: the lung drawn at 128 and at 256 gives the same box, so the same crop."""
    from engine.models import classifier_manifest, segmenter_manifest

    clf = classifier_manifest("resnet50", trained=False)
    side = clf.crop.source_size
    work = np.random.default_rng(1).random((1, side, side), dtype=np.float32)
    crops = []
    for arch, n in [("unet", 256), ("unet-s8-128", 128)]:
        seg = segmenter_manifest(arch, trained=False)
        assert seg.preprocess.size == (n, n)
        logits = np.full((1, n, n), -5.0, np.float32)
        logits[0, n * 3 // 16 : n * 14 // 16, n // 8 : n * 7 // 8] = 5.0
        crops.append(lung_crops(work, logits, seg, clf))
    np.testing.assert_array_equal(crops[0].boxes, crops[1].boxes)
    np.testing.assert_array_equal(crops[0].classifier_input, crops[1].classifier_input)
