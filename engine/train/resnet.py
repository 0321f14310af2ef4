"""The classifiers in torch, topology-identical to engine.arch's once exported (BN folded).

forward(image) -> (logit [N, 1], embedding [N, D]); the embedding is what `cxr similar` searches.
"""

from __future__ import annotations

import torch
from torch import nn

TINY_WIDTHS = (8, 16, 32, 32)  # engine.arch.TINY_CLASSIFIER_WIDTHS


class ResNet50Classifier(nn.Module):
    """torchvision resnet50(weights=None), 1-channel conv1, fc -> 1 logit; embedding = pooled."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        from torchvision.models import resnet50

        # zero_init_residual: each block starts as identity, which helps training from scratch.
        net = resnet50(weights=None, zero_init_residual=True)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.fc = nn.Linear(net.fc.in_features, 1)
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(image))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        embedding = torch.flatten(n.avgpool(x), 1)
        return n.fc(embedding), embedding


class TinyClassifier(nn.Module):
    """Four stride-2 conv (+BN) + relu, pool, linear projection to the embedding, fc."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in TINY_WIDTHS:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, embedding_dim)
        self.fc = nn.Linear(embedding_dim, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(image), 1), 1)
        embedding = self.proj(pooled)
        return self.fc(embedding), embedding


class Standardized(nn.Module):
    """Each image standardised to mean 0, std 1 over its own pixels before the network.

    The engine stretches every image to its own intensity range, but the crop's brightness and
    contrast still differ by site and film; standardising inside the model removes that cue
    without touching the served preprocessing (it travels in the ONNX graph)."""

    def __init__(self, model: nn.Module, eps: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.eps = eps

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        centred = image - mean
        std = torch.sqrt((centred * centred).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        return self.model(centred / std)


def build_classifier(
    architecture: str, embedding_dim: int, *, standardize: bool = False
) -> nn.Module:
    model: nn.Module
    if architecture == "resnet50":
        model = ResNet50Classifier()
    elif architecture == "efficientnet-lite0":
        from engine.train.efficientnet import EfficientNetLite0Classifier

        model = EfficientNetLite0Classifier()
    else:
        model = TinyClassifier(embedding_dim=embedding_dim)
    return Standardized(model) if standardize else model
