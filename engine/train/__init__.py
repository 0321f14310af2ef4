"""Torch training and ONNX export (the `train` extra). Never imported by inference.

Importing this package does not import torch; the trainers do, when they run.
"""

from engine.errors import ConfigError


def require_torch() -> None:
    """ConfigError saying how to install the train extra, unless torch and torchvision import."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"training needs PyTorch ({exc}); install the train extra: pip install -e '.[train]'"
        ) from None
