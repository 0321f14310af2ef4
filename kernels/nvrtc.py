"""The CUDA kernels of this folder, compiled at run time with NVRTC and launched via cuda-python.

Same functions, same semantics as kernels/reference.py (the specification and the CPU path),
but on device memory: arguments are CuPy arrays or any object with
``__cuda_array_interface__`` (float32, C-contiguous); results are CuPy arrays when the inputs
are, else ``DeviceArray`` (``.get()`` copies to NumPy). The ``*_ptr`` variants take raw device
pointers (TensorRT output buffers, DALI tensors) and write into caller-owned memory.

Compilation: NVRTC (cuda.bindings.nvrtc) for the device's architecture (``sm_XX`` CUBIN, or
PTX for the newest architecture NVRTC knows when the device is newer), cached on disk under
``$CXR_KERNEL_CACHE`` or ``~/.cache/cxr-engine/kernels`` by sha256 of source, options, target
and NVRTC version; loaded with cuModuleLoadData into the device's primary context.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.cuda import CudaError, DeviceBuffer, bindings, check, use_device

KERNEL_DIR = Path(__file__).resolve().parent
# Bit-for-bit agreement with NumPy: no contracted multiply-adds, IEEE division, no flush to zero.
NVRTC_OPTIONS: tuple[str, ...] = (
    "--fmad=false",
    "--prec-div=true",
    "--ftz=false",
    "-default-device",
)
BLOCK = 256  # threads per block of the 1-D kernels (a multiple of the warp size)
TILE = 16  # crop kernel: TILE x TILE threads per block
MAX_CHANNELS = 4  # ChannelNorm in crop_resize_normalize.cu
MAX_GRID_YZ = 65535


class KernelCompileError(CudaError):
    """NVRTC rejected a kernel source; the message carries NVRTC's log."""


# --------------------------------------------------------------------------- compilation


