"""TensorRT backend (GPU). Needs the `gpu` extra, an NVIDIA GPU and plans built by `cxr build`.

Until the GPU path lands (TensorRT engines, cuda-python buffers), selecting this backend fails
at once with what is missing and how to get it, and never imports tensorrt from the CPU path.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from engine.errors import BackendUnavailable
from engine.runtime.base import Backend

INSTALL_HINT = (
    "install the GPU extra (`pip install 'cxr-engine[gpu]'`: TensorRT and cuda-python) on a "
    "machine with an NVIDIA GPU and driver, then build plans with `cxr build`"
)


def missing_requirements() -> list[str]:
    """What this machine lacks for the TensorRT backend (empty when it has everything)."""
    missing = []
    # tensorrt-stubs (type hints only) leaves a bare namespace package named tensorrt: a spec
    # without an origin is not TensorRT. cuda-python itself is a namespace (cuda.bindings).
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin is None:
        missing.append("the Python package tensorrt")
    if importlib.util.find_spec("cuda") is None:
        missing.append("the Python package cuda-python")
    if not _gpu_present():
        missing.append("an NVIDIA GPU (no /dev/nvidia0 and no driver library)")
    return missing


def _gpu_present() -> bool:
    import ctypes.util
    import os

    return os.path.exists("/dev/nvidia0") and ctypes.util.find_library("cuda") is not None


class TensorRTBackend(Backend):
    name = "tensorrt"

    def load(self) -> None:
        missing = missing_requirements()
        if missing:
            raise BackendUnavailable(
                f"--backend tensorrt cannot run here: missing {', '.join(missing)}. {INSTALL_HINT}"
            )
        raise BackendUnavailable(
            "--backend tensorrt: the TensorRT execution path is not part of this release yet; "
            "use --backend onnxruntime"
        )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise BackendUnavailable("TensorRT backend is not loaded")
