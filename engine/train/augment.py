"""Augmentation in torch, on [0, 1] intensities (before the manifest's mean/std).

Geometry: small rotation, scale and shift, applied to an image and its mask with one grid so
they stay aligned. Photometry: gamma, contrast and brightness, on the image only; they stand in
for the exposure and processing differences between sites. No horizontal flip: chest anatomy is
not mirror-symmetric (heart on the left), and nothing has shown that flips help here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.stages.segment import upsample_nearest


@dataclass(frozen=True, kw_only=True)
class Geometry:
    degrees: float = 10.0  # rotation within +- degrees
    scale: float = 0.10  # zoom within 1 +- scale
    shift: float = 0.06  # translation within +- shift of the side


@dataclass(frozen=True, kw_only=True)
class Photometry:
    gamma: float = 0.3  # gamma = exp(U(-g, g))
    contrast: float = 0.2  # contrast factor within 1 +- contrast, around the image mean
    brightness: float = 0.08  # offset within +- brightness


def _uniform(n: int, half: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * 2 - 1) * half


def random_theta(n: int, geometry: Geometry, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices for F.affine_grid (output -> input coordinates)."""
    angle = _uniform(n, math.radians(geometry.degrees), gen)
    zoom = 1 + _uniform(n, geometry.scale, gen)
    tx, ty = _uniform(n, 2 * geometry.shift, gen), _uniform(n, 2 * geometry.shift, gen)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    row0 = torch.stack([cos, -sin, tx], dim=1)
    row1 = torch.stack([sin, cos, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def photometric(x: torch.Tensor, photometry: Photometry, gen: torch.Generator) -> torch.Tensor:
    """Per-sample gamma, contrast and brightness on (N, C, H, W) in [0, 1]; result in [0, 1]."""
    n = x.shape[0]
    gamma = torch.exp(_uniform(n, photometry.gamma, gen)).view(n, 1, 1, 1)
    contrast = (1 + _uniform(n, photometry.contrast, gen)).view(n, 1, 1, 1)
    brightness = _uniform(n, photometry.brightness, gen).view(n, 1, 1, 1)
    x = x.clamp(0.0, 1.0) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


def augment_pair(
    image01: torch.Tensor,
    mask: torch.Tensor,
    gen: torch.Generator,
    geometry: Geometry = Geometry(),
    photometry: Photometry = Photometry(),
    *,
    binarize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmenter batch: one geometry for image and mask, photometry on the image. The warped
    mask is thresholded at 0.5 unless binarize is False (soft targets stay soft)."""
    theta = random_theta(image01.shape[0], geometry, gen)
    image = warp(image01, theta)
    mask = warp(mask, theta)
    if binarize:
        mask = (mask >= 0.5).to(mask.dtype)
    return photometric(image, photometry, gen), mask


@dataclass(frozen=True, kw_only=True)
class CropAugment:
    """Classifier augmentation: box jitter (scale/shift), rotation, photometry, optional flip."""

    box_scale: float = 0.08  # box side within 1 +- box_scale
    box_shift: float = 0.05  # box centre within +- box_shift of the box side
    degrees: float = 7.0
    photometry: Photometry = Photometry()
    hflip: bool = False

    @classmethod
    def off(cls) -> CropAugment:
        """Identity settings: the training crop is then the served crop (the skew test)."""
        return cls(
            box_scale=0.0,
            box_shift=0.0,
            degrees=0.0,
            photometry=Photometry(gamma=0.0, contrast=0.0, brightness=0.0),
        )


def augment_crops(crops01: torch.Tensor, aug: CropAugment, gen: torch.Generator) -> torch.Tensor:
    """Classifier batch in [0, 1] (box jitter already done): rotation, photometry, flip."""
    n = crops01.shape[0]
    x = crops01
    if aug.degrees > 0:
        theta = random_theta(n, Geometry(degrees=aug.degrees, scale=0.0, shift=0.0), gen)
        x = warp(x, theta, padding="reflection")
    x = photometric(x, aug.photometry, gen)
    if aug.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
    return x


@dataclass(frozen=True, kw_only=True)
class Acquisition:
    """How the image was acquired and processed, randomised so that it stops being a cue.

    The training sets' classes come from different sites (scanners, film digitisers, JPEG
    pipelines, burned-in markers, resolutions), so the look of an image predicts its label there
    and nowhere else. Each transform is applied to a crop with its probability p: tone curves
    (a random monotone curve, histogram equalisation, histogram matching to a crop of another
    source in the batch), resolution (downscale then upscale back, Gaussian blur), JPEG
    re-encoding, film grain (Gaussian noise), and burned-in marks (bright or dark rectangles
    near the border, a dark strip along one edge).
    """

    curve_p: float = 0.3
    curve_amount: float = 0.12  # knots moved within +- amount
    equalize_p: float = 0.1
    match_p: float = 0.2
    downscale_p: float = 0.5
    downscale_min: float = 0.25  # smallest side, as a share of the crop's side
    blur_p: float = 0.25
    blur_sigma: float = 1.5  # pixels of the crop, at most
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 95)
    noise_p: float = 0.3
    noise_sigma: float = 0.04
    marker_p: float = 0.3
    border_p: float = 0.15

    @classmethod
    def off(cls) -> Acquisition:
        """Every transform's probability 0 (the fields named *_p)."""
        zero: dict[str, Any] = {f.name: 0.0 for f in fields(cls) if f.name.endswith("_p")}
        return replace(cls(), **zero)


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return float(lo + (hi - lo) * torch.rand(1, generator=gen))


def _ranks01(x: torch.Tensor) -> torch.Tensor:
    """Each value's rank in its image, in [0, 1] (the equalised image)."""
    flat = x.reshape(-1)
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.linspace(0.0, 1.0, flat.numel())
    return ranks.reshape(x.shape)


def _tone(x: torch.Tensor, acq: Acquisition, gen: torch.Generator) -> torch.Tensor:
    knots = torch.linspace(0.0, 1.0, 5)
    ys = (knots + (torch.rand(5, generator=gen) * 2 - 1) * acq.curve_amount).clamp(0.0, 1.0)
    ys = torch.cummax(ys, 0).values
    pos = (x.clamp(0.0, 1.0) * 4).clamp(max=3.9999)
    lo = pos.floor().long()
    frac = pos - lo
    return ys[lo] * (1 - frac) + ys[lo + 1] * frac


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(x.shape[1], 1, 1, -1), groups=x.shape[1])
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(x.shape[1], 1, -1, 1), groups=x.shape[1])
    return x[0]


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    arr = (x[0].clamp(0.0, 1.0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        out = torch.from_numpy(np.asarray(im.convert("L"), np.float32) / 255.0)
    return out[None].expand_as(x).clone()


def _markers(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, h, w = x.shape
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        mh, mw = int(h * _u(gen, 0.03, 0.08)), int(w * _u(gen, 0.05, 0.15))
        top = int(_u(gen, 0, 0.15) * h) if _u(gen) < 0.5 else h - mh - int(_u(gen, 0, 0.15) * h)
        left = int(_u(gen) * (w - mw))
        x[:, max(top, 0) : max(top, 0) + mh, left : left + mw] = 1.0 if _u(gen) < 0.8 else 0.0
    return x


def _border(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, h, w = x.shape
    k = max(1, int(_u(gen, 0.02, 0.08) * min(h, w)))
    side = int(torch.randint(0, 4, (1,), generator=gen))
    if side == 0:
        x[:, :k] = 0.0
    elif side == 1:
        x[:, -k:] = 0.0
    elif side == 2:
        x[:, :, :k] = 0.0
    else:
        x[:, :, -k:] = 0.0
    return x


def acquisition(
    x: torch.Tensor, sources: np.ndarray, acq: Acquisition, gen: torch.Generator
) -> torch.Tensor:
    """(N, C, H, W) crops in [0, 1] -> the same crops with a random acquisition look; sources
    (N,) name each crop's source (histogram matching takes a crop of another source)."""
    out = x.clone()
    n, _, h, w = x.shape
    for i in range(n):
        img = out[i]
        if _u(gen) < acq.curve_p:
            img = _tone(img, acq, gen)
        if _u(gen) < acq.equalize_p:
            a = _u(gen, 0.5, 1.0)
            img = (1 - a) * img + a * _ranks01(img)
        others = np.flatnonzero(sources != sources[i])
        if len(others) and _u(gen) < acq.match_p:
            j = int(others[int(torch.randint(0, len(others), (1,), generator=gen))])
            ref = x[j].reshape(-1).sort().values
            idx = (_ranks01(img) * (ref.numel() - 1)).round().long()
            img = ref[idx.reshape(-1)].reshape(img.shape)
        if _u(gen) < acq.downscale_p:
            s = _u(gen, acq.downscale_min, 1.0)
            small = F.interpolate(
                img[None],
                size=(max(8, round(h * s)), max(8, round(w * s))),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            img = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        if _u(gen) < acq.blur_p:
            img = _gaussian_blur(img, _u(gen, 0.3, acq.blur_sigma))
        if _u(gen) < acq.jpeg_p:
            lo, hi = acq.jpeg_quality
            img = _jpeg(img, int(torch.randint(lo, hi + 1, (1,), generator=gen)))
        if _u(gen) < acq.noise_p:
            img = img + torch.randn(img.shape, generator=gen) * _u(gen, 0.0, acq.noise_sigma)
        if _u(gen) < acq.marker_p:
            img = _markers(img.clone(), gen)
        if _u(gen) < acq.border_p:
            img = _border(img.clone(), gen)
        out[i] = img.clamp(0.0, 1.0)
    return out


@dataclass(frozen=True, kw_only=True)
class ContextSwap:
    """Everything outside the lungs taken from another image of the batch, with probability p.

    The shortcut this attacks: the classes of the training sets come from different sites, so
    what lies outside the lungs (markers, borders, collimation, the film's look, patient
    positioning) predicts the label there and nowhere else; the lungs-masked-out check
    (engine.eval.shortcut) measures how much of it a model uses. With the context of a random
    other image of the batch (either class, so the context no longer carries the label), the
    network can only gain from the lungs. The lung mask is dilated by `dilate` (a share of the
    mask's side) so the lung edges stay with their lungs. Served inputs are unchanged: at
    screening time the context is the image's own, which the network has learnt to ignore.
    """

    p: float = 0.0
    dilate: float = 0.015

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"context swap probability must be in [0, 1], not {self.p}")


def dilate_masks(masks: np.ndarray, share: float) -> np.ndarray:
    """(N, m, m) 0/1 masks grown by round(share * m) pixels (a square max filter)."""
    r = round(share * masks.shape[-1])
    if r <= 0:
        return masks.astype(bool)
    t = torch.from_numpy(np.ascontiguousarray(masks, np.float32))[:, None]
    return (F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[:, 0] > 0).numpy()


def swap_context(
    work: np.ndarray, masks: np.ndarray, swap: ContextSwap, gen: torch.Generator
) -> np.ndarray:
    """(N, S, S) working images, (N, m, m) lung masks -> each image, with probability swap.p,
    keeping its (dilated) lungs and taking everything else from another image of the batch.
    Draws nothing from `gen` when p is 0, so runs without the swap keep their random stream."""
    n = work.shape[0]
    if swap.p <= 0.0 or n < 2:
        return work
    chosen = (torch.rand(n, generator=gen) < swap.p).numpy()
    partner = torch.randint(0, n - 1, (n,), generator=gen).numpy()
    partner = partner + (partner >= np.arange(n))  # any other image of the batch
    if not chosen.any():
        return work
    rows = np.flatnonzero(chosen)
    lungs = upsample_nearest(dilate_masks(masks[rows], swap.dilate), work.shape[-1])
    out = work.copy()
    out[rows] = np.where(lungs, work[rows], work[partner[rows]])
    return out
