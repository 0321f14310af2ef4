"""The CUDA kernels (kernels/*.cu) against their NumPy specification (kernels/reference.py).

Three levels, so that most of it runs without a GPU:

- NVRTC compiles both sources for real architectures (needs cuda-python's NVRTC, no GPU);
- host emulation: the same .cu files compiled with g++ and run thread by thread on the CPU
  (tests/kernel_host_emulation.cpp), compared bit for bit with the reference (needs g++);
- on the GPU (marked ``gpu``; needs a GPU, cuda-python and CuPy): the NVRTC kernels launched
  through kernels.nvrtc, on real lung masks and real CXRs, odd sizes, empty and full masks,
  batch 1 and 64.

Tolerances: boxes and fractions exact (integer reductions, then the same float64 steps and
one rounding); crops max abs difference <= 1e-5 (the kernels are compiled with --fmad=false
and do the reference's float32 steps in its order, so they are expected to be exact too).

kernels.nvrtc's own plumbing (compile targets, the kernel cache, argument packing, the array
API's checks) is tested in test_kernels_nvrtc.py.

Imports only numpy, pytest, kernels.reference and kernels.nvrtc (which needs cuda-python only
when called), so ``python -m pytest tests/test_kernels_gpu.py`` works on a GPU machine that has
nothing of this repository's dependencies but numpy, CuPy and cuda-python.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gpu_utils import cupy_reason, nvrtc_reason, requires_cupy

from kernels import nvrtc
from kernels import reference as ref

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "data" / "kernel_fixtures.npz"
CROP_ATOL = 1e-5
SEED = 7
MARGIN = 0.05


# --------------------------------------------------------------------------- real data


def real_masks() -> np.ndarray:
    """64 real lung masks, (64, 128, 128) bool."""
    data = np.load(FIXTURES)
    h, w = (int(v) for v in data["mask_hw"])
    return np.unpackbits(data["masks"], axis=-1)[..., :w].astype(bool).reshape(-1, h, w)


def real_images() -> np.ndarray:
    """5 real CXRs, (5, 191, 209) float32 in [0, 1]."""
    return np.load(FIXTURES)["images"].astype(np.float32) / 255.0


def resize_nearest(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    n, h, w = masks.shape
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return masks[:, rows][:, :, cols]


def as_logits(masks: np.ndarray, seed: int = SEED) -> np.ndarray:
    """A segmenter-like score map: +-3 logits with noise, so the threshold cuts real speckle."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.2, masks.shape)
    return ((masks.astype(np.float32) * 6.0 - 3.0) + noise).astype(np.float32)


def bbox_cases() -> list[tuple[str, np.ndarray, float]]:
    """(name, masks (N, h, w) float32, threshold): real masks at odd sizes, edge cases."""
    masks = real_masks()
    cases = [
        ("real-64-128x128", as_logits(masks), 0.0),
        ("real-64-97x131", as_logits(resize_nearest(masks, (97, 131))), 0.0),
        ("real-64-256x256", as_logits(resize_nearest(masks, (256, 256))), 0.0),
        ("real-64-61x67-p0.3", as_logits(resize_nearest(masks, (61, 67))), math.log(0.3 / 0.7)),
        ("real-1-255x257", as_logits(resize_nearest(masks[:1], (255, 257))), 0.0),
        ("binary-64", masks.astype(np.float32), 0.5),
    ]
    edge = np.zeros((8, 37, 53), np.float32)
    edge[1] = 1.0  # full
    edge[2, 0, 0] = 1.0  # corners
    edge[3, 36, 52] = 1.0
    edge[4, 5:9, 0] = 1.0  # touching the left edge: the margin is clipped
    edge[5, 12, 20:30] = 0.5  # exactly at the threshold: foreground
    edge[6, 12, 20] = np.nextafter(np.float32(0.5), np.float32(0))  # just below: background
    edge[7, :, :] = np.nan  # never foreground
    edge[7, 3, 4] = 1.0
    cases += [
        ("edge-cases", edge, 0.5),
        ("empty-64", np.zeros((64, 33, 35), np.float32), 0.5),
        ("full-64", np.ones((64, 33, 35), np.float32), 0.5),
        ("empty-1", np.zeros((1, 1, 1), np.float32), 0.5),
        ("full-1x1", np.ones((1, 1, 1), np.float32), 0.5),
        ("threshold--inf", as_logits(masks[:4]), -math.inf),
        ("threshold-+inf", as_logits(masks[:4]), math.inf),
        ("threshold-not-float32", as_logits(masks[:8]), 0.10000000149011613),
    ]
    return cases


