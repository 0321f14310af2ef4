"""Inference backends behind one interface; ``get_backend`` picks one by name."""

from __future__ import annotations

from engine.errors import ConfigError
from engine.runtime.base import Backend

__all__ = ["Backend", "get_backend", "resolve_backend"]


def resolve_backend(name: str) -> str:
    """Map "auto" to a concrete backend.

    ONNX Runtime for now; TensorRT joins "auto" when a GPU, TensorRT and matching plans exist
    (the GPU path), so "auto" never picks a backend that would then refuse to load.
    """
    return "onnxruntime" if name == "auto" else name


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
