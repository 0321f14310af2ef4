"""A Pillow/NumPy CPU preprocessor with the interface and the numbers of engine.pipeline.

Same steps as the DALI graph, per image, on a thread pool (Pillow releases the GIL while it
decodes and resizes):

    encoded PNG/JPEG --Pillow decode (gray)--+
                                             +--> float --resize(S x S)--> intensity normalise
    DICOM pixels (uint16, from pydicom) -----+        --> work [0, 1] --resize(seg)--> (x-mean)/std

Conventions matched to DALI (so that the two agree to float rounding on 8-bit and 16-bit
gray images; measured in tests/test_pipeline_pil.py):

- 8-bit sources are on the 0..65535 scale (x 257), 16-bit ones as stored;
- resize is Pillow's antialiased BILINEAR (a triangle filter widened by the scale factor when
  downscaling, plain bilinear when upscaling), as DALI's linear resize with antialias;
- at the border DALI clamps the filter to the edge pixel where Pillow renormalises it over the
  pixels inside, so the source is padded by edge replication (a few pixels, on the integer
  image before the float conversion) and the original box is resized;
- EXIF orientation is applied, as DALI's decoder does by default.

``draft=k`` (k >= 1) additionally lets libjpeg scale huge JPEGs down while decoding (DCT
scaling by 1/2, 1/4 or 1/8, never below k times the work size), which skips most of the IDCT
and of the resize; the result is close to, not equal to, the full decode (k = 1 more so than
k = 2, mostly a different min/max stretch; how close: docs/measurements.md, bounds in
tests/test_pipeline_pil.py). ``draft=0`` (the default) decodes fully. PNG and DICOM are
unaffected.

Colour images go through Pillow's "L" conversion, which rounds where DALI truncates: one 8-bit
level apart (the tolerance tests/test_pipeline.py states for the same case).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from engine.errors import ConfigError, ImageError
from engine.models import ModelSet
from engine.pipeline import UINT16_MAX, DeviceBatch, Preprocessed, Sample, assemble, decode_one

_SCALE_8BIT = 257.0  # 255 * 257 = 65535: the same 0..65535 scale as 16-bit sources


class PilPreprocessor:
    """Drop-in for engine.pipeline.Preprocessor (an ImagePreprocessor), without DALI."""

    # run_one is thread-safe (per-call Pillow images, read-only settings) and costs per image
    # what run does: the screening loop decodes images in its reader threads (engine/screening.py)
    per_image = True

    def __init__(
        self,
        models: ModelSet,
        *,
        device: str = "cpu",
        batch_size: int,
        threads: int,
        draft: int = 0,
    ) -> None:
        if device != "cpu":
            raise ConfigError(f"the Pillow preprocessor runs on the CPU only, not {device!r}")
        clf = models.classifier
        if clf.crop is None:
            raise ConfigError("classifier manifest has no crop section")
        self.device = device
        self.batch_size = batch_size
        self.draft = draft
        self.side = clf.crop.source_size
        self.intensity = clf.preprocess.intensity
        seg = models.segmenter.preprocess
        self.seg_size = seg.size
        self.seg_mean = np.float32(seg.mean[0])
        self.seg_std = np.float32(seg.std[0])
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cxr-pil")

    def run(self, samples: Sequence[Sample]) -> Preprocessed:
        if not samples:
            raise ValueError("empty batch")
        if len(samples) > self.batch_size:
            raise ValueError(f"batch of {len(samples)} exceeds the pipeline's {self.batch_size}")
        return assemble(list(self._pool.map(partial(decode_one, self), samples)))

    def run_device(
        self, samples: Sequence[Sample], *, cuda_stream: int | None = None
    ) -> DeviceBatch | Preprocessed:
        raise ConfigError("run_device needs DALI on the GPU; the Pillow preprocessor is CPU only")

    def run_one(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Work image (S, S) and segmenter input (1, h, w) of one sample; ImageError if bad."""
        gray, extent = self._decode(sample)
        work = resize_edge(gray, (self.side, self.side), extent)
        if self.intensity == "minmax":
            lo, hi = float(work.min()), float(work.max())
            work = (work - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6))
        else:
            work = work * np.float32(1.0 / UINT16_MAX)
        seg = resize_edge(work, self.seg_size)
        seg -= self.seg_mean
        seg /= self.seg_std
        return work.astype(np.float32, copy=False), seg[None]

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _decode(self, sample: Sample) -> tuple[np.ndarray, tuple[float, float] | None]:
        """uint8 or uint16 (H, W) gray (8-bit values still on their own scale), and the
        image's extent in those pixels when a draft decode left a partly covered last row or
        column (else None)."""
        if sample.pixels is not None:
            pixels = np.asarray(sample.pixels)
            return pixels.reshape(pixels.shape[:2]).astype(np.uint16, copy=False), None
        if sample.encoded is None:
            raise ValueError("a Sample needs encoded bytes or pixels")
        from PIL import Image, ImageOps

        try:
            im = Image.open(io.BytesIO(sample.encoded.tobytes()))
            turned = im.getexif().get(0x0112, 1) != 1  # EXIF orientation, as DALI applies it
            extent = None
            if self.draft > 0 and im.format == "JPEG" and not turned:
                # libjpeg picks the largest 1/2^k scale that keeps both sides >= the request
                want = self.draft * self.side
                drafted = im.draft("L", (want, want))
                if drafted is not None:
                    extent = drafted[1][2:]
            im.load()
            if turned:
                im = ImageOps.exif_transpose(im)  # type: ignore[assignment]  # Image, not ImageFile
            return _gray_array(im), extent
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageError(
                f"cannot decode: the file is truncated or corrupt ({type(exc).__name__}: {exc})"
            ) from None


def _gray_array(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16, copy=False)
    if im.mode == "I":  # 32-bit integer PNGs: values on the 16-bit scale
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im)


def resize_edge(
    a: np.ndarray, out_hw: tuple[int, int], extent: tuple[float, float] | None = None
) -> np.ndarray:
    """Antialiased bilinear resize with DALI's border convention; float32 on a's scale.

    uint8 input comes back multiplied by 257 (the 16-bit scale); uint16 and float as they are.
    ``extent`` (width, height) is the part of ``a`` that holds the image, in (fractional)
    pixels of ``a``: a JPEG of width W decoded at 1/s has ceil(W / s) columns, the last one
    only partly covered.
    """
    from PIL import Image

    h, w = a.shape
    oh, ow = out_hw
    pad = math.ceil(max(h / oh, w / ow)) + 2  # the widened filter reaches `scale` pixels out
    padded = np.pad(a, pad, mode="edge")
    if padded.dtype in (np.uint8, np.uint16):  # Pillow modes "L" and "I;16"
        src = Image.fromarray(padded).convert("F")
    else:
        src = Image.fromarray(padded.astype(np.float32, copy=False))
    ew, eh = extent if extent is not None else (w, h)
    out = src.resize((ow, oh), Image.Resampling.BILINEAR, box=(pad, pad, pad + ew, pad + eh))
    arr = np.array(out, np.float32)  # writable: callers normalise in place
    if a.dtype == np.uint8:
        arr = arr * np.float32(_SCALE_8BIT)
    return arr
