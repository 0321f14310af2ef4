"""Lung box + crop kernels at batch 64: NVRTC/CUDA (kernels/nvrtc.py) vs the NumPy reference.

Runs on a GPU machine with numpy, CuPy and cuda-python only (nothing else of this repo's
dependencies). Real data: the lung masks and CXRs of tests/data/kernel_fixtures.npz, scaled to
the full models' sizes (segmenter mask 256 x 256, work image 512 x 512, classifier crop
224 x 224). Reports, in the same run, per-batch latency (p50/p99) and images/s of

- ``numpy``: kernels.reference on the host (the CPU path; the baseline);
- ``cuda_kernels``: both kernels on device-resident data (what the GPU pipeline does);
- ``cuda_with_copies``: host -> device, both kernels, device -> host (a drop-in replacement
  for the reference on host arrays);

with the speed-up over NumPy and the parity (boxes exact, crop max abs difference) beside the
speed. Writes one JSON object (to --out, else $OUT/kernels_gpu.json, else
benchmarks/results/kernels_gpu-<time>.json) and prints it.

    python benchmarks/kernels_gpu.py [--batch 64] [--iters 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import nvrtc  # noqa: E402
from kernels import reference as ref  # noqa: E402

FIXTURES = REPO / "tests" / "data" / "kernel_fixtures.npz"
MASK_HW = (256, 256)
WORK = 512
CROP = (224, 224)
MARGIN = 0.05
THRESHOLD = 0.0  # logit of p = 0.5
MEAN, STD = (0.5,), (0.25,)


def inputs(batch: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FIXTURES)
    h, w = (int(v) for v in data["mask_hw"])
    masks = np.unpackbits(data["masks"], axis=-1)[..., :w].astype(bool).reshape(-1, h, w)
    masks = np.resize(masks, (batch, h, w))
    rows = (np.arange(MASK_HW[0]) * h) // MASK_HW[0]
    cols = (np.arange(MASK_HW[1]) * w) // MASK_HW[1]
    masks = masks[:, rows][:, :, cols]
    noise = np.random.default_rng(0).normal(0, 1.2, masks.shape)
    logits = (masks * 6.0 - 3.0 + noise).astype(np.float32)
    images = data["images"].astype(np.float32) / 255.0
    full = np.tile(np.float32(ref.FULL_BOX), (len(images), 1))
    work = ref.crop_resize_normalize(images, full, (WORK, WORK), (0.0,), (1.0,))[:, 0]
    return logits, np.resize(work, (batch, WORK, WORK)).astype(np.float32)


def summarise(seconds: list[float], batch: int) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "images_per_s": float(batch / np.median(seconds)),
    }


def time_it(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import cupy as cp

    from engine.runtime.cuda import device_info

    masks, work = inputs(args.batch)

    def numpy_path():
        boxes, _ = ref.lung_bbox(masks, THRESHOLD, MARGIN)
        return ref.crop_resize_normalize(work, boxes, CROP, MEAN, STD)

    d_masks, d_work = cp.asarray(masks), cp.asarray(work)
    d_boxes = cp.empty((args.batch, 4), cp.float32)
    d_frac = cp.empty((args.batch,), cp.float32)
    d_out = cp.empty((args.batch, 1, *CROP), cp.float32)
    stream = cp.cuda.get_current_stream()

    def device_path():
        nvrtc.lung_bbox(d_masks, THRESHOLD, MARGIN, boxes=d_boxes, fraction=d_frac)
        nvrtc.crop_resize_normalize(d_work, d_boxes, CROP, MEAN, STD, out=d_out)
        stream.synchronize()

    def with_copies():
        m, w = cp.asarray(masks), cp.asarray(work)
        b, _ = nvrtc.lung_bbox(m, THRESHOLD, MARGIN)
        return cp.asnumpy(nvrtc.crop_resize_normalize(w, b, CROP, MEAN, STD))

    t0 = time.perf_counter()
    device_path()  # first call: NVRTC compile (or disk cache) + module load
    first_call_s = time.perf_counter() - t0

    want_boxes, want_frac = ref.lung_bbox(masks, THRESHOLD, MARGIN)
    want = ref.crop_resize_normalize(work, want_boxes, CROP, MEAN, STD)
    got_boxes, got_frac = cp.asnumpy(d_boxes), cp.asnumpy(d_frac)
    crop_diff = float(np.abs(cp.asnumpy(d_out) - want).max())
    parity = {
        "boxes_exact": bool(np.array_equal(got_boxes, want_boxes)),
        "fraction_exact": bool(np.array_equal(got_frac, want_frac)),
        "crop_max_abs_diff": crop_diff,
        "crop_tolerance": 1e-5,
    }
    # edge cases at batch 1 and 64: empty and full masks
    for name, m in (
        ("empty_64", np.zeros((64, 37, 53), np.float32)),
        ("full_64", np.ones((64, 37, 53), np.float32)),
        ("real_1", masks[:1]),
    ):
        b, f = nvrtc.lung_bbox(cp.asarray(m), 0.5 if name != "real_1" else THRESHOLD, MARGIN)
        rb, rf = ref.lung_bbox(m, 0.5 if name != "real_1" else THRESHOLD, MARGIN)
        parity[f"{name}_exact"] = bool(
            np.array_equal(cp.asnumpy(b), rb) and np.array_equal(cp.asnumpy(f), rf)
        )

    numpy_t = time_it(numpy_path, 1, max(3, args.iters // 10))
    device_t = time_it(device_path, 5, args.iters)
    copies_t = time_it(with_copies, 3, args.iters)
    result = {
        "benchmark": "kernels_gpu",
        "gpu": device_info(0).name,
        "host": platform.node(),
        "batch": args.batch,
        "shapes": {"mask": list(MASK_HW), "work": [WORK, WORK], "crop": list(CROP)},
        "first_call_s": first_call_s,
        "numpy": summarise(numpy_t, args.batch),
        "cuda_kernels": summarise(device_t, args.batch),
        "cuda_with_copies": summarise(copies_t, args.batch),
        "parity": parity,
    }
    base = result["numpy"]["p50_ms"]
    result["speedup_vs_numpy"] = {
        "cuda_kernels": base / result["cuda_kernels"]["p50_ms"],
        "cuda_with_copies": base / result["cuda_with_copies"]["p50_ms"],
    }
    ok = all(v for k, v in parity.items() if k.endswith("exact")) and crop_diff <= 1e-5
    result["parity_ok"] = ok
    out = args.out
    if out is None:
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"]) / "kernels_gpu.json"
        else:
            out = REPO / "benchmarks" / "results" / f"kernels_gpu-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
