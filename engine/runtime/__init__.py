"""Inference backends behind one interface; ``get_backend`` picks one by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.runtime.base import Backend

if TYPE_CHECKING:
    from engine.models import ModelSet

__all__ = ["Backend", "get_backend", "resolve_backend"]


def resolve_backend(
    name: str, *, models: ModelSet | None = None, plans_dir: Path | None = None
) -> str:
    """Map "auto" to a concrete backend.

    TensorRT when ``models`` are given and a GPU, TensorRT, cuda-python and plans built from
    these very models for this GPU and TensorRT version exist (in ``plans_dir``, default
    ``<models dir>/plans``); else ONNX Runtime. So "auto" never picks a backend that would then
    refuse to load. Without ``models`` (or without plans) nothing GPU-related is imported.
    """
    if name != "auto":
        return name
    if models is not None:
        from engine.runtime.plans import plans_usable

        if plans_usable(models, plans_dir):
            return "tensorrt"
    return "onnxruntime"


def get_backend(name: str) -> type[Backend]:
    if name == "onnxruntime":
        from engine.runtime.onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "null":
        from engine.runtime.null import NullBackend

        return NullBackend
    if name == "tensorrt":
        from engine.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend
    raise ConfigError(f"unknown backend {name!r}: choose auto, onnxruntime, tensorrt or null")
