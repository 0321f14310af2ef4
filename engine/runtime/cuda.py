"""Thin helpers over cuda-python (NVIDIA's official CUDA bindings): errors, device, memory.

Every cuda-python call returns a tuple whose first item is a status enum (``CUresult`` from
the driver API, ``cudaError_t`` from the runtime API, ``nvrtcResult`` from NVRTC); ``check``
turns a non-zero status into a ``CudaError`` that names the call and says what went wrong, and
unwraps the values. This is the pattern of TensorRT's own samples (``cuda_call`` in
samples/python/common_runtime.py), with readable messages.

Nothing here is imported by the CPU path; ``bindings()`` imports cuda-python on first use.
Everything shares the device's primary context (what the runtime API, TensorRT and CuPy use),
so pointers from any of them can be mixed.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from engine.errors import BackendUnavailable, EngineError

CUDA_PYTHON_HINT = (
    "install cuda-python (`pip install 'cxr-engine[gpu]'`, or `pip install cuda-python`) on a "
    "machine with an NVIDIA GPU and driver"
)


class CudaError(EngineError):
    """A CUDA driver, runtime or NVRTC call failed."""


@dataclass(frozen=True, slots=True)
class Bindings:
    driver: ModuleType
    runtime: ModuleType
    nvrtc: ModuleType


_BINDINGS: Bindings | None = None


def cuda_python_present() -> bool:
    """Whether cuda-python is installed, without importing it (the CPU path stays clean)."""
    spec = importlib.util.find_spec("cuda")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(loc) / "bindings").is_dir() or any(Path(loc).glob("cudart*"))
        for loc in spec.submodule_search_locations
    )


def bindings() -> Bindings:
    """The cuda-python modules: ``cuda.bindings`` (cuda-python >= 12.6) or the older names."""
    global _BINDINGS
    if _BINDINGS is None:
        try:
            from cuda.bindings import driver, nvrtc, runtime
        except ImportError:
            try:  # cuda-python < 12.6 spelled them cuda.cuda / cuda.cudart / cuda.nvrtc
                from cuda import cuda as driver  # type: ignore[no-redef]
                from cuda import cudart as runtime  # type: ignore[no-redef]
                from cuda import nvrtc  # type: ignore[no-redef]
            except ImportError:
                raise BackendUnavailable(
                    f"cuda-python is not installed: {CUDA_PYTHON_HINT}"
                ) from None
        _BINDINGS = Bindings(driver=driver, runtime=runtime, nvrtc=nvrtc)
    return _BINDINGS


def describe_status(status: Any) -> str:
    """'cudaErrorNoDevice: no CUDA-capable device is detected' for any of the three enums."""
    name = getattr(status, "name", str(status))
    kind = type(status).__name__
    text = ""
    try:
        b = bindings()
        if kind == "cudaError_t":
            err, raw = b.runtime.cudaGetErrorString(status)
            text = raw.decode() if int(err) == 0 else ""
        elif kind == "CUresult":
            # needs the driver library; on a machine without one the name has to do
            err, raw = b.driver.cuGetErrorString(status)
            text = raw.decode() if int(err) == 0 and raw else ""
        elif kind == "nvrtcResult":
            err, raw = b.nvrtc.nvrtcGetErrorString(status)
            text = raw.decode() if int(err) == 0 else ""
    except Exception:  # noqa: BLE001 - a description is a nicety; the name is enough
        text = ""
    return f"{name}: {text}" if text and text != name else name


def check(result: Any, what: str) -> Any:
    """Raise CudaError unless ``result``'s status is success; return the remaining values.

    ``result`` is what a cuda-python call returned: ``(status,)``, ``(status, value)`` or
    ``(status, v1, v2, ...)``; the answer is None, ``value`` or the tuple of values.
    """
    if isinstance(result, tuple):
        status, values = result[0], result[1:]
    else:
        status, values = result, ()
    if int(status) != 0:
        raise CudaError(f"{what} failed: {describe_status(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- device


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What a TensorRT plan is tied to: the GPU model and its compute capability."""

    name: str
    compute_capability: str  # "9.0"

    @property
    def sm(self) -> int:
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


def device_count() -> int:
    """Number of CUDA devices; 0 when cuda-python, the driver or a GPU is missing."""
    if not cuda_python_present():
        return 0
    try:
        err, count = bindings().runtime.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no driver library: cuda-python raises its own types
        return 0
    return int(count) if int(err) == 0 and count else 0


def gpu_available() -> bool:
    return device_count() > 0


def device_info(device: int = 0) -> GpuInfo:
    rt = bindings().runtime
    props = check(rt.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = props.name
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(name=str(name).strip(), compute_capability=f"{props.major}.{props.minor}")


def use_device(device: int = 0) -> None:
    """Make the device's primary context current on this thread (runtime API semantics).

    cudaFree(0) is the customary way to force the runtime to create/bind the context, which
    the driver API calls (cuModuleLoadData, cuLaunchKernel) then use too.
    """
    rt = bindings().runtime
    check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
    check(rt.cudaFree(0), "cudaFree(0) (context initialisation)")


# --------------------------------------------------------------------------- streams, memory


class Stream:
    """A CUDA stream (cudaStreamCreate); ``handle`` is the int TensorRT and launches take."""

    def __init__(self) -> None:
        self._stream = check(bindings().runtime.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        check(bindings().runtime.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            check(bindings().runtime.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


def synchronize(stream: int) -> None:
    """Wait on the host for what is queued on a stream given by its handle (e.g. DALI's)."""
    check(bindings().runtime.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class _Buffer:
    """Bytes from a CUDA allocator, grown on demand (never shrunk)."""

    _alloc = "cudaMalloc"
    _free = "cudaFree"

    def __init__(self, nbytes: int = 0) -> None:
        self.ptr = 0
        self.nbytes = 0
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        alloc = getattr(bindings().runtime, self._alloc)
        self.ptr = int(check(alloc(nbytes), f"{self._alloc}({nbytes})"))
        self.nbytes = nbytes

    def free(self) -> None:
        if self.ptr:
            check(getattr(bindings().runtime, self._free)(self.ptr), self._free)
        self.ptr, self.nbytes = 0, 0


class DeviceBuffer(_Buffer):
    """cudaMalloc'd device bytes."""


class HostBuffer(_Buffer):
    """Page-locked (pinned) host bytes from cudaMallocHost, so copies can be asynchronous."""

    _alloc = "cudaMallocHost"
    _free = "cudaFreeHost"

    def view(self, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> np.ndarray:
        """A NumPy array over the first bytes of the buffer (no copy)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if nbytes > self.nbytes:
            raise ValueError(f"view of {nbytes} bytes exceeds the pinned buffer ({self.nbytes})")
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        return np.frombuffer(memoryview(raw), dtype=dt, count=nbytes // dt.itemsize).reshape(shape)


def copy_to_device(dst: int, src: int, nbytes: int, stream: int) -> None:
    rt = bindings().runtime
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(host->device)")


def copy_to_host(dst: int, src: int, nbytes: int, stream: int) -> None:
    rt = bindings().runtime
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(device->host)")


def copy_device_to_device(dst: int, src: int, nbytes: int, stream: int) -> None:
    rt = bindings().runtime
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(device->device)")
