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


# ---------------------------------------------------------------------------------------------
# test-time crops (a classifier manifest's tta)


def test_scale_shift_boxes_moves_and_scales_about_the_centre_and_keeps_the_image():
    from engine.stages.crop import MIN_BOX_SIDE, scale_shift_boxes

    boxes = np.array([[0.2, 0.3, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]], np.float32)
    np.testing.assert_allclose(scale_shift_boxes(boxes, 1.0, 1.0, 0.0, 0.0), boxes, atol=1e-7)
    # side 0.4 scaled by 1.5 and 0.5 about the centre (0.4, 0.5), then moved by 0.1 of the side
    got = scale_shift_boxes(boxes[:1], 1.5, 0.5, 0.1, -0.1)
    np.testing.assert_allclose(got, [[0.14, 0.36, 0.74, 0.56]], atol=1e-6)
    # clipped to the image; a box squeezed against an edge keeps MIN_BOX_SIDE
    full = scale_shift_boxes(boxes[1:], 1.2, 1.2, 0.0, 0.0)
    np.testing.assert_array_equal(full, [[0.0, 0.0, 1.0, 1.0]])
    edge = scale_shift_boxes(np.array([[0.98, 0.5, 1.0, 0.6]], np.float32), 1.0, 1.0, 0.5, 0.0)
    assert edge[0, 2] == 1.0 and edge[0, 2] - edge[0, 0] == pytest.approx(MIN_BOX_SIDE, abs=1e-6)
    far = scale_shift_boxes(np.array([[0.9, 0.5, 0.95, 0.6]], np.float32), 1.0, 1.0, 3.0, 0.0)
    assert far[0, 0] == 1.0 and far[0, 2] == 1.0  # both clipped: the side rule then the image
    assert MIN_BOX_SIDE == 0.01
    # per-box arrays broadcast like scalars
    per_box = scale_shift_boxes(boxes, np.array([1.5, 1.0]), 0.5, np.array([0.1, 0.0]), -0.1)
    np.testing.assert_allclose(per_box[:1], got, atol=1e-7)


def test_test_time_crops_are_transform_major_and_one_crop_without_tta(tiny_models):
    from engine.stages.crop import classifier_crops, scale_shift_boxes, tta_boxes
    from kernels.reference import crop_resize_normalize

    seg, clf = tiny_models.segmenter, tiny_models.classifier
    side, pre = clf.crop.source_size, clf.preprocess
    work = np.random.default_rng(1).random((3, side, side), dtype=np.float32)
    boxes = np.array([[0.1, 0.2, 0.7, 0.9], [0.2, 0.1, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]], np.float32)
    one = classifier_crops(work, boxes, clf)
    np.testing.assert_array_equal(one, crop_resize_normalize(work, boxes, pre.size, pre.mean,
                                                             pre.std))  # fmt: skip
    np.testing.assert_array_equal(tta_boxes(boxes, clf), boxes)
    transforms = ((1.05, 0.95, 0.02, -0.03), (0.94, 1.07, -0.04, 0.01))
    tta = replace(clf, tta=transforms)
    tiled = tta_boxes(boxes, tta)
    assert tiled.shape == (6, 4)
    for k, t in enumerate(transforms):  # rows k * N .. (k + 1) * N - 1: transform k
        np.testing.assert_array_equal(tiled[3 * k : 3 * (k + 1)], scale_shift_boxes(boxes, *t))
    crops = classifier_crops(work, boxes, tta)
    assert crops.shape == (6, 1, *pre.size)
    np.testing.assert_array_equal(
        crops[3:], crop_resize_normalize(work, tiled[3:], pre.size, pre.mean, pre.std)
    )
    # lung_crops: one box an image, K crops an image
    logits = np.full((3, 64, 64), -5.0, np.float32)
    logits[:, 10:50, 12:52] = 5.0
    lc = lung_crops(work, logits, seg, tta)
    assert lc.boxes.shape == (3, 4) and lc.classifier_input.shape == (6, 1, *pre.size)
    np.testing.assert_array_equal(lc.classifier_input, classifier_crops(work, lc.boxes, tta))
