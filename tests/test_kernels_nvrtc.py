"""kernels.nvrtc: what runs without a GPU (the compile target, the disk cache of compiled
images, kernel names, how arguments are packed for cuLaunchKernel, the grids and arguments of
each launch, the checks of the array API, stream handles, the ChannelNorm layout), NVRTC's
compiler log where cuda-python's NVRTC is at hand, and on a GPU (marked `gpu`) the array API
with this module's own DeviceArray (no CuPy) and the kernel cache. The kernels against
kernels/reference.py: test_kernels_gpu.py.

Imports only numpy, pytest and kernels (which needs cuda-python only when called)."""

from __future__ import annotations

import ctypes
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from gpu_utils import nvrtc_reason, requires_gpu

from kernels import nvrtc
from kernels import reference as ref

# --------------------------------------------------------------------------- compilation


def test_nvrtc_reports_the_compiler_log():
    reason = nvrtc_reason()
    if reason:
        pytest.skip(reason)
    with pytest.raises(nvrtc.KernelCompileError, match=r"broken\.cu: NVRTC could not compile"):
        nvrtc.compile_source('extern "C" __global__ void k( {', "broken.cu", "sm_80")


def test_compile_target_falls_back_to_ptx_for_newer_devices():
    assert nvrtc.compile_target(90, [75, 80, 90]) == ("sm_90", "cubin")
    assert nvrtc.compile_target(95, [75, 80, 90]) == ("compute_90", "ptx")
    with pytest.raises(nvrtc.CudaError, match="NVRTC supports"):
        nvrtc.compile_target(60, [75, 80])


def test_compile_target_picks_the_newest_architecture_below_the_device():
    assert nvrtc.compile_target(87, [90, 75, 80, 86]) == ("compute_86", "ptx")
    with pytest.raises(nvrtc.CudaError, match=r"\[75, 80\]; the device's is 6.1: install"):
        nvrtc.compile_target(61, [80, 75])


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_KERNEL_CACHE", "~/kc")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert nvrtc.cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("CXR_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert nvrtc.cache_dir() == tmp_path / "xdg" / "cxr-engine" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert nvrtc.cache_dir() == tmp_path / ".cache" / "cxr-engine" / "kernels"


@pytest.fixture
def fake_nvrtc(monkeypatch, tmp_path):
    """NVRTC replaced: architectures 75-90, version 12.8, compile_source counted."""
    compiled: list[tuple[str, str, str]] = []

    def compile_source(source, name, arch, kind="cubin", options=nvrtc.NVRTC_OPTIONS):
        compiled.append((name, arch, kind))
        return f"{name}:{arch}:{kind}".encode()

    monkeypatch.setattr(nvrtc, "supported_archs", lambda: [75, 80, 86, 90])
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: "12.8")
    monkeypatch.setattr(nvrtc, "compile_source", compile_source)
    monkeypatch.setenv("CXR_KERNEL_CACHE", str(tmp_path / "cache"))
    return compiled


def test_compiled_images_are_cached_on_disk(fake_nvrtc, tmp_path, monkeypatch):
    image = nvrtc.cached_image("lung_bbox.cu", 90)
    assert image == b"lung_bbox.cu:sm_90:cubin"
    (path,) = (tmp_path / "cache").iterdir()
    assert path.name.startswith("lung_bbox-sm_90-") and path.suffix == ".cubin"
    assert len(path.stem.rsplit("-", 1)[1]) == 32
    assert nvrtc.cached_image("lung_bbox.cu", 90) == image  # from the file
    assert fake_nvrtc == [("lung_bbox.cu", "sm_90", "cubin")]
    path.write_bytes(b"what the cache holds")
    assert nvrtc.cached_image("lung_bbox.cu", 90) == b"what the cache holds"
    # another target or NVRTC version is another file
    assert nvrtc.cached_image("lung_bbox.cu", 89) == b"lung_bbox.cu:compute_86:ptx"
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: "13.0")
    nvrtc.cached_image("lung_bbox.cu", 90)
    assert len(list((tmp_path / "cache").iterdir())) == 3 and len(fake_nvrtc) == 3


