"""NumPy reference of every kernel between the segmenter and the classifier.

This file is the specification: the CUDA kernels in this folder must give the same results
(within the tolerance their tests state), and the CPU path runs exactly these functions.

Coordinates are normalised to [0, 1] over the image, pixel-edge convention: pixel column c
covers [c / w, (c + 1) / w). A box is (x0, y0, x1, y1) with x0 < x1, y0 < y1.
"""

from __future__ import annotations

import numpy as np

FULL_BOX = (0.0, 0.0, 1.0, 1.0)


def lung_bbox(
    masks: np.ndarray, threshold: float, margin: float, min_region: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of the pixels at or above threshold, grown by a margin.

    masks: (N, h, w) scores (probabilities or logits; threshold is in the same units).
    margin: fraction of the box's width (height) added on the left and right (top and bottom).
    min_region: a connected region (8-neighbours) of the pixels at or above threshold with fewer
    than min_region x (that image's count of such pixels) pixels does not count for the box:
    a speck that a rounding of the logits makes or removes cannot move a box edge. 0: every
    pixel counts. The fraction counts every pixel either way.
    Returns boxes (N, 4) float32, normalised and clipped to [0, 1], and the foreground
    fraction (N,) float32. An empty mask gives the full image box and fraction 0, so the
    classifier still sees the whole image rather than nothing.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, h, w), got shape {masks.shape}")
    if not 0.0 <= min_region < 1.0:
        raise ValueError(f"min_region must be in [0, 1), got {min_region}")
    n, h, w = masks.shape
    fg = np.asarray(masks >= threshold)
    fraction = fg.reshape(n, -1).mean(axis=1, dtype=np.float64).astype(np.float32)
    if min_region > 0.0:
        fg = np.stack([_without_specks(f, min_region) for f in fg]) if n else fg
    rows = np.any(fg, axis=2)  # (N, h)
    cols = np.any(fg, axis=1)  # (N, w)
    boxes = np.tile(np.asarray(FULL_BOX, np.float32), (n, 1))
    has = np.any(rows, axis=1)
    if has.any():
        r, c = rows[has], cols[has]
        y0 = r.argmax(axis=1)
        y1 = h - r[:, ::-1].argmax(axis=1)
        x0 = c.argmax(axis=1)
        x1 = w - c[:, ::-1].argmax(axis=1)
        bw, bh = (x1 - x0) * margin, (y1 - y0) * margin
        grown = np.stack([(x0 - bw) / w, (y0 - bh) / h, (x1 + bw) / w, (y1 + bh) / h], axis=1)
        boxes[has] = np.clip(grown, 0.0, 1.0).astype(np.float32)
    return boxes, fraction


def _without_specks(fg: np.ndarray, min_region: float) -> np.ndarray:
    """fg (h, w) bool without the regions that min_region leaves out of the box, as far as the
    box can tell: only regions reaching the box's edge are looked at (a small region inside the
    box does not move it), each by a flood fill that stops once the region is big enough. The
    box of the result is that of fg with every small region removed."""
    total = int(fg.sum())
    need = int(np.ceil(min_region * total))  # a region with fewer pixels is a speck
    if total == 0 or need <= 1:
        return fg
    fg = fg.copy()
    big: set[tuple[int, int]] = set()  # pixels of regions known to be big enough
    h, w = fg.shape
    while fg.any():
        ys, xs = np.nonzero(fg)
        edge = {
            *zip(ys[ys == ys.min()], xs[ys == ys.min()], strict=True),
            *zip(ys[ys == ys.max()], xs[ys == ys.max()], strict=True),
            *zip(ys[xs == xs.min()], xs[xs == xs.min()], strict=True),
            *zip(ys[xs == xs.max()], xs[xs == xs.max()], strict=True),
        }
        removed = False
        for start in sorted(edge):
            if start in big or not fg[start]:
                continue
            region, small = _region(fg, start, need, h, w)
            if small:
                for y, x in region:
                    fg[y, x] = False
                removed = True
            else:
                big.update(region)
        if not removed:
            return fg
    return fg


def _region(
    fg: np.ndarray, start: tuple[int, int], need: int, h: int, w: int
) -> tuple[list[tuple[int, int]], bool]:
    """The 8-connected region of fg around start, explored until it has `need` pixels:
    (its pixels, True) if it is smaller than that, else (the pixels seen, False)."""
    seen = {start}
    todo = [start]
    while todo:
        y, x = todo.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                q = (y + dy, x + dx)
                if 0 <= q[0] < h and 0 <= q[1] < w and q not in seen and fg[q]:
                    seen.add(q)
                    if len(seen) >= need:
                        return list(seen), False
                    todo.append(q)
    return list(seen), True


def crop_resize_normalize(
    images: np.ndarray,
    boxes: np.ndarray,
    out_hw: tuple[int, int],
    mean: tuple[float, ...] | np.ndarray,
    std: tuple[float, ...] | np.ndarray,
) -> np.ndarray:
    """Cut each box out of its image, resize bilinearly, normalise, replicate channels.

    images: (N, H, W) float32 intensities in [0, 1]. boxes: (N, 4) normalised.
    Output pixel (i, j) samples the source at the centre of its cell (half-pixel
    convention, as ROIAlign with one sample and aligned=True), coordinates clamped to the
    image. Returns (N, C, oh, ow) float32 with C = len(mean), value (v - mean[c]) / std[c].
    """
    if images.ndim != 3 or boxes.shape != (images.shape[0], 4):
        raise ValueError(
            f"need images (N, H, W) and boxes (N, 4), got {images.shape}, {boxes.shape}"
        )
    n, h, w = images.shape
    oh, ow = out_hw
    mean_a = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    out = np.empty((n, oh, ow), np.float32)
    for i in range(n):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        ys = y0 * h + (np.arange(oh, dtype=np.float32) + 0.5) * ((y1 - y0) * h / oh) - 0.5
        xs = x0 * w + (np.arange(ow, dtype=np.float32) + 0.5) * ((x1 - x0) * w / ow) - 0.5
        out[i] = _bilinear(images[i], ys, xs)
    return (out[:, None, :, :] - mean_a) / std_a


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    h, w = img.shape
    ys = np.clip(ys, 0.0, h - 1)
    xs = np.clip(xs, 0.0, w - 1)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).astype(np.float32)[:, None]
    wx = (xs - x0).astype(np.float32)[None, :]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def box_to_pixels(boxes: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Normalised boxes -> integer (x0, y0, x1, y1) in source pixels (x1, y1 exclusive)."""
    scale = np.stack([width, height, width, height], axis=1).astype(np.float64)
    px = np.rint(boxes.astype(np.float64) * scale)
    return np.clip(px, 0, scale).astype(np.int32)