def crop_cases() -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, int], tuple, tuple]]:
    """(name, images, boxes, out_hw, mean, std) with real boxes from real masks."""
    rng = np.random.default_rng(SEED)
    imgs = real_images()
    work = np.tile(imgs, (13, 1, 1))[:64]  # 64 real images, 191 x 209
    masks = resize_nearest(real_masks(), work.shape[1:])
    real_boxes, _ = ref.lung_bbox(as_logits(masks), 0.0, MARGIN)
    # the classifier's 512 x 512 work image, upsampled from the real ones by the reference
    big = ref.crop_resize_normalize(
        imgs, np.tile(np.float32(ref.FULL_BOX), (5, 1)), (512, 512), (0.0,), (1.0,)
    )[:, 0]
    odd = rng.uniform(0, 1, (64, 4)).astype(np.float32)
    odd = np.concatenate(
        [np.minimum(odd[:, :2], odd[:, 2:]), np.maximum(odd[:, :2], odd[:, 2:])], 1
    )
    odd[:, 2:] = np.maximum(odd[:, 2:], odd[:, :2] + 1e-3)
    tiny = np.tile(np.float32([[0.5, 0.5, 0.5 + 1e-4, 0.5 + 1e-4]]), (4, 1))  # sub-pixel box
    full = np.tile(np.float32(ref.FULL_BOX), (64, 1))
    gray = ((0.5,), (0.25,))
    rgb = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return [
        ("real-64-224", work, real_boxes, (224, 224), *gray),
        ("real-64-odd-out", work, real_boxes, (37, 53), *gray),
        ("real-64-rgb", work, real_boxes, (64, 64), *rgb),
        ("random-boxes-64", work, odd, (224, 224), *gray),
        ("full-boxes-64", work, full, (97, 101), *gray),
        ("real-1-512", big[:1], real_boxes[:1], (224, 224), *gray),
        ("upsample-512", big, real_boxes[:5], (224, 224), *rgb),
        ("sub-pixel-box", work[:4], tiny, (16, 16), *gray),
        ("1x1-output", work[:3], real_boxes[:3], (1, 1), *gray),
    ]


# --------------------------------------------------------------------------- NVRTC (no GPU)


@pytest.mark.parametrize("source", ["lung_bbox.cu", "crop_resize_normalize.cu"])
def test_nvrtc_compiles_the_kernels(source):
    reason = nvrtc_reason()
    if reason:
        pytest.skip(reason)
    text = (nvrtc.KERNEL_DIR / source).read_text()
    for sm in (75, 80, 90):
        arch, kind = nvrtc.compile_target(sm, nvrtc.supported_archs())
        image = nvrtc.compile_source(text, source, arch, kind)
        assert len(image) > 1000
    ptx = nvrtc.compile_source(text, source, "compute_80", "ptx").decode(errors="replace")
    assert "fma." not in ptx  # --fmad=false: no contracted multiply-adds, as in NumPy
    for name in nvrtc._kernel_names(source):
        assert f".entry {name}(" in ptx


