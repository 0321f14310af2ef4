"""kernels.reference: the NumPy specification of the lung box and crop kernels.

Hand-made masks with known boxes, exact cases of bilinear sampling, and a slow per-pixel
implementation written from the docstrings (not from the vectorised code) on seeded random
inputs of odd sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels.reference import FULL_BOX, box_to_pixels, crop_resize_normalize, lung_bbox

SEED = 1234


def mask_with(h: int, w: int, rows: slice, cols: slice, value: float = 1.0) -> np.ndarray:
    m = np.zeros((1, h, w), np.float32)
    m[0, rows, cols] = value
    return m


def box_of(mask2d: np.ndarray, threshold: float, margin: float) -> tuple[np.ndarray, float]:
    """Slow, obvious version of lung_bbox for one (h, w) mask."""
    h, w = mask2d.shape
    ys, xs = np.nonzero(mask2d >= threshold)
    if len(ys) == 0:
        return np.array(FULL_BOX, np.float64), 0.0
    x0, x1 = xs.min(), xs.max() + 1  # pixel-edge convention: x1 is exclusive
    y0, y1 = ys.min(), ys.max() + 1
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    box = [(x0 - mx) / w, (y0 - my) / h, (x1 + mx) / w, (y1 + my) / h]
    return np.clip(np.array(box), 0.0, 1.0), len(ys) / (h * w)


# --------------------------------------------------------------------------- lung_bbox


def test_rectangle_in_odd_sized_mask():
    h, w = 37, 53
    boxes, frac = lung_bbox(mask_with(h, w, slice(3, 11), slice(20, 41)), 0.5, 0.0)
    assert boxes.shape == (1, 4) and boxes.dtype == np.float32
    assert frac.shape == (1,) and frac.dtype == np.float32
    np.testing.assert_allclose(boxes[0], [20 / w, 3 / h, 41 / w, 11 / h], rtol=1e-6)
    assert math.isclose(frac[0], 8 * 21 / (h * w), rel_tol=1e-6)


def test_single_pixel():
    h, w = 37, 53
    boxes, frac = lung_bbox(mask_with(h, w, slice(5, 6), slice(7, 8)), 0.5, 0.0)
    np.testing.assert_allclose(boxes[0], [7 / w, 5 / h, 8 / w, 6 / h], rtol=1e-6)
    assert math.isclose(frac[0], 1 / (h * w), rel_tol=1e-6)


def test_full_mask_is_the_full_box():
    boxes, frac = lung_bbox(np.ones((1, 37, 53), np.float32), 0.5, 0.2)
    np.testing.assert_array_equal(boxes[0], FULL_BOX)
    assert frac[0] == 1.0


def test_empty_mask_gives_full_box_and_zero_fraction():
    boxes, frac = lung_bbox(np.zeros((2, 37, 53), np.float32), 0.5, 0.1)
    np.testing.assert_array_equal(boxes, np.tile(np.float32(FULL_BOX), (2, 1)))
    np.testing.assert_array_equal(frac, [0.0, 0.0])


def test_threshold_is_inclusive():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 2, 3] = 0.5  # exactly at the threshold: foreground
    m[0, 6, 6] = np.nextafter(np.float32(0.5), np.float32(0))  # just below: background
    boxes, frac = lung_bbox(m, 0.5, 0.0)
    np.testing.assert_allclose(boxes[0], [3 / 8, 2 / 8, 4 / 8, 3 / 8])
    assert frac[0] == 1 / 64


def test_threshold_in_logit_units_and_infinities():
    m = np.full((1, 5, 7), -3.0, np.float32)
    m[0, 1:3, 2:5] = 0.0
    boxes, _ = lung_bbox(m, 0.0, 0.0)  # logit 0 == probability 0.5
    np.testing.assert_allclose(boxes[0], [2 / 7, 1 / 5, 5 / 7, 3 / 5], rtol=1e-6)
    boxes, frac = lung_bbox(m, -math.inf, 0.0)  # probability threshold 0: everything
    np.testing.assert_array_equal(boxes[0], FULL_BOX)
    assert frac[0] == 1.0
    boxes, frac = lung_bbox(m, math.inf, 0.0)  # probability threshold 1: nothing
    np.testing.assert_array_equal(boxes[0], FULL_BOX)
    assert frac[0] == 0.0


def test_margin_grows_the_box_by_a_fraction_of_its_size():
    h, w = 40, 50
    # box x 10..30 (width 20), y 10..20 (height 10); margin 0.25 -> +5 px in x, +2.5 px in y
    boxes, _ = lung_bbox(mask_with(h, w, slice(10, 20), slice(10, 30)), 0.5, 0.25)
    np.testing.assert_allclose(boxes[0], [5 / w, 7.5 / h, 35 / w, 22.5 / h], rtol=1e-6)


def test_margin_is_clipped_at_the_borders():
    h, w = 37, 53
    # touches the top and right borders
    boxes, _ = lung_bbox(mask_with(h, w, slice(0, 5), slice(48, 53)), 0.5, 0.5)
    np.testing.assert_allclose(boxes[0], [45.5 / w, 0.0, 1.0, 7.5 / h], rtol=1e-6)
    # touches the left and bottom borders; a huge margin clips on every side
    boxes, _ = lung_bbox(mask_with(h, w, slice(30, 37), slice(0, 4)), 0.5, 0.0)
    np.testing.assert_allclose(boxes[0], [0.0, 30 / h, 4 / w, 1.0], rtol=1e-6)
    boxes, _ = lung_bbox(mask_with(h, w, slice(10, 20), slice(10, 20)), 0.5, 5.0)
    np.testing.assert_array_equal(boxes[0], FULL_BOX)
    assert (boxes >= 0).all() and (boxes <= 1).all()


def test_batch_equals_one_by_one_and_mixes_empty_and_full():
    h, w = 37, 53
    masks = np.concatenate(
        [
            mask_with(h, w, slice(3, 11), slice(20, 41)),
            np.zeros((1, h, w), np.float32),
            np.ones((1, h, w), np.float32),
            mask_with(h, w, slice(36, 37), slice(0, 1)),
        ]
    )
    boxes, frac = lung_bbox(masks, 0.5, 0.1)
    assert boxes.shape == (4, 4) and frac.shape == (4,)
    for i in range(4):
        b1, f1 = lung_bbox(masks[i : i + 1], 0.5, 0.1)
        np.testing.assert_array_equal(boxes[i], b1[0])
        assert frac[i] == f1[0]


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (7, 1), (37, 53), (64, 64), (101, 33)])
def test_random_masks_match_slow_reference(h, w):
    rng = np.random.default_rng(SEED + h * 1000 + w)
    masks = rng.random((6, h, w)).astype(np.float32)
    masks[0] = 0.0  # empty
    masks *= rng.random((6, 1, 1)) < 0.9  # sometimes empty
    masks[1] = np.where(masks[1] > 0.97, masks[1], 0.0)  # sparse blobs
    margin = 0.07
    boxes, frac = lung_bbox(masks, 0.9, margin)
    for i in range(len(masks)):
        want_box, want_frac = box_of(masks[i], 0.9, margin)
        np.testing.assert_allclose(boxes[i], want_box, atol=1e-6, err_msg=f"mask {i}")
        assert math.isclose(frac[i], want_frac, rel_tol=1e-6, abs_tol=1e-9)


def without_small_regions(fg: np.ndarray, min_region: float) -> np.ndarray:
    """The rule said plainly, with SciPy's labelling: drop every 8-connected region smaller
    than ceil(min_region x foreground pixels)."""
    from scipy import ndimage

    need = math.ceil(min_region * fg.sum())
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= need
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("min_region", [0.001, 0.01, 0.05, 0.3])
def test_min_region_boxes_equal_the_boxes_without_small_regions(min_region):
    pytest.importorskip("scipy", reason="the check labels regions with SciPy (dev extra)")
    rng = np.random.default_rng(int(min_region * 1000))
    masks = np.zeros((40, 64, 48), np.float32)
    for m in masks:
        for _ in range(2):  # two "lungs" of random size and place
            y, x = rng.integers(4, 40), rng.integers(2, 30)
            m[y : y + rng.integers(8, 24), x : x + rng.integers(6, 16)] = 1.0
        specks = rng.integers(0, 6)
        m[rng.integers(0, 64, specks), rng.integers(0, 48, specks)] = 1.0  # single pixels
        if rng.random() < 0.5:  # a 2 x 3 blob somewhere
            y, x = rng.integers(0, 62), rng.integers(0, 45)
            m[y : y + 2, x : x + 3] = 1.0
    masks[0] = 0.0  # empty: the full box
    boxes, fraction = lung_bbox(masks, 0.5, 0.1, min_region)
    plain, plain_fraction = lung_bbox(masks, 0.5, 0.1)
    cleaned = np.stack([without_small_regions(m >= 0.5, min_region) for m in masks])
    want, _ = lung_bbox(cleaned.astype(np.float32), 0.5, 0.1)
    np.testing.assert_array_equal(boxes, want)
    np.testing.assert_array_equal(fraction, plain_fraction)  # every pixel still counts
    assert tuple(boxes[0]) == FULL_BOX
    moved = (boxes != plain).any(axis=1).sum()
    if min_region >= 0.01:  # below that no region here is small enough (need <= 1 pixel)
        assert moved >= 5
    else:
        assert moved == 0


def test_min_region_zero_is_every_pixel_and_bad_values_are_refused():
    m = np.zeros((1, 10, 10), np.float32)
    m[0, 4:8, 4:8] = 1.0
    m[0, 0, 0] = 1.0
    np.testing.assert_allclose(lung_bbox(m, 0.5, 0.0, 0.0)[0], [[0.0, 0.0, 0.8, 0.8]])
    # the speck (1 pixel) is smaller than ceil(0.1 x 17 pixels) = 2
    np.testing.assert_allclose(lung_bbox(m, 0.5, 0.0, 0.1)[0], [[0.4, 0.4, 0.8, 0.8]])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_region must be in"):
            lung_bbox(m, 0.5, 0.0, bad)


def test_lung_bbox_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        lung_bbox(np.zeros((8, 8), np.float32), 0.5, 0.0)


# --------------------------------------------------------------------------- crop_resize_normalize


def crop_slow(
    img: np.ndarray, box, out_hw: tuple[int, int], mean: float = 0.0, std: float = 1.0
) -> np.ndarray:
    """Per-pixel, float64: sample the box at each output cell's centre, clamp, bilinear."""
    h, w = img.shape
    oh, ow = out_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    out = np.empty((oh, ow))
    for i in range(oh):
        for j in range(ow):
            # centre of output cell (i, j) in source pixel units, pixel centres at k + 0.5
            sy = (y0 + (i + 0.5) / oh * (y1 - y0)) * h - 0.5
            sx = (x0 + (j + 0.5) / ow * (x1 - x0)) * w - 0.5
            sy = min(max(sy, 0.0), h - 1.0)
            sx = min(max(sx, 0.0), w - 1.0)
            r0, c0 = int(math.floor(sy)), int(math.floor(sx))
            r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
            fy, fx = sy - r0, sx - c0
            v = (
                img[r0, c0] * (1 - fy) * (1 - fx)
                + img[r0, c1] * (1 - fy) * fx
                + img[r1, c0] * fy * (1 - fx)
                + img[r1, c1] * fy * fx
            )
            out[i, j] = (v - mean) / std
    return out


