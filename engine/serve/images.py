"""Source images for the case view: read from where the run recorded them, rendered for a browser.

Only the `source`/`member` of a row in the run's Parquet is ever opened (the web API takes keys,
never paths), and the bytes must still hash to the row's `sha256`: a file replaced since the
screening is refused rather than shown beside predictions that are not its own.

Rendering: PNG and JPEG are decoded with Pillow; 16-bit images are stretched min..max to 8 bits
(a browser cannot show 16-bit PNG faithfully). DICOM goes through the engine's own
`decode_dicom` (Modality LUT, VOI LUT or window, MONOCHROME1 inversion: what was screened) and is
stretched the same way. No orientation tag is applied: the lung mask and box were computed on
the pixels as stored, and must line up with what is shown.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from typing import Any

import numpy as np

from engine.errors import ImageError
from engine.io.dicom import decode_dicom
from engine.io.probe import check_limits, probe

DEFAULT_MAX_BYTES = 1 << 30  # as engine.io.archive.DEFAULT_MAX_FILE_BYTES


class Unavailable(Exception):
    """The recorded image cannot be shown; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def read_recorded(row: dict[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of the image a row was screened from, checked against its sha256."""
    source, member, expected = row.get("source"), row.get("member"), row.get("sha256")
    if not source or not expected:
        raise Unavailable("this row has no readable image (the engine could not read it either)")
    try:
        data = (
            _read_file(source, max_bytes)
            if member is None
            else _read_member(source, member, max_bytes)
        )
    except Unavailable:
        raise
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise Unavailable(f"cannot read the recorded image: {exc}", 404) from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise Unavailable(
            "the file at the recorded location has changed since it was screened "
            "(sha256 differs); it is not shown beside predictions that are not its own",
            409,
        )
    return data


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Unavailable("the recorded source is not a regular file")
        if st.st_size > max_bytes:
            raise Unavailable(f"the recorded file is larger than {max_bytes} bytes", 413)
        return f.read(max_bytes + 1)


def _read_member(archive: str, member: str, max_bytes: int) -> bytes:
    if archive.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            try:
                zinfo = z.getinfo(member)
            except KeyError:
                raise Unavailable("the member is no longer in the recorded archive") from None
            if zinfo.is_dir() or stat.S_ISLNK(zinfo.external_attr >> 16) or zinfo.flag_bits & 0x1:
                raise Unavailable("the member is not a readable regular file")
            if zinfo.file_size > max_bytes:
                raise Unavailable(f"the member is larger than {max_bytes} bytes", 413)
            return z.read(zinfo)
    # one sequential pass, as the screening read it (a .tar.gz cannot be seeked in)
    with tarfile.open(archive, mode="r|*") as tar:
        for info in tar:
            if info.name != member:
                tar.members.clear()  # type: ignore[attr-defined]  # keep memory flat
                continue
            if not info.isreg():
                raise Unavailable("the member is not a regular file")
            if info.size > max_bytes:
                raise Unavailable(f"the member is larger than {max_bytes} bytes", 413)
            stream = tar.extractfile(info)
            if stream is None:
                raise Unavailable("the member has no data")
            return stream.read()
    raise Unavailable("the member is no longer in the recorded archive")


def render_png(data: bytes, *, max_pixels: int) -> bytes:
    """Encoded image -> 8-bit grayscale (or RGB) PNG a browser shows as the engine saw it."""
    try:
        info = probe(data)
        check_limits(info, max_pixels=max_pixels, min_side=1)
        if info.format == "dicom":
            pixels = _stretch(decode_dicom(data).pixels)
            return _png(pixels)
        return _render_pillow(data)
    except ImageError as exc:
        raise Unavailable(f"cannot render the image: {exc}", 422) from None


def _render_pillow(data: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit gray
                return _png(_stretch(np.asarray(im)))
            if im.mode in ("L", "RGB"):
                return _png_image(im)
            return _png_image(
                im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
            )
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise Unavailable(f"cannot decode the image: {exc}", 422) from None


def _stretch(pixels: np.ndarray) -> np.ndarray:
    """Min..max onto 0..255 (a constant image becomes black)."""
    a = np.asarray(pixels, np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    return _png_image(Image.fromarray(gray, "L"))


def _png_image(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # local transfer: speed over size
    return buf.getvalue()


def mask_overlay(mask_png: bytes, rgba: tuple[int, int, int, int] = (0, 220, 120, 110)) -> bytes:
    """The 1-bit lung mask -> an RGBA PNG: colour where lung, transparent elsewhere.

    It stays at the segmenter's resolution; the page stretches it over the image (the mask is in
    the square work frame, which maps onto the source by scaling each axis).
    """
    from PIL import Image

    with Image.open(io.BytesIO(mask_png)) as im:
        lung = np.asarray(im.convert("L")) > 0
    out = np.zeros((*lung.shape, 4), np.uint8)
    out[lung] = rgba
    buf = io.BytesIO()
    Image.fromarray(out, "RGBA").save(buf, format="PNG")
    return buf.getvalue()
