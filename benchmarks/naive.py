"""The naive baseline: what a researcher would write to screen a folder with the same models.

A plain loop, one image at a time: open with Pillow (pydicom for DICOM), preprocess with NumPy
and Pillow (gray, resize to the work size, min-max, resize to the segmenter size, normalise),
run the FP32 segmenter in ONNX Runtime, take the lung box from the mask, crop with
kernels.reference.crop_resize_normalize (a crop per box transform when the classifier has
test-time crops, as its manifest says), run the FP32 classifier, sigmoid of the mean logit. No
batching, no overlap of decoding and inference, no Parquet or index; it only collects the
numbers.

It computes the same numbers as the engine (tests/test_benchmarks.py checks the probabilities),
so the speed ratio compares equal work. The one convention a researcher would not know and that
is copied here from the engine is DALI's border handling in the resize (edge replication; see
engine/pipeline_pil.py): without it the outer ring of the work image differs by up to 0.15, which
moves some lung boxes. It costs well under 1% of the loop's time.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.models import ModelSet
from engine.stages.classify import tta_mean
from engine.stages.crop import classifier_crops


@dataclass
class NaiveResult:
    names: list[str] = field(default_factory=list)
    prob: list[float] = field(default_factory=list)
    embedding: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per image, decode to probability
    errors: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0  # the timed loop, file reading included
    cpu_s: float = 0.0  # CPU time of this process (all threads) over the timed loop

    @property
    def images_per_s(self) -> float:
        return len(self.names) / self.wall_s if self.wall_s > 0 else 0.0


def iter_files(archive: Path | list[Path], limit: int | None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the first `limit` images of a directory tree, a file list or a tar."""
    from benchmarks.common import IMAGE_SUFFIXES, list_images

    if isinstance(archive, list):
        for path in archive[:limit]:
            yield str(path), Path(path).read_bytes()
        return
    archive = Path(archive)
    if archive.is_file() and tarfile.is_tarfile(archive):
        n = 0
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                if limit is not None and n >= limit:
                    return
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    f = tf.extractfile(member)
                    if f is not None:
                        n += 1
                        yield member.name, f.read()
        return
    for path in list_images(archive, limit):
        yield str(path), path.read_bytes()


def load_gray(data: bytes) -> np.ndarray:
    """float32 (H, W) gray; any linear scale (min-max comes later)."""
    if data[128:132] == b"DICM":
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(io.BytesIO(data))
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        return arr
    im = Image.open(io.BytesIO(data))
    if im.mode.startswith("I;16") or im.mode == "I":
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im.convert("L"), dtype=np.float32)


def resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's antialiased bilinear resize of a float image, edge pixels replicated."""
    h, w = a.shape
    oh, ow = size
    pad = math.ceil(max(h / oh, w / ow)) + 2
    padded = Image.fromarray(np.pad(a, pad, mode="edge"))
    out = padded.resize((ow, oh), Image.Resampling.BILINEAR, box=(pad, pad, pad + w, pad + h))
    return np.asarray(out, dtype=np.float32)


def lung_box(mask_prob: np.ndarray, threshold: float, margin: float) -> np.ndarray:
    """Normalised (x0, y0, x1, y1) of the pixels >= threshold, grown by margin; full if none."""
    h, w = mask_prob.shape
    ys, xs = np.nonzero(mask_prob >= threshold)
    if len(ys) == 0:
        return np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    box = [(x0 - mx) / w, (y0 - my) / h, (x1 + mx) / w, (y1 + my) / h]
    return np.clip(np.array(box, np.float32), 0.0, 1.0)


class NaiveScreener:
    def __init__(self, models: ModelSet, *, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.models = models
        self.seg = ort.InferenceSession(str(models.segmenter.onnx_path), opts)
        self.clf = ort.InferenceSession(str(models.classifier.onnx_path), opts)

    def screen_one(self, data: bytes) -> tuple[float, np.ndarray]:
        seg_m, clf_m = self.models.segmenter, self.models.classifier
        assert clf_m.crop is not None
        gray = load_gray(data)
        side = clf_m.crop.source_size
        work = resize(gray, (side, side))
        work = (work - work.min()) / max(float(work.max() - work.min()), 1e-6)
        seg_in = (resize(work, seg_m.preprocess.size) - seg_m.preprocess.mean[0]) / (
            seg_m.preprocess.std[0]
        )
        (mask_logit,) = self.seg.run(
            None, {seg_m.input.name: seg_in[None, None].astype(np.float32)}
        )
        mask_prob = 1.0 / (1.0 + np.exp(-mask_logit[0, 0].astype(np.float64)))
        box = lung_box(mask_prob, seg_m.threshold, clf_m.crop.margin)
        # one crop, or one per box transform of a classifier with test-time crops (tta)
        x = classifier_crops(work[None], box[None], clf_m)
        logit, embedding = self.clf.run(["logit", "embedding"], {clf_m.input.name: x})
        prob, emb = tta_mean(logit, embedding, clf_m)
        return float(prob[0]), emb[0]


def run_naive(
    models: ModelSet,
    archive: Path | list[Path],
    *,
    limit: int | None,
    threads: int,
    warmup: int = 2,
) -> NaiveResult:
    """Screen the first `limit` images, after an untimed pass over the first `warmup`."""
    screener = NaiveScreener(models, threads=threads)
    for _, data in iter_files(archive, warmup):
        try:
            screener.screen_one(data)
        except Exception:  # noqa: BLE001, S112 - a bad warm-up file is reported below
            continue
    result = NaiveResult()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for name, data in iter_files(archive, limit):
        t = time.perf_counter()
        try:
            prob, emb = screener.screen_one(data)
        except Exception as exc:  # noqa: BLE001 - the baseline, like a script, skips bad files
            result.errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        result.seconds.append(time.perf_counter() - t)
        result.names.append(name)
        result.prob.append(prob)
        result.embedding.append(emb)
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = _cpu_seconds() - c0
    return result


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
