"""engine.runtime.cuda: the cuda-python plumbing up to the first driver call: readable errors from
cuda-python's result codes, no GPU reported rather than raised, and every CUDA runtime, driver
and NVRTC name the engine spells exists in the installed cuda-python."""

from __future__ import annotations

import ast
import re
from enum import IntEnum
from pathlib import Path

import pytest
from conftest import REPO

from engine.runtime import cuda


class cudaError_t(IntEnum):  # noqa: N801 - named like cuda-python's enum on purpose
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class CUresult(IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_NO_DEVICE = 100


def test_check_unwraps_values_and_raises_readable_errors():
    assert cuda.check((cudaError_t.cudaSuccess,), "cudaFree") is None
    assert cuda.check((cudaError_t.cudaSuccess, 42), "cudaMalloc") == 42
    assert cuda.check((CUresult.CUDA_SUCCESS, 1, 2), "cuX") == (1, 2)
    with pytest.raises(
        cuda.CudaError, match=r"^cudaMalloc\(16\) failed: cudaErrorMemoryAllocation"
    ):
        cuda.check((cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(16)")
    with pytest.raises(cuda.CudaError, match="cuInit failed: CUDA_ERROR_NO_DEVICE"):
        cuda.check((CUresult.CUDA_ERROR_NO_DEVICE,), "cuInit")
    assert issubclass(cuda.CudaError, __import__("engine.errors").errors.EngineError)


def test_check_with_real_cuda_python_enums():
    if not cuda.cuda_python_present():
        pytest.skip("cuda-python is not installed")
    b = cuda.bindings()
    with pytest.raises(
        cuda.CudaError, match="cudaMalloc failed: cudaErrorNoDevice: no CUDA-capable device"
    ):
        cuda.check((b.runtime.cudaError_t.cudaErrorNoDevice, 0), "cudaMalloc")
    # the driver's description needs libcuda; without it the name is the message
    with pytest.raises(cuda.CudaError, match="cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE"):
        cuda.check((b.driver.CUresult.CUDA_ERROR_INVALID_IMAGE, None), "cuModuleLoadData")
    with pytest.raises(cuda.CudaError, match="NVRTC_ERROR_COMPILATION"):
        cuda.check((b.nvrtc.nvrtcResult.NVRTC_ERROR_COMPILATION,), "nvrtcCompileProgram")


def test_no_gpu_here_is_reported_not_raised():
    if cuda.gpu_available():
        pytest.skip("this machine has a GPU")
    assert cuda.device_count() == 0
    if cuda.cuda_python_present():
        with pytest.raises(cuda.CudaError, match=r"cudaSetDevice\(0\) failed"):
            cuda.use_device(0)


def test_plumbing_fails_readably_at_the_first_cuda_call_without_a_driver():
    if cuda.gpu_available() or not cuda.cuda_python_present():
        pytest.skip("needs cuda-python on a machine without a usable GPU")
    from kernels import nvrtc

    with pytest.raises(cuda.CudaError, match=r"^cudaStreamCreate failed: cudaError"):
        cuda.Stream()
    with pytest.raises(cuda.CudaError, match=r"^cudaMalloc\(1024\) failed: cudaError"):
        cuda.DeviceBuffer(1024)
    with pytest.raises(cuda.CudaError, match=r"^cudaGetDevice failed: cudaError"):
        nvrtc.lung_bbox_ptr(0, 1, 8, 8, 0.5, 0.05, 0, 0)
    assert cuda.HostBuffer(0).ptr == 0  # nothing asked, nothing allocated


def test_gpu_info_compute_capability():
    assert (
        cuda.GpuInfo("NVIDIA H100 80GB HBM3", "9.0").sm == 90
        and cuda.GpuInfo("x", "12.1").sm == 121
    )


CUDA_SCANNED = [
    REPO / "engine" / "runtime" / "cuda.py",
    REPO / "engine" / "stages" / "gpu.py",
    REPO / "kernels" / "nvrtc.py",
    REPO / "engine" / "runtime" / "tensorrt.py",
    REPO / "engine" / "runtime" / "plans.py",
    REPO / "engine" / "build.py",
]
CUDA_NAME = re.compile(r"^(?:cuda|cu|nvrtc)[A-Z]\w*$")
CUDA_MUST_USE = {
    (None, "cudaMemcpyAsync"),
    ("cudaMemcpyKind", "cudaMemcpyDeviceToDevice"),
    (None, "cudaStreamSynchronize"),
    (None, "cudaMallocHost"),  # through getattr, as a string
    (None, "cuLaunchKernel"),
    (None, "nvrtcCompileProgram"),
}


def used_cuda_names(paths: list[Path]) -> set[tuple[str | None, str]]:
    """(None, name) for cuda-python functions/types, (Enum, member) for enum members: every
    attribute or string spelled like a CUDA runtime, driver or NVRTC name."""
    used: set[tuple[str | None, str]] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and CUDA_NAME.match(node.attr):
                v = node.value
                enum = v.attr if isinstance(v, ast.Attribute) and CUDA_NAME.match(v.attr) else None
                used.add((enum, node.attr))
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and CUDA_NAME.match(node.value)
            ):
                used.add((None, node.value))
    return used


def test_every_cuda_python_name_we_use_exists():
    if not cuda.cuda_python_present():
        pytest.skip("cuda-python is not installed")
    b = cuda.bindings()
    modules = (b.runtime, b.driver, b.nvrtc)
    used = used_cuda_names(CUDA_SCANNED)
    assert not CUDA_MUST_USE - used, f"the scan missed: {CUDA_MUST_USE - used}"

    def known(enum: str | None, name: str) -> bool:
        if enum is None:
            return any(hasattr(m, name) for m in modules)
        return any(hasattr(getattr(m, enum, None), name) for m in modules)

    unknown = sorted(f"{e}.{n}" if e else n for e, n in used if not known(e, n))
    assert not unknown, f"not in the installed cuda-python: {unknown}"
    assert not known(None, "cudaMemcpyDtoD") and not known("cudaMemcpyKind", "cudaMemcpyD2D")