def full_boxes(n: int) -> np.ndarray:
    return np.tile(np.float32(FULL_BOX), (n, 1))


def test_identity_crop_reproduces_the_image_exactly():
    rng = np.random.default_rng(SEED)
    images = rng.random((3, 37, 53)).astype(np.float32)
    out = crop_resize_normalize(images, full_boxes(3), (37, 53), (0.0,), (1.0,))
    assert out.shape == (3, 1, 37, 53) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], images)


def test_sub_box_at_scale_one_equals_slicing():
    rng = np.random.default_rng(SEED)
    img = rng.random((1, 32, 64)).astype(np.float32)
    # power-of-two sizes: the normalised box is exact in float32, so sampling hits pixel centres
    box = np.float32([[8 / 64, 4 / 32, 40 / 64, 20 / 32]])
    out = crop_resize_normalize(img, box, (16, 32), (0.0,), (1.0,))
    np.testing.assert_array_equal(out[0, 0], img[0, 4:20, 8:40])
    # odd sizes: the box is rounded to float32, so equal up to that rounding
    img = rng.random((1, 37, 53)).astype(np.float32)
    box = np.float32([[13 / 53, 5 / 37, 42 / 53, 30 / 37]])
    out = crop_resize_normalize(img, box, (25, 29), (0.0,), (1.0,))
    np.testing.assert_allclose(out[0, 0], img[0, 5:30, 13:42], atol=1e-5)


