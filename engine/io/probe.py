"""Cheap format sniffing and header parsing, before any decoder sees the bytes.

`probe` reads only the image header (PNG IHDR, the JPEG frame header, the DICOM dataset up to
Pixel Data) and never decodes pixels, so `check_limits` can refuse a decompression bomb or a
degenerate image at the cost of a few hundred bytes of parsing.

Formats are recognised by content, never by file name:

* PNG: the 8-byte PNG signature.
* JPEG: ``FF D8 FF`` (SOI followed by the first marker).
* DICOM: ``DICM`` at offset 128, i.e. a DICOM Part 10 file with its 128-byte preamble. A bare
  dataset without preamble and ``DICM`` prefix (some old or non-conformant writers produce
  them) is not supported: it is reported as an unknown format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

from engine.errors import ImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Refuse images with more pixels than this (width x height): a decompression-bomb guard.

A 10000 x 10000 image is already larger than any chest radiograph (detector panels are about
3000 x 3000); a hostile 40 kB PNG can claim 40000 x 40000 and ask a decoder for 1.6 GB per
channel. Overridable with ``--max-pixels``.
"""

DEFAULT_MIN_SIDE = 32
"""Refuse images whose shorter side is below this many pixels (icons, thumbnails, placeholders)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says about an image, before any pixel is decoded.

    ``bit_depth`` is bits per sample: 1, 2, 4, 8 or 16 for PNG (8 for palette PNG: the depth of
    the RGB samples the palette expands to), the sample precision for JPEG (8, or 12 for
    extended JPEG; 2..16 for lossless JPEG), Bits Stored for DICOM.

    ``channels``: 1 gray, 2 gray+alpha, 3 RGB (or YCbCr JPEG), 4 RGBA (CMYK/YCCK for a 4-component
    JPEG). A palette PNG reports 3: it expands to RGB (a tRNS chunk could add alpha; probe does
    not look past IHDR). DICOM reports Samples per Pixel, and the size of one frame (only the
    first frame of a multi-frame DICOM is decoded).
    """

    format: str
    width: int
    height: int
    bit_depth: int
    channels: int


def sniff_format(data: bytes) -> str | None:
    """Return "png", "jpeg" or "dicom" from the leading bytes, or None if unrecognised."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    return None


def probe(data: bytes) -> ImageInfo:
    """Parse the header of a PNG, JPEG or DICOM file held in memory; raise ImageError if bad."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt == "png":
        return _probe_png(data)
    if fmt == "jpeg":
        return _probe_jpeg(data)
    if fmt == "dicom":
        return _probe_dicom(data)
    hint = ""
    if data[:2] in (b"\x02\x00", b"\x08\x00"):
        # Looks like a DICOM tag of group 0002 or 0008 at offset 0: a bare dataset.
        hint = (
            "; if this is a DICOM dataset without the 128-byte preamble and 'DICM' prefix,"
            " it is not supported: rewrite it as a DICOM Part 10 file"
        )
    raise ImageError(f"not a PNG, JPEG or DICOM file (first bytes: {data[:8]!r}){hint}")


def check_limits(info: ImageInfo, *, max_pixels: int, min_side: int) -> None:
    """Refuse images above `max_pixels` (decompression bombs) or below `min_side` on a side."""
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageError(
            f"image is {info.width}x{info.height} = {pixels} pixels, "
            f"above the limit of {max_pixels} (--max-pixels)"
        )
    if min(info.width, info.height) < min_side:
        raise ImageError(
            f"image is {info.width}x{info.height}, smaller than the minimum side of {min_side} px"
        )


# --- PNG ---------------------------------------------------------------------------------------