# --------------------------------------------------------------------------- host emulation


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the host emulation of the kernels needs it")
    lib = tmp_path_factory.mktemp("kernels") / "host_kernels.so"
    cmd = [
        gxx,
        "-O1",
        "-ffp-contract=off",  # as --fmad=false on the device
        "-fno-strict-aliasing",  # the box buffers are reinterpreted as int statistics
        "-shared",
        "-fPIC",
        "-I",
        str(nvrtc.KERNEL_DIR),
        str(Path(__file__).with_name("kernel_host_emulation.cpp")),
        "-o",
        str(lib),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def _p(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def host_lung_bbox(lib, masks: np.ndarray, threshold: float, margin: float):
    masks = np.ascontiguousarray(masks, np.float32)
    n, h, w = masks.shape
    boxes = np.full((n, 4), np.nan, np.float32)
    fraction = np.full((n,), np.nan, np.float32)
    rows_grid, blocks_x = nvrtc.bbox_grid(n, h, w)
    lib.host_lung_bbox(
        _p(masks), n, h, w, ctypes.c_float(nvrtc.bbox_threshold(threshold)),
        ctypes.c_double(margin), _p(boxes), _p(fraction), rows_grid, nvrtc.BLOCK, blocks_x,
    )  # fmt: skip
    return boxes, fraction


def host_crop(lib, images, boxes, out_hw, mean, std):
    images = np.ascontiguousarray(images, np.float32)
    boxes = np.ascontiguousarray(boxes, np.float32)
    n, height, width = images.shape
    oh, ow = out_hw
    norm = nvrtc.channel_norm(mean, std)
    out = np.full((n, len(mean), oh, ow), np.nan, np.float32)
    lib.host_crop_resize_normalize(
        _p(images), n, height, width, _p(boxes), oh, ow, len(mean), _p(norm), _p(out), nvrtc.TILE
    )
    return out


@pytest.mark.parametrize("case", bbox_cases(), ids=lambda c: c[0])
def test_host_emulated_lung_bbox_is_exact(host_kernels, case):
    _, masks, threshold = case
    want_boxes, want_frac = ref.lung_bbox(masks, threshold, MARGIN)
    boxes, frac = host_lung_bbox(host_kernels, masks, threshold, MARGIN)
    np.testing.assert_array_equal(boxes, want_boxes)
    np.testing.assert_array_equal(frac, want_frac)


@pytest.mark.parametrize("case", crop_cases(), ids=lambda c: c[0])
def test_host_emulated_crop_matches(host_kernels, case):
    _, images, boxes, out_hw, mean, std = case
    want = ref.crop_resize_normalize(images, boxes, out_hw, mean, std)
    got = host_crop(host_kernels, images, boxes, out_hw, mean, std)
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= CROP_ATOL


# --------------------------------------------------------------------------- on the GPU


@pytest.fixture(scope="module")
def cp():
    if cupy_reason():
        pytest.skip(cupy_reason())
    import cupy

    return cupy


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("case", bbox_cases(), ids=lambda c: c[0])
def test_gpu_lung_bbox_is_exact(cp, case):
    _, masks, threshold = case
    want_boxes, want_frac = ref.lung_bbox(masks, threshold, MARGIN)
    boxes, frac = nvrtc.lung_bbox(cp.asarray(masks), threshold, MARGIN)
    np.testing.assert_array_equal(cp.asnumpy(boxes), want_boxes)
    np.testing.assert_array_equal(cp.asnumpy(frac), want_frac)


@pytest.mark.gpu
@requires_cupy
@pytest.mark.parametrize("case", crop_cases(), ids=lambda c: c[0])
def test_gpu_crop_matches(cp, case):
    _, images, boxes, out_hw, mean, std = case
    want = ref.crop_resize_normalize(images, boxes, out_hw, mean, std)
    got = cp.asnumpy(
        nvrtc.crop_resize_normalize(cp.asarray(images), cp.asarray(boxes), out_hw, mean, std)
    )
    assert got.shape == want.shape
    assert float(np.max(np.abs(got - want))) <= CROP_ATOL


@pytest.mark.gpu
@requires_cupy
def test_gpu_kernels_chain_on_device_and_respect_the_stream(cp):
    """mask -> box -> crop without leaving the device, on a non-default stream, raw pointers."""
    masks = as_logits(resize_nearest(real_masks(), (191, 209)))
    work = np.tile(real_images(), (13, 1, 1))[:64]
    want_boxes, _ = ref.lung_bbox(masks, 0.0, MARGIN)
    want = ref.crop_resize_normalize(work, want_boxes, (224, 224), (0.5,), (0.25,))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        d_masks, d_work = cp.asarray(masks), cp.asarray(work)
        boxes = cp.empty((64, 4), cp.float32)
        frac = cp.empty((64,), cp.float32)
        out = cp.empty((64, 1, 224, 224), cp.float32)
        n, h, w = masks.shape
        nvrtc.lung_bbox_ptr(
            d_masks.data.ptr, n, h, w, 0.0, MARGIN, boxes.data.ptr, frac.data.ptr, stream.ptr
        )
        nvrtc.crop_resize_normalize_ptr(
            d_work.data.ptr, 64, 191, 209, boxes.data.ptr, (224, 224), (0.5,), (0.25,), out.data.ptr, stream.ptr
        )  # fmt: skip
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(boxes), want_boxes)
    assert float(np.max(np.abs(cp.asnumpy(out) - want))) <= CROP_ATOL


@pytest.mark.gpu
@requires_cupy
def test_gpu_without_cupy_outputs(cp):
    """Inputs exposing only __cuda_array_interface__ get DeviceArray outputs (no CuPy needed)."""

    class Foreign:
        def __init__(self, a):
            self._a = a
            self.__cuda_array_interface__ = a.__cuda_array_interface__

    masks = as_logits(real_masks()[:3])
    boxes, frac = nvrtc.lung_bbox(Foreign(cp.asarray(masks)), 0.0, MARGIN)
    assert isinstance(boxes, nvrtc.DeviceArray)
    want_boxes, want_frac = ref.lung_bbox(masks, 0.0, MARGIN)
    np.testing.assert_array_equal(boxes.get(), want_boxes)
    np.testing.assert_array_equal(frac.get(), want_frac)