def test_linear_ramp_is_sampled_exactly():
    h, w = 21, 30
    a, b, c = 0.03, -0.02, 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (a * xx + b * yy + c).astype(np.float32)[None]
    box = np.float32([[0.1, 0.2, 0.7, 0.9]])
    oh, ow = 9, 11
    out = crop_resize_normalize(ramp, box, (oh, ow), (0.0,), (1.0,))[0, 0]
    # bilinear interpolation of a linear function is the function itself (inside the clamp)
    i, j = np.mgrid[0:oh, 0:ow]
    sy = np.clip((0.2 + (i + 0.5) / oh * 0.7) * h - 0.5, 0, h - 1)
    sx = np.clip((0.1 + (j + 0.5) / ow * 0.6) * w - 0.5, 0, w - 1)
    np.testing.assert_allclose(out, a * sx + b * sy + c, atol=2e-6)
    # upsampling the full image past its edge clamps to the edge value
    out = crop_resize_normalize(ramp, full_boxes(1), (2 * h, 2 * w), (0.0,), (1.0,))[0, 0]
    i, j = np.mgrid[0 : 2 * h, 0 : 2 * w]
    sy = np.clip((i + 0.5) / 2 - 0.5, 0, h - 1)  # -0.25 at the first row: clamped to 0
    sx = np.clip((j + 0.5) / 2 - 0.5, 0, w - 1)
    np.testing.assert_allclose(out, a * sx + b * sy + c, atol=2e-6)
    np.testing.assert_allclose(out[0, 0], ramp[0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out[-1, -1], ramp[0, -1, -1], atol=1e-6)


def test_mean_std_and_channel_replication():
    rng = np.random.default_rng(SEED)
    images = rng.random((2, 19, 23)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = crop_resize_normalize(images, full_boxes(2), (11, 13), (0.0,), (1.0,))
    out = crop_resize_normalize(images, full_boxes(2), (11, 13), mean, std)
    assert out.shape == (2, 3, 11, 13) and out.dtype == np.float32
    for ch in range(3):
        np.testing.assert_allclose(
            out[:, ch], (raw[:, 0] - mean[ch]) / std[ch], rtol=1e-6, atol=1e-6
        )
    gray = crop_resize_normalize(images, full_boxes(2), (11, 13), np.array([0.5]), np.array([0.25]))
    np.testing.assert_allclose(gray[:, 0], (raw[:, 0] - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "hw,out_hw", [((37, 53), (17, 29)), ((13, 7), (31, 19)), ((1, 1), (3, 5)), ((64, 48), (64, 48))]
)
def test_random_crops_match_slow_reference(hw, out_hw):
    rng = np.random.default_rng(SEED + hw[0] * 100 + out_hw[1])
    n = 3
    images = rng.random((n, *hw)).astype(np.float32)
    boxes = np.empty((n, 4), np.float32)
    for k in range(n):
        x = np.sort(rng.random(2))
        y = np.sort(rng.random(2))
        boxes[k] = (x[0], y[0], max(x[1], x[0] + 0.05), max(y[1], y[0] + 0.05))
    boxes[-1] = FULL_BOX
    out = crop_resize_normalize(images, boxes, out_hw, (0.3,), (0.2,))
    for k in range(n):
        want = crop_slow(images[k].astype(np.float64), boxes[k], out_hw, 0.3, 0.2)
        # float32 sample coordinates are off by up to ~size * 6e-8 px (4e-6 px at 64), a
        # random image changes by up to 1 per px, and / std multiplies by 5: bound 1e-4
        np.testing.assert_allclose(out[k, 0], want, atol=1e-4, err_msg=f"crop {k}")


def test_batch_crops_equal_single_crops():
    rng = np.random.default_rng(SEED)
    images = rng.random((4, 37, 53)).astype(np.float32)
    boxes = np.float32([[0.1, 0.1, 0.9, 0.8], FULL_BOX, [0.0, 0.5, 0.5, 1.0], [0.3, 0.2, 0.4, 0.3]])
    out = crop_resize_normalize(images, boxes, (16, 16), (0.5,), (0.25,))
    for k in range(4):
        one = crop_resize_normalize(images[k : k + 1], boxes[k : k + 1], (16, 16), (0.5,), (0.25,))
        np.testing.assert_array_equal(out[k], one[0])


def test_crop_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="boxes"):
        crop_resize_normalize(np.zeros((2, 8, 8), np.float32), full_boxes(3), (4, 4), (0,), (1,))
    with pytest.raises(ValueError, match="boxes"):
        crop_resize_normalize(np.zeros((8, 8), np.float32), full_boxes(1), (4, 4), (0,), (1,))


# --------------------------------------------------------------------------- box_to_pixels


def test_box_to_pixels_rounds_half_to_even_and_clips():
    boxes = np.array(
        [
            [0.125, 0.25, 0.375, 1.0],  # x: 1.5 -> 2, 4.5 -> 4 (half to even); y: 1 -> 1, 4 -> 4
            [-0.2, -0.01, 1.3, 1.01],  # outside the image: clipped to [0, size]
            [0.0, 0.0, 1.0, 1.0],
            [0.26, 0.1, 0.74, 0.9],  # plain rounding on a 1001 x 999 image
        ],
        np.float32,
    )
    width = np.array([12, 12, 1001, 1001])
    height = np.array([4, 4, 999, 999])
    px = box_to_pixels(boxes, width, height)
    assert px.dtype == np.int32 and px.shape == (4, 4)
    np.testing.assert_array_equal(px[0], [2, 1, 4, 4])
    np.testing.assert_array_equal(px[1], [0, 0, 12, 4])
    np.testing.assert_array_equal(px[2], [0, 0, 1001, 999])
    np.testing.assert_array_equal(px[3], [260, 100, 741, 899])


def test_box_to_pixels_of_lung_bbox_recovers_the_mask_box():
    h, w = 37, 53
    boxes, _ = lung_bbox(mask_with(h, w, slice(3, 11), slice(20, 41)), 0.5, 0.0)
    px = box_to_pixels(boxes, np.array([w]), np.array([h]))
    np.testing.assert_array_equal(px[0], [20, 3, 41, 11])
    # the same box on a source image 4x larger scales with it
    px = box_to_pixels(boxes, np.array([4 * w]), np.array([4 * h]))
    np.testing.assert_array_equal(px[0], [80, 12, 164, 44])
