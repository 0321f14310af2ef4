"""Build a realistic benchmark archive from the real dev CXRs.

Each output image is one real CXR (cycled through in sorted order), upscaled to a long side
drawn from --long-side (default 2048-3000 px, the size of a digital radiograph), then lightly
perturbed so that no two files are byte-identical: a few source pixels of shift (a crop of the
source box), an intensity gain and offset, and Gaussian noise. Everything is seeded per image
((seed, index) -> the same file on every run and any number of workers).

Formats (assigned round-robin over the images):
  jpeg   8-bit baseline JPEG (quality --jpeg-quality)
  png16  16-bit grayscale PNG holding 12-bit data (0..4095), as many archives store CR/DX
  dicom  uncompressed DICOM, Explicit VR Little Endian, 12 bits stored in 16 allocated, Rescale
         Slope/Intercept and a Window Center/Width; MONOCHROME2 and MONOCHROME1 alternate
         (MONOCHROME1 stores the inverted values, so both display the same picture)

Layout: OUT/<format>/<index // 1000>/<source-stem>-<index>.<ext>, plus OUT/archive.json (the
parameters and counts; `cxr screen` ignores it) and, with --tar, one uncompressed tar of it all.

    python -m benchmarks.make_archive --out /tmp/bench-2000 --count 2000 --formats jpeg
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # `python benchmarks/make_archive.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cores, default_data_dir

FORMATS = ("jpeg", "png16", "dicom")
EXTENSIONS = {"jpeg": ".jpg", "png16": ".png", "dicom": ".dcm"}
MAX_SHIFT = 4  # source pixels cut from each side at most (a few pixels of shift)
BITS_STORED = 12
RESCALE_INTERCEPT = -1024.0


@dataclass(frozen=True)
class ArchiveSpec:
    out: str
    count: int
    formats: tuple[str, ...] = ("jpeg",)
    long_side: tuple[int, int] = (2048, 3000)
    seed: int = 0
    jpeg_quality: int = 90
    png_compress_level: int = 1  # zlib level; 6 (Pillow's default) makes no difference to decode
    source: str = ""


@lru_cache(maxsize=512)
def _source(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise_pool(seed: int, size: int) -> np.ndarray:
    """One pool of N(0, 1) float32 per worker; an image takes a random window of it.

    Drawing 7 million fresh normals per image costs more than the rest of the work; windows at
    random offsets of one seeded pool are different for every image and just as deterministic.
    """
    key = (seed, size)
    if key not in _NOISE:
        _NOISE.clear()
        _NOISE[key] = np.random.default_rng([seed, 0xC0FFEE]).standard_normal(size, np.float32)
    return _NOISE[key]


def perturbed(src: np.ndarray, spec: ArchiveSpec, index: int) -> np.ndarray:
    """Float32 image on the 0..255 scale, upscaled and perturbed; deterministic in (seed, index)."""
    rng = np.random.default_rng([spec.seed, index])
    h, w = src.shape
    long_side = int(rng.integers(spec.long_side[0], spec.long_side[1] + 1))
    scale = long_side / max(h, w)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    shift = min(MAX_SHIFT, max(0, min(h, w) // 8))
    x0, y0, x1, y1 = (float(v) for v in rng.integers(0, shift + 1, size=4))
    box = (x0, y0, w - x1, h - y1)
    gain = float(rng.uniform(0.92, 1.08))
    offset = float(rng.uniform(-6.0, 6.0))
    sigma = float(rng.uniform(0.5, 2.0))
    # Gain and offset commute with the (linear) resize: apply them to the small source.
    small = Image.fromarray(src.astype(np.float32) * gain + offset, mode="F")
    big = np.asarray(small.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))
    pool = _noise_pool(spec.seed, 2 * spec.long_side[1] ** 2)
    start = int(rng.integers(0, pool.size - big.size + 1))
    a = np.multiply(pool[start : start + big.size].reshape(big.shape), sigma)
    a += big
    np.clip(a, 0.0, 255.0, out=a)
    return a


def write_jpeg(a: np.ndarray, path: Path, quality: int) -> None:
    Image.fromarray(np.rint(a).astype(np.uint8)).save(path, "JPEG", quality=quality)


def to_12bit(a: np.ndarray) -> np.ndarray:
    return np.rint(a * ((2**BITS_STORED - 1) / 255.0)).astype(np.uint16)


def write_png16(a: np.ndarray, path: Path, level: int) -> None:
    Image.fromarray(to_12bit(a)).save(path, "PNG", compress_level=level)


def write_dicom(a: np.ndarray, path: Path, index: int, seed: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    monochrome1 = index % 2 == 1
    v = to_12bit(a)
    stored = (2**BITS_STORED - 1) - v if monochrome1 else v
    # The window spans the 1st..99th percentile of the modality values (+10%), as a modality
    # would set it for display; it clips a little of both tails.
    lo, hi = np.percentile(stored[::8, ::8], [1, 99]) + RESCALE_INTERCEPT
    center, width = (lo + hi) / 2, max(1.0, (hi - lo) * 1.1)
    uid = lambda part: generate_uid(entropy_srcs=[str(seed), str(index), part])  # noqa: E731

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientID = f"BENCH{index // 3:07d}"
    ds.Modality = "DX" if index % 4 < 2 else "CR"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.PixelData = np.ascontiguousarray(stored, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


_JOB: tuple[ArchiveSpec, list[str]] | None = None  # set in each worker by _init_worker


def _init_worker(spec: ArchiveSpec, sources: list[str]) -> None:
    global _JOB
    _JOB = (spec, sources)


def _make_index(index: int) -> tuple[str, int]:
    assert _JOB is not None
    return make_one(_JOB[0], _JOB[1], index)


def make_one(spec: ArchiveSpec, sources: list[str], index: int) -> tuple[str, int]:
    fmt = spec.formats[index % len(spec.formats)]
    src_path = sources[index % len(sources)]
    a = perturbed(_source(src_path), spec, index)
    rel = Path(fmt) / f"{index // 1000:03d}" / f"{Path(src_path).stem}-{index:06d}{EXTENSIONS[fmt]}"
    path = Path(spec.out) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jpeg":
        write_jpeg(a, path, spec.jpeg_quality)
    elif fmt == "png16":
        write_png16(a, path, spec.png_compress_level)
    else:
        write_dicom(a, path, index, spec.seed)
    return str(rel), path.stat().st_size


def source_images(source: Path) -> list[str]:
    paths = sorted(
        str(p) for p in Path(source).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    if not paths:
        raise SystemExit(f"no PNG/JPEG source images in {source}")
    return paths


def write_labels(
    out: Path, results: list[tuple[str, int]], sources: list[str], labels: Path
) -> int:
    """OUT/labels.csv: each output image with the label row of the source image it was made from
    (`path` relative to OUT), so an archive of the labelled dev images can be scored and checked
    for agreement (benchmarks/quality.py). Returns the number of labelled images."""
    import csv

    labels = Path(labels)
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        by_file = {(labels.parent / r["path"]).resolve(): r for r in reader}
    rows = []
    for index, (rel, _) in enumerate(results):
        row = by_file.get(Path(sources[index % len(sources)]).resolve())
        if row is not None:
            rows.append(row | {"path": rel})
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def make_archive(
    spec: ArchiveSpec,
    *,
    workers: int | None = None,
    tar: Path | None = None,
    labels: Path | None = None,
) -> dict[str, Any]:
    """Write the archive; returns the summary also written to OUT/archive.json."""
    for fmt in spec.formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if spec.count < 1:
        raise ValueError("--count must be at least 1")
    if not 0 < spec.long_side[0] <= spec.long_side[1]:
        raise ValueError(f"bad --long-side {spec.long_side}")
    sources = source_images(Path(spec.source))
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or cores(), spec.count))
    t0 = time.perf_counter()
    if workers == 1:
        results = [make_one(spec, sources, i) for i in range(spec.count)]
    else:
        # fork: the workers inherit the imports (call with workers=1 from a process that has
        # started threads, e.g. one that ran DALI or ONNX Runtime)
        with get_context("fork").Pool(workers, _init_worker, (spec, sources)) as pool:
            results = list(pool.imap(_make_index, range(spec.count), chunksize=4))
    seconds = time.perf_counter() - t0
    counts = {fmt: 0 for fmt in spec.formats}
    for rel, _ in results:
        counts[Path(rel).parts[0]] += 1
    summary = {
        "spec": {**asdict(spec), "formats": list(spec.formats), "long_side": list(spec.long_side)},
        "counts": counts,
        "bytes": int(sum(size for _, size in results)),
        "seconds": round(seconds, 2),
        "workers": workers,
        "sources": len(sources),
    }
    if labels is not None:
        summary["labelled"] = write_labels(out, results, sources, labels)
    (out / "archive.json").write_text(json.dumps(summary, indent=2) + "\n")
    if tar is not None:
        with tarfile.open(tar, "w") as tf:
            for rel, _ in sorted(results):
                tf.add(out / rel, arcname=rel)
        summary["tar"] = str(tar)
    return summary


def _long_side(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    p.add_argument("--count", type=int, default=2000, help="number of images (100 to 100000)")
    p.add_argument("--formats", default="jpeg", help="comma list of jpeg,png16,dicom (round-robin)")
    p.add_argument(
        "--long-side", type=_long_side, default=(2048, 3000), help="px range, e.g. 2048-3000"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--png-compress-level", type=int, default=1)
    p.add_argument("--source", type=Path, default=default_data_dir() / "images")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--tar", type=Path, default=None, help="also write this uncompressed tar")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="labels CSV of the source images (path relative to it): write OUT/labels.csv",
    )
    a = p.parse_args(argv)
    spec = ArchiveSpec(
        out=str(a.out),
        count=a.count,
        formats=tuple(f.strip() for f in a.formats.split(",") if f.strip()),
        long_side=a.long_side,
        seed=a.seed,
        jpeg_quality=a.jpeg_quality,
        png_compress_level=a.png_compress_level,
        source=str(a.source),
    )
    summary = make_archive(spec, workers=a.workers, tar=a.tar, labels=a.labels)
    mb = summary["bytes"] / 1e6
    print(
        f"{spec.count} images {summary['counts']} -> {a.out} ({mb:.0f} MB) in "
        f"{summary['seconds']:.1f} s with {summary['workers']} workers"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
