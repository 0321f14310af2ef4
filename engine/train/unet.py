"""The lung U-Net in torch, topology-identical to engine.arch.unet_segmenter once exported.

Each conv is followed by BatchNorm for training; the ONNX export (eval mode) folds every BN into
its conv, which leaves exactly arch's graph: (conv3x3 + relu) x 2 per level, 2x2 max pool,
2x2 stride-2 transposed conv, concat [up, skip], 1x1 head -> mask_logit.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models import UNET_SEGMENTERS

# architecture name -> (base channels, depth), as engine.arch builds them
UNET_SHAPES = {name: (s.base_channels, s.depth) for name, s in UNET_SEGMENTERS.items()}


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.enc = nn.ModuleList()
        channels = 1
        for level in range(depth):
            self.enc.append(double_conv(channels, widths[level]))
            channels = widths[level]
        self.pool = nn.MaxPool2d(2, 2)
        self.bottleneck = double_conv(channels, widths[depth])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            for level in range(depth)
        )
        self.dec = nn.ModuleList(
            double_conv(2 * widths[level], widths[level]) for level in range(depth)
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level in reversed(range(len(self.enc))):
            x = self.dec[level](torch.cat([self.up[level](x), skips[level]], dim=1))
        return self.head(x)


def build_unet(architecture: str) -> UNet:
    base, depth = UNET_SHAPES[architecture]
    return UNet(base, depth)
