"""Augmentation in torch, on [0, 1] intensities (before the manifest's mean/std).

Geometry: small rotation, scale and shift, applied to an image and its mask with one grid so
they stay aligned. Photometry: gamma, contrast and brightness, on the image only; they stand in
for the exposure and processing differences between sites. No horizontal flip: chest anatomy is
not mirror-symmetric (heart on the left), and nothing has shown that flips help here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmenter batch: one geometry for image and mask, photometry on the image."""
    theta = random_theta(image01.shape[0], geometry, gen)
    image = warp(image01, theta)
    mask = (warp(mask, theta) >= 0.5).to(mask.dtype)
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
