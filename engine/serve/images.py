"""Source images for the case view: read from where the run recorded them, rendered for a browser.

Only the `source`/`member` of a row in the run's Parquet is ever opened (the web API takes keys,
never paths), and the bytes must still hash to the row's `sha256`: a file replaced since the
screening is refused rather than shown beside predictions that are not its own. Before the whole
file or member is read, it gets the checks `cxr screen` made: its size within the byte limit,
and its first bytes still the header the run recorded (format, width, height), within the run's
--max-pixels; so a source swapped for a zip bomb costs a header read, not an inflation.

Rendering: PNG and JPEG are decoded with Pillow; 16-bit images are stretched min..max to 8 bits
(a browser cannot show 16-bit PNG faithfully). DICOM goes through the reader of `cxr screen`
(engine/io/reader.py `to_sample`: `decode_dicom`, with the Modality LUT, VOI LUT or window,
MONOCHROME1 inversion: what was screened) and is stretched the same way. No orientation tag is applied: the lung mask and box were computed on
the pixels as stored, and must line up with what is shown.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np

from engine.errors import ImageError
from engine.io.archive import DEFAULT_MAX_FILE_BYTES as DEFAULT_MAX_BYTES
from engine.io.files import NotRegularFile, open_regular
from engine.io.probe import DEFAULT_MAX_PIXELS, check_limits, probe, sniff_format
from engine.io.reader import to_sample

# Read first and checked against the row before the rest: holds the PNG and JPEG headers of
# ordinary files and most DICOM headers. Where a header runs longer, the whole file is read and
# render_png checks it.
HEAD_BYTES = 64 << 10
_READ_ERRORS = (OSError, tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError)
_CHANGED = (
    "the file at the recorded location has changed since it was screened ({}); "
    "it is not shown beside predictions that are not its own"
)


class Unavailable(Exception):
    """The recorded image cannot be shown; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def read_recorded(
    row: dict[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> bytes:
    """The bytes of the image a row was screened from, checked against its sha256.

    Call it only for rows the run screened (status "ok"): what the run refused is not read again.
    """
    source, member, expected = row.get("source"), row.get("member"), row.get("sha256")
    if not source or not expected:
        raise Unavailable("this row has no readable image (the engine could not read it either)")
    try:
        with _open_recorded(source, member, max_bytes) as stream:
            head = stream.read(HEAD_BYTES)
            _check_header(head, row, max_pixels)
            data = head + stream.read(max_bytes + 1 - len(head))
    except Unavailable:
        raise
    except _READ_ERRORS as exc:
        raise Unavailable(f"cannot read the recorded image: {exc}", 404) from None
    if len(data) > max_bytes:  # a file that grew past the limit since it was stat'ed
        raise Unavailable(f"the recorded file is larger than {max_bytes} bytes", 413)
    if hashlib.sha256(data).hexdigest() != expected:
        raise Unavailable(_CHANGED.format("sha256 differs"), 409)
    return data


def _check_header(head: bytes, row: dict[str, Any], max_pixels: int) -> None:
    """Refuse, from its first bytes, a file that is no longer the image the row describes or
    that asks for more pixels than the run allowed."""
    recorded = row.get("format")
    if recorded and sniff_format(head) != recorded:
        raise Unavailable(_CHANGED.format(f"it is no longer a {recorded} file"), 409)
    try:
        info = probe(head)
    except ImageError:
        return  # the header runs past HEAD_BYTES (or is damaged): render_png checks it whole
    size = (row.get("width"), row.get("height"))
    if recorded and size != (info.width, info.height):
        raise Unavailable(_CHANGED.format(f"its header says {info.width}x{info.height}"), 409)
    try:
        check_limits(info, max_pixels=max_pixels, min_side=1)
    except ImageError as exc:
        raise Unavailable(f"cannot render the image: {exc}", 422) from None


@contextmanager
def _open_recorded(source: str, member: str | None, max_bytes: int) -> Iterator[IO[bytes]]:
    """A stream of the recorded file or archive member, refused where `cxr screen` refuses."""
    try:
        f = open_regular(source)  # a FIFO put at the recorded path would block a server thread
    except NotRegularFile:
        raise Unavailable("the recorded source is not a regular file") from None
    with f:
        if member is None:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise Unavailable(f"the recorded file is larger than {max_bytes} bytes", 413)
            yield f
        else:
            with _open_member(f, source, member, max_bytes) as stream:
                yield stream


@contextmanager
def _open_member(f: IO[bytes], source: str, member: str, max_bytes: int) -> Iterator[IO[bytes]]:
    """A stream of `member` of the archive open as `f` (zip by its name, else any tar)."""
    if source.lower().endswith(".zip"):
        with zipfile.ZipFile(f) as z:
            try:
                zinfo = z.getinfo(member)
            except KeyError:
                raise Unavailable("the member is no longer in the recorded archive") from None
            if zinfo.is_dir() or stat.S_ISLNK(zinfo.external_attr >> 16) or zinfo.flag_bits & 0x1:
                raise Unavailable("the member is not a readable regular file")
            if zinfo.file_size > max_bytes:
                raise Unavailable(f"the member is larger than {max_bytes} bytes", 413)
            with z.open(zinfo) as stream:
                yield stream
        return
    # one sequential pass, as the screening read it (a .tar.gz cannot be seeked in)
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.name != member:
                tar.members.clear()  # type: ignore[attr-defined]  # keep memory flat
                continue
            if not info.isreg():
                raise Unavailable("the member is not a regular file")
            if info.size > max_bytes:
                raise Unavailable(f"the member is larger than {max_bytes} bytes", 413)
            extracted = tar.extractfile(info)
            if extracted is None:
                raise Unavailable("the member has no data")
            yield extracted
            return
    raise Unavailable("the member is no longer in the recorded archive")


def render_png(data: bytes, *, max_pixels: int) -> bytes:
    """Encoded image -> 8-bit grayscale (or RGB) PNG a browser shows as the engine saw it."""
    try:
        info = probe(data)
        check_limits(info, max_pixels=max_pixels, min_side=1)
        sample = to_sample(data, info)  # DICOM decoded as screened; anything else to Pillow
        if sample.pixels is not None:
            return _png(_stretch(sample.pixels))
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