def cache_dir() -> Path:
    env = os.environ.get("CXR_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-engine" / "kernels"


def nvrtc_version() -> str:
    major, minor = check(bindings().nvrtc.nvrtcVersion(), "nvrtcVersion")
    return f"{major}.{minor}"


def supported_archs() -> list[int]:
    return [
        int(a) for a in check(bindings().nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    ]


def compile_target(sm: int, supported: Sequence[int]) -> tuple[str, str]:
    """(--gpu-architecture value, "cubin" | "ptx") for a device of compute capability sm.

    A CUBIN when NVRTC knows the exact architecture; else PTX of the newest virtual
    architecture not above the device, which the driver JIT-compiles at load time.
    """
    if sm in supported:
        return f"sm_{sm}", "cubin"
    lower = [a for a in supported if a <= sm]
    if not lower:
        raise CudaError(
            f"NVRTC supports compute capabilities {sorted(supported)}; the device's is "
            f"{sm // 10}.{sm % 10}: install a cuda-python/NVRTC release that supports it"
        )
    return f"compute_{max(lower)}", "ptx"


def compile_source(
    source: str, name: str, arch: str, kind: str = "cubin", options: Sequence[str] = NVRTC_OPTIONS
) -> bytes:
    """Compile CUDA C source with NVRTC into a CUBIN or PTX image (needs no GPU)."""
    nv = bindings().nvrtc
    prog = check(
        nv.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram"
    )
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        status = nv.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if int(status) != 0:
            raise KernelCompileError(
                f"{name}: NVRTC could not compile it for {arch}:\n{_program_log(prog)}"
            )
        if kind == "cubin":
            size = check(nv.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            image = b" " * size
            check(nv.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        else:
            size = check(nv.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            image = b" " * size
            check(nv.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
        return image
    finally:
        check(nv.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


def _program_log(prog: Any) -> str:
    nv = bindings().nvrtc
    size = check(nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = b" " * size
    check(nv.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
    return log.rstrip(b"\0 ").decode(errors="replace")


def cached_image(source_file: str, sm: int) -> bytes:
    """The compiled image of kernels/<source_file> for compute capability sm, via the disk cache."""
    source = (KERNEL_DIR / source_file).read_text()
    arch, kind = compile_target(sm, supported_archs())
    key = "\0".join([source, *NVRTC_OPTIONS, arch, kind, nvrtc_version()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = cache_dir() / f"{Path(source_file).stem}-{arch}-{digest}.{kind}"
    if path.is_file():
        return path.read_bytes()
    image = compile_source(source, source_file, arch, kind)
    try:  # a cache that cannot be written only costs a recompilation next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(image)
        os.replace(tmp, path)
    except OSError:
        pass
    return image


# --------------------------------------------------------------------------- loading, launching

_lock = threading.Lock()
_functions: dict[tuple[int, str, str], Any] = {}  # (device, file, kernel) -> CUfunction
_modules: list[Any] = []  # kept alive for the process
_thread = threading.local()


def current_device() -> int:
    return int(check(bindings().runtime.cudaGetDevice(), "cudaGetDevice"))


def _function(source_file: str, kernel: str) -> Any:
    device = current_device()
    if getattr(_thread, "device", None) != device:
        use_device(device)  # the driver API below needs the primary context current here
        _thread.device = device
    key = (device, source_file, kernel)
    with _lock:
        if key not in _functions:
            from engine.runtime.cuda import device_info

            image = cached_image(source_file, device_info(device).sm)
            drv = bindings().driver
            module = check(drv.cuModuleLoadData(image), f"cuModuleLoadData({source_file})")
            _modules.append(module)
            for name in _kernel_names(source_file):
                _functions[(device, source_file, name)] = check(
                    drv.cuModuleGetFunction(module, name.encode()),
                    f"cuModuleGetFunction({name})",
                )
        return _functions[key]


def _kernel_names(source_file: str) -> list[str]:
    text = (KERNEL_DIR / source_file).read_text()
    names = []
    for part in text.split('extern "C" __global__ void ')[1:]:
        names.append(part.split("(", 1)[0].strip())
    return names


@dataclass(frozen=True, slots=True)
class Arg:
    """One kernel argument: a value and the NumPy dtype that has its C layout."""

    value: Any
    dtype: Any


def ptr(v: int) -> Arg:
    return Arg(v, np.uint64)


def i32(v: int) -> Arg:
    return Arg(v, np.int32)


def f32(v: float) -> Arg:
    return Arg(v, np.float32)


def f64(v: float) -> Arg:
    return Arg(v, np.float64)


def launch(
    source_file: str,
    kernel: str,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: Sequence[Arg],
    stream: int,
) -> None:
    """cuLaunchKernel with kernelParams = an array of pointers to each argument's bytes.

    (The form of the cuda-python docs' examples: the driver copies each parameter from its
    address, sizes taken from the kernel image.)
    """
    func = _function(source_file, kernel)
    holders = [np.array(a.value, dtype=a.dtype).reshape(-1) for a in args]
    params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
    check(
        bindings().driver.cuLaunchKernel(func, *grid, *block, 0, stream, params.ctypes.data, 0),
        f"cuLaunchKernel({kernel}, grid={grid}, block={block})",
    )


# --------------------------------------------------------------------------- raw-pointer API


def bbox_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """(blocks for the one-thread-per-image kernels, blocks per image of the reduction)."""
    return math.ceil(n / BLOCK), max(1, min(math.ceil(h * w / (BLOCK * 4)), 64))


def bbox_threshold(threshold: float) -> np.float32:
    """NumPy compares a float32 mask with a Python float threshold in float32 (NEP 50)."""
    with np.errstate(over="ignore"):  # a threshold beyond float32's range becomes +-inf
        return np.float32(threshold)


def lung_bbox_ptr(
    masks: int,
    n: int,
    h: int,
    w: int,
    threshold: float,
    margin: float,
    boxes: int,
    fraction: int,
    stream: int = 0,
) -> None:
    """masks (n, h, w) float32 -> boxes (n, 4) float32 and fraction (n,) float32, on stream."""
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"masks must be (N, h, w) with every size >= 1, got ({n}, {h}, {w})")
    if n > MAX_GRID_YZ:
        raise ValueError(f"at most {MAX_GRID_YZ} masks per launch, got {n}")
    src = "lung_bbox.cu"
    rows_grid, blocks_x = bbox_grid(n, h, w)
    rows = (rows_grid, 1, 1)
    thr = float(bbox_threshold(threshold))
    launch(src, "lung_bbox_init", rows, (BLOCK, 1, 1), [i32(n), ptr(boxes), ptr(fraction)], stream)
    launch(
        src,
        "lung_bbox_reduce",
        (blocks_x, n, 1),
        (BLOCK, 1, 1),
        [ptr(masks), i32(h), i32(w), f32(thr), ptr(boxes), ptr(fraction)],
        stream,
    )
    launch(
        src,
        "lung_bbox_finalize",
        rows,
        (BLOCK, 1, 1),
        [i32(n), i32(h), i32(w), f64(margin), ptr(boxes), ptr(fraction)],
        stream,
    )


def channel_norm(
    mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray
) -> np.ndarray:
    """The ChannelNorm struct (float mean[4], float std[4]) as 8 float32s."""
    mean_a = np.asarray(mean, np.float32).reshape(-1)
    std_a = np.asarray(std, np.float32).reshape(-1)
    if len(mean_a) != len(std_a) or not 1 <= len(mean_a) <= MAX_CHANNELS:
        raise ValueError(
            f"mean and std need the same length, 1 to {MAX_CHANNELS}; got {len(mean_a)}, {len(std_a)}"
        )
    norm = np.ones(2 * MAX_CHANNELS, np.float32)
    norm[: len(mean_a)] = mean_a
    norm[MAX_CHANNELS : MAX_CHANNELS + len(std_a)] = std_a
    return norm


def crop_resize_normalize_ptr(
    images: int,
    n: int,
    height: int,
    width: int,
    boxes: int,
    out_hw: tuple[int, int],
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    out: int,
    stream: int = 0,
) -> None:
    """images (n, H, W) float32 + boxes (n, 4) -> out (n, C, oh, ow) float32, on stream."""
    oh, ow = (int(v) for v in out_hw)
    if min(n, height, width, oh, ow) < 1:
        raise ValueError(f"empty crop: n={n}, image {height}x{width}, output {oh}x{ow}")
    if n > MAX_GRID_YZ:
        raise ValueError(f"at most {MAX_GRID_YZ} images per launch, got {n}")
    norm = channel_norm(mean, std)
    channels = len(np.asarray(mean).reshape(-1))
    launch(
        "crop_resize_normalize.cu",
        "crop_resize_normalize",
        (math.ceil(ow / TILE), math.ceil(oh / TILE), n),
        (TILE, TILE, 1),
        [
            ptr(images),
            i32(height),
            i32(width),
            ptr(boxes),
            i32(oh),
            i32(ow),
            i32(channels),
            Arg(norm, np.float32),
            ptr(out),
        ],
        stream,
    )


# --------------------------------------------------------------------------- array API


class DeviceArray:
    """A C-contiguous device array owned by this process (used when CuPy is not at hand)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._buf = DeviceBuffer(max(self.nbytes, 1))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self._buf.ptr, False),
            "strides": None,
            "version": 3,
        }

    def get(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        rt = bindings().runtime
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpy(host.ctypes.data, self._buf.ptr, self.nbytes, kind), "cudaMemcpy")
        return host

    def __del__(self) -> None:
        # at interpreter shutdown the driver may be gone; it frees the memory anyway
        with contextlib.suppress(Exception):
            self._buf.free()


def _interface(x: Any, name: str, ndim: int) -> tuple[int, tuple[int, ...]]:
    """(device pointer, shape) of a float32 C-contiguous device array."""
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(
            f"{name} must be a device array (CuPy, or any object with __cuda_array_interface__), "
            f"not {type(x).__name__}; the NumPy version is kernels.reference"
        )
    shape = tuple(int(s) for s in cai["shape"])
    if len(shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {shape}")
    if np.dtype(cai["typestr"]) != np.float32:
        raise ValueError(f"{name} must be float32, got {np.dtype(cai['typestr'])}")
    strides = cai.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, 4):
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)}")
    return int(cai["data"][0]), shape


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _empty(shape: tuple[int, ...], like: Any) -> Any:
    if _is_cupy(like):
        import cupy

        return cupy.empty(shape, dtype=cupy.float32)
    return DeviceArray(shape, np.float32)


def _stream_handle(stream: Any, like: Any) -> int:
    if stream is None:
        if _is_cupy(like) and "cupy" in sys.modules:
            return int(sys.modules["cupy"].cuda.get_current_stream().ptr)
        return 0
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "handle"):  # CuPy streams, engine.runtime.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


def lung_bbox(
    masks: Any,
    threshold: float,
    margin: float,
    *,
    boxes: Any = None,
    fraction: Any = None,
    stream: Any = None,
) -> tuple[Any, Any]:
    """Device twin of kernels.reference.lung_bbox: (boxes (N, 4), fraction (N,)), float32."""
    masks_ptr, (n, h, w) = _interface(masks, "masks", 3)
    boxes = _empty((n, 4), masks) if boxes is None else boxes
    fraction = _empty((n,), masks) if fraction is None else fraction
    boxes_ptr, bshape = _interface(boxes, "boxes", 2)
    frac_ptr, fshape = _interface(fraction, "fraction", 1)
    if bshape != (n, 4) or fshape != (n,):
        raise ValueError(f"boxes must be ({n}, 4) and fraction ({n},), got {bshape}, {fshape}")
    s = _stream_handle(stream, masks)
    lung_bbox_ptr(masks_ptr, n, h, w, threshold, margin, boxes_ptr, frac_ptr, s)
    return boxes, fraction


def crop_resize_normalize(
    images: Any,
    boxes: Any,
    out_hw: tuple[int, int],
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    *,
    out: Any = None,
    stream: Any = None,
) -> Any:
    """Device twin of kernels.reference.crop_resize_normalize: (N, C, oh, ow) float32."""
    images_ptr, (n, height, width) = _interface(images, "images", 3)
    boxes_ptr, bshape = _interface(boxes, "boxes", 2)
    if bshape != (n, 4):
        raise ValueError(
            f"need images (N, H, W) and boxes (N, 4), got {(n, height, width)}, {bshape}"
        )
    channels = len(np.asarray(mean).reshape(-1))
    oh, ow = (int(v) for v in out_hw)
    out = _empty((n, channels, oh, ow), images) if out is None else out
    out_ptr, oshape = _interface(out, "out", 4)
    if oshape != (n, channels, oh, ow):
        raise ValueError(f"out must be {(n, channels, oh, ow)}, got {oshape}")
    s = _stream_handle(stream, images)
    crop_resize_normalize_ptr(
        images_ptr, n, height, width, boxes_ptr, (oh, ow), mean, std, out_ptr, s
    )
    return out