def test_a_cache_that_cannot_be_written_only_costs_a_recompile(fake_nvrtc, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CXR_KERNEL_CACHE", str(tmp_path / "file" / "cache"))
    assert (
        nvrtc.cached_image("crop_resize_normalize.cu", 80)
        == b"crop_resize_normalize.cu:sm_80:cubin"
    )
    nvrtc.cached_image("crop_resize_normalize.cu", 80)
    assert len(fake_nvrtc) == 2


def test_kernel_names_are_read_from_the_sources():
    assert nvrtc._kernel_names("lung_bbox.cu") == [
        "lung_bbox_init",
        "lung_bbox_reduce",
        "lung_bbox_finalize",
    ]
    assert nvrtc._kernel_names("crop_resize_normalize.cu") == ["crop_resize_normalize"]


# --------------------------------------------------------------------------- launching


def test_launch_passes_a_pointer_to_each_argument_s_bytes(monkeypatch):
    seen: dict[str, Any] = {}

    def cu_launch_kernel(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        pointers = (ctypes.c_uint64 * 6).from_address(params)
        seen.update(func=func, grid=(gx, gy, gz), block=(bx, by, bz), shared=shared,
                    stream=stream, extra=extra)  # fmt: skip
        values = []
        for p, dtype in zip(pointers, (np.uint64, np.int32, np.float32, np.float64, np.float32,
                                       np.int32), strict=True):  # fmt: skip
            size = np.dtype(dtype).itemsize
            values.append(np.frombuffer(ctypes.string_at(p, size), dtype)[0])
        seen["values"] = values
        # the array argument: all 8 floats at its address
        seen["norm"] = np.frombuffer(ctypes.string_at(pointers[4], 32), np.float32).tolist()
        return (0,)

    monkeypatch.setattr(nvrtc, "_function", lambda source, kernel: f"{source}:{kernel}")
    monkeypatch.setattr(
        nvrtc,
        "bindings",
        lambda: SimpleNamespace(driver=SimpleNamespace(cuLaunchKernel=cu_launch_kernel)),
    )
    norm = nvrtc.channel_norm((0.5, 0.25), (2.0, 4.0))
    args = [nvrtc.ptr(2**40 + 8), nvrtc.i32(-3), nvrtc.f32(0.1), nvrtc.f64(0.1),
            nvrtc.Arg(norm, np.float32), nvrtc.i32(7)]  # fmt: skip
    nvrtc.launch("k.cu", "kern", (4, 2, 1), (256, 1, 1), args, stream=99)
    assert (
        seen["func"] == "k.cu:kern" and seen["grid"] == (4, 2, 1) and seen["block"] == (256, 1, 1)
    )
    assert (seen["shared"], seen["stream"], seen["extra"]) == (0, 99, 0)
    v = seen["values"]
    assert v[0] == 2**40 + 8 and v[1] == -3 and v[5] == 7
    assert v[2] == np.float32(0.1) and v[3] == 0.1  # f32 rounded, f64 not
    assert seen["norm"] == [0.5, 0.25, 1, 1, 2.0, 4.0, 1, 1]


def test_a_failed_launch_names_the_kernel_and_grid(monkeypatch):
    monkeypatch.setattr(nvrtc, "_function", lambda source, kernel: None)
    monkeypatch.setattr(
        nvrtc,
        "bindings",
        lambda: SimpleNamespace(driver=SimpleNamespace(cuLaunchKernel=lambda *a: (700,))),
    )
    with pytest.raises(
        nvrtc.CudaError,
        match=r"cuLaunchKernel\(kern, grid=\(1, 1, 1\), block=\(32, 1, 1\)\) failed",
    ):
        nvrtc.launch("k.cu", "kern", (1, 1, 1), (32, 1, 1), [], 0)


def test_arg_helpers_carry_their_c_types():
    assert [a.dtype for a in (nvrtc.ptr(1), nvrtc.i32(1), nvrtc.f32(1), nvrtc.f64(1))] == [
        np.uint64, np.int32, np.float32, np.float64,
    ]  # fmt: skip


@pytest.fixture
def launches(monkeypatch) -> list[tuple]:
    """kernels.nvrtc.launch recorded, not run."""
    calls: list[tuple] = []
    monkeypatch.setattr(
        nvrtc,
        "launch",
        lambda src, kernel, grid, block, args, stream: calls.append(
            (kernel, grid, block, [a.value for a in args], stream)
        ),
    )
    return calls


def test_bbox_grid_and_threshold():
    assert nvrtc.bbox_grid(1, 1, 1) == (1, 1)
    assert nvrtc.bbox_grid(257, 32, 32) == (2, 1)  # 1024 pixels: one block per image
    assert nvrtc.bbox_grid(3, 100, 100) == (1, math.ceil(10000 / 1024))
    assert nvrtc.bbox_grid(3, 4096, 4096) == (1, 64)  # at most 64 blocks per image
    assert nvrtc.bbox_threshold(0.1) == np.float32(0.1)
    assert nvrtc.bbox_threshold(1e39) == np.inf and nvrtc.bbox_threshold(-1e39) == -np.inf


def test_lung_bbox_ptr_launches_init_reduce_finalize(launches):
    nvrtc.lung_bbox_ptr(0x100, 300, 97, 131, 0.1, 0.05, 0x200, 0x300, stream=7)
    (k1, g1, b1, a1, s1), (k2, g2, _, a2, _), (k3, g3, _, a3, s3) = launches
    assert (k1, k2, k3) == ("lung_bbox_init", "lung_bbox_reduce", "lung_bbox_finalize")
    assert g1 == g3 == (2, 1, 1) and b1 == (nvrtc.BLOCK, 1, 1) and s1 == s3 == 7
    assert g2 == (nvrtc.bbox_grid(300, 97, 131)[1], 300, 1)  # blocks per image x images
    assert a1 == [300, 0x200, 0x300]
    assert a2 == [0x100, 97, 131, float(np.float32(0.1)), 0x200, 0x300]
    assert a3 == [300, 97, 131, 0.05, 0x200, 0x300]


@pytest.mark.parametrize(
    ("n", "h", "w", "words"),
    [
        (0, 4, 4, r"masks must be \(N, h, w\) with every size >= 1, got \(0, 4, 4\)"),
        (2, 4, 0, r"got \(2, 4, 0\)"),
        (65536, 4, 4, "at most 65535 masks per launch, got 65536"),
    ],
)
def test_lung_bbox_ptr_refuses_what_cannot_launch(launches, n, h, w, words):
    with pytest.raises(ValueError, match=words):
        nvrtc.lung_bbox_ptr(0x100, n, h, w, 0.0, 0.0, 0x200, 0x300)
    assert launches == []


def test_crop_ptr_launch_tiles_the_output(launches):
    nvrtc.crop_resize_normalize_ptr(0x10, 5, 191, 209, 0x20, (224, 200), (0.5,), (0.25,), 0x30, 3)
    ((kernel, grid, block, args, stream),) = launches
    assert kernel == "crop_resize_normalize" and stream == 3
    assert grid == (math.ceil(200 / 16), 14, 5) and block == (nvrtc.TILE, nvrtc.TILE, 1)
    assert args[:7] == [0x10, 191, 209, 0x20, 224, 200, 1]
    assert args[7].tolist() == [0.5, 1, 1, 1, 0.25, 1, 1, 1] and args[8] == 0x30


@pytest.mark.parametrize(
    ("n", "size", "out_hw", "words"),
    [
        (0, (10, 10), (8, 8), "empty crop: n=0, image 10x10, output 8x8"),
        (1, (10, 0), (8, 8), "empty crop"),
        (1, (10, 10), (0, 8), "empty crop"),
        (70000, (10, 10), (8, 8), "at most 65535 images per launch"),
    ],
)
def test_crop_ptr_refuses_what_cannot_launch(launches, n, size, out_hw, words):
    with pytest.raises(ValueError, match=words):
        nvrtc.crop_resize_normalize_ptr(0x10, n, *size, 0x20, out_hw, (0.5,), (0.25,), 0x30)
    assert launches == []


def test_channel_norm_layout_and_limits():
    norm = nvrtc.channel_norm((0.5,), (0.25,))
    assert norm.tolist() == [0.5, 1, 1, 1, 0.25, 1, 1, 1]
    with pytest.raises(ValueError):
        nvrtc.channel_norm((0.1,) * 5, (1.0,) * 5)


def test_channel_norm_needs_as_many_means_as_stds():
    three = nvrtc.channel_norm([0.485, 0.456, 0.406], np.array([0.229, 0.224, 0.225]))
    assert three.dtype == np.float32 and three[3] == 1 and three[7] == 1
    with pytest.raises(ValueError, match="the same length, 1 to 4; got 2, 1"):
        nvrtc.channel_norm((0.1, 0.2), (1.0,))
    with pytest.raises(ValueError, match="got 0, 0"):
        nvrtc.channel_norm((), ())


# --------------------------------------------------------------------------- the array API


class Dev:
    """Anything with __cuda_array_interface__ (here over no memory at all)."""

    def __init__(self, shape, typestr="<f4", ptr=0x1000, strides=None) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (ptr, False), "strides": strides,
            "version": 3,
        }  # fmt: skip


def test_array_api_refuses_host_arrays():
    with pytest.raises(TypeError, match="kernels.reference"):
        nvrtc.lung_bbox(np.zeros((1, 4, 4), np.float32), 0.5, 0.0)


@pytest.mark.parametrize(
    ("masks", "words"),
    [
        (Dev((4, 4)), r"masks must have 3 dimensions, got shape \(4, 4\)"),
        (Dev((1, 4, 4), "<f8"), "masks must be float32, got float64"),
        (
            Dev((1, 4, 4), strides=(64, 4, 16)),
            r"masks must be C-contiguous, got strides \(64, 4, 16\)",
        ),
    ],
)
def test_array_api_checks_each_array(launches, masks, words):
    with pytest.raises(ValueError, match=words):
        nvrtc.lung_bbox(masks, 0.0, 0.0, boxes=Dev((1, 4)), fraction=Dev((1,)))
    assert launches == []


def test_array_api_checks_the_output_shapes(launches):
    with pytest.raises(ValueError, match=r"boxes must be \(2, 4\) and fraction \(2,\)"):
        nvrtc.lung_bbox(Dev((2, 4, 4)), 0.0, 0.0, boxes=Dev((3, 4)), fraction=Dev((2,)))
    with pytest.raises(ValueError, match=r"need images \(N, H, W\) and boxes \(N, 4\)"):
        nvrtc.crop_resize_normalize(Dev((2, 8, 8)), Dev((2, 5)), (4, 4), (0.5,), (0.25,))
    with pytest.raises(ValueError, match=r"out must be \(2, 3, 4, 4\), got \(2, 1, 4, 4\)"):
        nvrtc.crop_resize_normalize(
            Dev((2, 8, 8)), Dev((2, 4)), (4, 4), (0.5,) * 3, (0.25,) * 3, out=Dev((2, 1, 4, 4))
        )
    assert launches == []


def test_array_api_hands_the_pointers_on(launches):
    boxes, frac = Dev((2, 4), ptr=0x2000), Dev((2,), ptr=0x3000, strides=(4,))
    got = nvrtc.lung_bbox(Dev((2, 6, 5), ptr=0x1000), 0.0, 0.1, boxes=boxes, fraction=frac,
                          stream=SimpleNamespace(handle=55))  # fmt: skip
    assert got == (boxes, frac)
    assert launches[1][3][:3] == [0x1000, 6, 5] and launches[1][4] == 55
    out = Dev((2, 1, 4, 3), ptr=0x4000)
    assert (
        nvrtc.crop_resize_normalize(Dev((2, 8, 8)), boxes, (4, 3), (0.5,), (0.25,), out=out) is out
    )
    assert launches[-1][3][8] == 0x4000 and launches[-1][4] == 0  # default stream


@pytest.mark.parametrize(
    ("stream", "handle"),
    [
        (None, 0),
        (17, 17),
        (SimpleNamespace(ptr=5), 5),
        (SimpleNamespace(handle=6), 6),
        (np.int64(8), 8),
    ],
)
def test_stream_handles(stream, handle):
    assert nvrtc._stream_handle(stream, like=np.zeros(1)) == handle


def test_c_strides():
    assert nvrtc._c_strides((2, 3, 4), 4) == (48, 16, 4)
    assert nvrtc._c_strides((5,), 4) == (4,)


# --------------------------------------------------------------------------- on a GPU


def upload(a: np.ndarray) -> nvrtc.DeviceArray:
    a = np.ascontiguousarray(a, np.float32)
    d = nvrtc.DeviceArray(a.shape)
    rt = nvrtc.bindings().runtime
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    nvrtc.check(
        rt.cudaMemcpy(d.__cuda_array_interface__["data"][0], a.ctypes.data, a.nbytes, kind),
        "cudaMemcpy",
    )
    return d


@pytest.mark.gpu
@requires_gpu
def test_device_arrays_run_the_kernels_without_cupy():
    rng = np.random.default_rng(3)
    masks = (rng.normal(0, 1, (5, 37, 41)) + np.linspace(-2, 2, 41)).astype(np.float32)
    images = rng.uniform(0, 1, (5, 53, 61)).astype(np.float32)
    d_masks = upload(masks)
    assert d_masks.nbytes == masks.nbytes and d_masks.__cuda_array_interface__["shape"] == (
        5,
        37,
        41,
    )
    np.testing.assert_array_equal(d_masks.get(), masks)
    boxes, frac = nvrtc.lung_bbox(d_masks, 0.0, 0.05)
    assert isinstance(boxes, nvrtc.DeviceArray) and isinstance(frac, nvrtc.DeviceArray)
    nvrtc.check(nvrtc.bindings().runtime.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
    want_boxes, want_frac = ref.lung_bbox(masks, 0.0, 0.05)
    np.testing.assert_array_equal(boxes.get(), want_boxes)
    np.testing.assert_array_equal(frac.get(), want_frac)
    out = nvrtc.crop_resize_normalize(upload(images), boxes, (32, 24), (0.5,), (0.25,))
    nvrtc.check(nvrtc.bindings().runtime.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
    want = ref.crop_resize_normalize(images, want_boxes, (32, 24), (0.5,), (0.25,))
    assert out.shape == want.shape
    assert float(np.max(np.abs(out.get() - want))) <= 1e-5


@pytest.mark.gpu
@requires_gpu
def test_kernel_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_KERNEL_CACHE", str(tmp_path))
    from engine.runtime.cuda import device_info

    nvrtc.cached_image("lung_bbox.cu", device_info(0).sm)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("lung_bbox-")
    mtime = files[0].stat().st_mtime_ns
    nvrtc.cached_image("lung_bbox.cu", device_info(0).sm)
    assert files[0].stat().st_mtime_ns == mtime
