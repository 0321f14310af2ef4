"""Regenerate kernel_fixtures.npz: small real masks and images that travel with the repository.

The GPU kernel tests (tests/test_kernels_gpu.py) and benchmarks/gpu_check.sh run on machines
where only the repository is present, so they cannot read ../shared/data. This script (run
where ../shared/data and Pillow exist) stores:

- ``masks``: 64 real lung masks (V7 Labs, CC BY 4.0; ../shared/data/lung-masks, the first 64
  rows of index.csv), resized to 128 x 128 (bilinear, threshold at 128), bit-packed;
- ``images``: the five example CXRs of examples/ (see examples/ATTRIBUTION.md), resized to
  191 x 209 (odd on purpose), uint8.

    python tests/data/make_kernel_fixtures.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MASKS = REPO.parent / "shared" / "data" / "lung-masks"
MASK_HW = (128, 128)
IMAGE_HW = (191, 209)


def main() -> None:
    with open(MASKS / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:64]
    masks = []
    for row in rows:
        m = Image.open(MASKS / row["mask_path"]).convert("L")
        m = m.resize(MASK_HW[::-1], Image.BILINEAR)
        masks.append(np.asarray(m) >= 128)
    images = []
    for path in sorted((REPO / "examples").glob("*.*")):
        if path.suffix.lower() not in (".png", ".jpg"):
            continue
        im = Image.open(path).convert("L").resize(IMAGE_HW[::-1], Image.BILINEAR)
        images.append(np.asarray(im, np.uint8))
    np.savez_compressed(
        HERE / "kernel_fixtures.npz",
        masks=np.packbits(np.stack(masks), axis=-1),
        mask_hw=np.array(MASK_HW),
        images=np.stack(images),
        mask_sources=np.array([r["mask_path"] for r in rows]),
    )


if __name__ == "__main__":
    main()