# colour type -> (channels, allowed bit depths), PNG spec table 11.1
_PNG_COLOUR_TYPES: dict[int, tuple[int, frozenset[int]]] = {
    0: (1, frozenset({1, 2, 4, 8, 16})),  # greyscale
    2: (3, frozenset({8, 16})),  # truecolour
    3: (3, frozenset({1, 2, 4, 8})),  # indexed: expands to RGB
    4: (2, frozenset({8, 16})),  # greyscale + alpha
    6: (4, frozenset({8, 16})),  # truecolour + alpha
}
_PNG_MAX_SIDE = 2**31 - 1
# signature (8) + chunk length (4) + "IHDR" (4) + IHDR data (13) + CRC (4)
_PNG_HEADER_LEN = 33


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < _PNG_HEADER_LEN:
        raise ImageError(
            f"truncated PNG header: {len(data)} bytes, the signature and IHDR chunk "
            f"need {_PNG_HEADER_LEN}"
        )
    length, ctype = struct.unpack_from(">I4s", data, 8)
    if ctype != b"IHDR":
        raise ImageError(f"corrupt PNG: first chunk is {ctype!r}, expected b'IHDR'")
    if length != 13:
        raise ImageError(f"corrupt PNG: IHDR chunk length is {length}, expected 13")
    width, height, depth, colour, compression, filter_method, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16
    )
    # The CRC is not checked: a damaged header that still parses to sane values is left for
    # the decoder to reject, and probe stays free of zlib.
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise ImageError(f"corrupt PNG: IHDR size is {width}x{height}")
    if colour not in _PNG_COLOUR_TYPES:
        raise ImageError(f"corrupt PNG: unknown colour type {colour}")
    channels, depths = _PNG_COLOUR_TYPES[colour]
    if depth not in depths:
        raise ImageError(f"corrupt PNG: bit depth {depth} is not valid for colour type {colour}")
    if compression != 0 or filter_method != 0 or interlace not in (0, 1):
        raise ImageError(
            "corrupt PNG: unknown compression/filter/interlace method "
            f"({compression}/{filter_method}/{interlace})"
        )
    bit_depth = 8 if colour == 3 else depth
    return ImageInfo("png", width, height, bit_depth, channels)


# --- JPEG --------------------------------------------------------------------------------------

# SOF0..SOF15 are C0..CF, except C4 (DHT), C8 (JPG, reserved) and CC (DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7, SOI, EOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA


def _truncated_jpeg(data: bytes, what: str) -> ImageError:
    return ImageError(
        f"truncated JPEG header: the file ends at byte {len(data)} inside {what}, "
        "before the frame header (SOF)"
    )


def _probe_jpeg(data: bytes) -> ImageInfo:
    """Walk the marker segments after SOI up to the first frame header (SOFn)."""
    n = len(data)
    pos = 2  # past SOI
    while True:
        # Like libjpeg, skip bytes that are not 0xFF between segments, then any number of
        # 0xFF fill bytes before the marker code.
        while pos < n and data[pos] != 0xFF:
            pos += 1
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise _truncated_jpeg(data, "a marker")
        marker = data[pos]
        pos += 1
        if marker == 0x00:
            # FF00 is a stuffed byte inside entropy-coded data, never a marker.
            raise ImageError(f"corrupt JPEG header: stuffed byte FF00 at byte {pos - 2}")
        if marker in _JPEG_STANDALONE:
            continue
        if marker == _JPEG_EOI:
            raise ImageError("corrupt JPEG: end of image (EOI) before any frame header (SOF)")
        if marker == _JPEG_SOS:
            raise ImageError("corrupt JPEG: scan (SOS) before any frame header (SOF)")
        if pos + 2 > n:
            raise _truncated_jpeg(data, f"the length of marker FF{marker:02X}")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageError(f"corrupt JPEG header: marker FF{marker:02X} has length {length}")
        if marker in _JPEG_SOF:
            # length(2) precision(1) height(2) width(2) components(1)
            if pos + 8 > n:
                raise _truncated_jpeg(data, f"the frame header (SOF{marker - 0xC0})")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            if width == 0:
                raise ImageError("corrupt JPEG: frame header gives width 0")
            if height == 0:
                # Legal JPEG (height defined later by a DNL marker) but unknowable from the
                # header, so the bomb guard cannot vouch for it; real encoders never do this.
                raise ImageError("unsupported JPEG: height 0 in the frame header (DNL marker)")
            if components == 0 or precision == 0:
                raise ImageError(
                    f"corrupt JPEG: frame header gives {components} components of {precision} bits"
                )
            return ImageInfo("jpeg", width, height, precision, components)
        pos += length
        if pos > n:
            raise _truncated_jpeg(data, f"marker segment FF{marker:02X}")


# --- DICOM -------------------------------------------------------------------------------------


def _probe_dicom(data: bytes) -> ImageInfo:
    # Imported here: pydicom is only needed when a DICOM actually turns up.
    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        rows = ds.get("Rows")
        columns = ds.get("Columns")
        bits_stored = ds.get("BitsStored") or ds.get("BitsAllocated")
        samples = ds.get("SamplesPerPixel") or 1
    except MemoryError:
        raise
    except Exception as exc:
        # pydicom raises a zoo of types on damaged input (InvalidDicomError, ValueError,
        # KeyError, struct.error, ...); all of them mean this one file is bad.
        raise ImageError(f"corrupt DICOM header: {type(exc).__name__}: {exc}") from exc
    if not rows or not columns:
        raise ImageError(
            "DICOM has no image size (Rows/Columns missing or 0): not an image, "
            "or the file is truncated"
        )
    if not bits_stored:
        raise ImageError("DICOM has no Bits Stored / Bits Allocated")
    return ImageInfo("dicom", int(columns), int(rows), int(bits_stored), int(samples))
