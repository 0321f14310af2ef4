"""Skip logic for GPU tests: each says which piece is missing (GPU, cuda-python, NVRTC, CuPy,
TensorRT).

Use as ``pytestmark = [pytest.mark.gpu, requires_gpu]`` or per test. Importing this module
imports nothing heavy: it only looks for packages and asks cuda-python for a device count.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest


def _has(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin not in (None, "namespace")


@functools.cache
def gpu_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when they can."""
    from engine.runtime.cuda import cuda_python_present, device_count

    if not cuda_python_present():
        return "cuda-python is not installed (pip install cuda-python)"
    if device_count() == 0:
        return "no NVIDIA GPU (or no driver) on this machine"
    return None


def gpu_available() -> bool:
    return gpu_reason() is None


@functools.cache
def nvrtc_reason() -> str | None:
    """Why NVRTC cannot compile here (no cuda-python or no NVRTC library), or None when it can:
    compiling needs no GPU."""
    from kernels import nvrtc

    try:
        nvrtc.nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - no cuda-python or no NVRTC library
        return f"NVRTC is not available here ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def cupy_reason() -> str | None:
    return gpu_reason() or (None if _has("cupy") else "CuPy is not installed")


@functools.cache
def tensorrt_reason() -> str | None:
    if gpu_reason():
        return gpu_reason()
    if not _has("tensorrt"):  # tensorrt-stubs alone is a namespace package without code
        return "TensorRT is not installed (pip install 'cxr-engine[gpu]')"
    return None


requires_gpu = pytest.mark.skipif(not gpu_available(), reason=gpu_reason() or "")
requires_cupy = pytest.mark.skipif(cupy_reason() is not None, reason=cupy_reason() or "")
requires_tensorrt = pytest.mark.skipif(
    tensorrt_reason() is not None, reason=tensorrt_reason() or ""
)
