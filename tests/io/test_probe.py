"""engine.io.probe on PNG and JPEG bytes (DICOM probing is covered in test_dicom.py)."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import DEV_IMAGES
from PIL import Image

from engine.errors import ImageError
from engine.io.probe import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageInfo,
    check_limits,
    probe,
    sniff_format,
)

PNG_SIG = b"\x89PNG\r\n\x1a\n"
W, H = 37, 23  # not square, so a width/height swap shows


def png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **params)
    return buf.getvalue()


def png_header(width: int, height: int, depth: int = 8, colour: int = 0, length: int = 13) -> bytes:
    """Signature + IHDR chunk only, crafted by hand (no image data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return PNG_SIG + struct.pack(">I", length) + chunk + struct.pack(">I", zlib.crc32(chunk))


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def sof(marker: int = 0xC0, width: int = 640, height: int = 480, precision: int = 8, nf: int = 1):
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(nf))
    return segment(marker, struct.pack(">BHHB", precision, height, width, nf) + comps)


def rng_image(mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (H, W), dtype=np.uint16))
    shapes = {"L": (H, W), "LA": (H, W, 2), "RGB": (H, W, 3), "RGBA": (H, W, 4)}
    if mode in shapes:
        return Image.fromarray(rng.integers(0, 256, shapes[mode], dtype=np.uint8))
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=200
        )
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (H, W), dtype=np.uint8) * 255).convert("1")
    raise ValueError(mode)


# --- sniffing ------------------------------------------------------------------------------


def test_sniff_by_magic():
    assert sniff_format(PNG_SIG + b"rest") == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff_format(b"\0" * 128 + b"DICM" + b"rest") == "dicom"
    assert sniff_format(b"") is None
    assert sniff_format(b"\xff\xd8") is None
    assert sniff_format(b"DICM" + b"\0" * 200) is None
    assert sniff_format(b"GIF89a" + b"\0" * 200) is None


def test_empty_file():
    with pytest.raises(ImageError, match=re.escape("empty file (0 bytes)")):
        probe(b"")


def test_text_content_shows_first_bytes_escaped():
    with pytest.raises(ImageError) as err:
        probe(b"hello, world\n this is text")
    assert str(err.value) == "not a PNG, JPEG or DICOM file (first bytes: b'hello, w')"
    with pytest.raises(ImageError, match=re.escape(r"(first bytes: b'\x00\x01\xfe\xff\n')")):
        probe(b"\x00\x01\xfe\xff\n")


# --- PNG -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "bit_depth", "channels"),
    [
        ("L", 8, 1),
        ("I;16", 16, 1),
        ("RGB", 8, 3),
        ("RGBA", 8, 4),
        ("P", 8, 3),  # palette expands to 8-bit RGB
        ("LA", 8, 2),
        ("1", 1, 1),
    ],
)
def test_png_from_pillow(mode, bit_depth, channels, tmp_path):
    img = rng_image(mode)
    assert img.mode == mode
    path = tmp_path / f"img-{mode.replace(';', '')}.png"
    path.write_bytes(png_bytes(img))
    data = path.read_bytes()
    assert sniff_format(data) == "png"
    assert probe(data) == ImageInfo("png", W, H, bit_depth, channels)
    with Image.open(path) as back:  # Pillow agrees on the size
        assert back.size == (W, H)


def test_low_depth_palette_png_still_reports_8_bit_rgb():
    img = Image.new("P", (W, H))
    img.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])  # 3 colours: Pillow writes 2-bit indices
    data = png_bytes(img)
    assert data[24] == 2 and data[25] == 3  # IHDR bit depth 2, colour type 3
    assert probe(data) == ImageInfo("png", W, H, 8, 3)


@pytest.mark.parametrize(
    ("colour", "depth", "channels", "bit_depth"),
    [
        (0, 1, 1, 1),
        (0, 2, 1, 2),
        (0, 4, 1, 4),
        (0, 16, 1, 16),
        (2, 16, 3, 16),
        (3, 4, 3, 8),
        (4, 16, 2, 16),
        (6, 16, 4, 16),
    ],
)
def test_png_header_by_hand(colour, depth, channels, bit_depth):
    assert probe(png_header(300, 200, depth, colour)) == ImageInfo(
        "png", 300, 200, bit_depth, channels
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (png_header(0, 10), "IHDR size is 0x10"),
        (png_header(10, 0), "IHDR size is 10x0"),
        (png_header(2**31, 10), "IHDR size is 2147483648x10"),
        (png_header(10, 10, depth=16, colour=3), "bit depth 16 is not valid for colour type 3"),
        (png_header(10, 10, depth=4, colour=2), "bit depth 4 is not valid for colour type 2"),
        (png_header(10, 10, colour=5), "unknown colour type 5"),
        (png_header(10, 10, length=12), "IHDR chunk length is 12, expected 13"),
        (PNG_SIG + png_header(10, 10)[8:12] + b"IDAT" + b"\0" * 17, "first chunk is b'IDAT'"),
        (png_header(10, 10)[:28] + b"\x02" + png_header(10, 10)[29:], "interlace"),
    ],
)
def test_png_corrupt_header(data, message):
    with pytest.raises(ImageError, match=re.escape(message)):
        probe(data)


@pytest.mark.parametrize("cut", [8, 9, 12, 16, 20, 28, 29, 32])
def test_png_truncated(cut):
    data = png_bytes(rng_image("L"))
    with pytest.raises(ImageError, match=re.escape(f"truncated PNG header: {cut} bytes")):
        probe(data[:cut])


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_png_cut_inside_signature_is_unknown(cut):
    data = png_bytes(rng_image("L"))
    with pytest.raises(ImageError, match="not a PNG, JPEG or DICOM file"):
        probe(data[:cut])


# --- limits --------------------------------------------------------------------------------


def test_decompression_bomb_header_refused():
    data = png_header(40000, 40000)
    assert len(data) == 33
    info = probe(data)
    assert info == ImageInfo("png", 40000, 40000, 8, 1)
    expected = (
        "image is 40000x40000 = 1600000000 pixels, above the limit of 100000000 (--max-pixels)"
    )
    with pytest.raises(ImageError) as err:
        check_limits(info, max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
    assert str(err.value) == expected


def test_one_pixel_image_refused():
    info = probe(png_bytes(Image.new("L", (1, 1))))
    assert info == ImageInfo("png", 1, 1, 8, 1)
    with pytest.raises(ImageError) as err:
        check_limits(info, max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
    assert str(err.value) == "image is 1x1, smaller than the minimum side of 32 px"


def test_limits_are_inclusive_bounds():
    check_limits(ImageInfo("png", 100, 100, 8, 1), max_pixels=10_000, min_side=100)
    with pytest.raises(ImageError, match="above the limit of 9999"):
        check_limits(ImageInfo("png", 100, 100, 8, 1), max_pixels=9_999, min_side=1)
    with pytest.raises(ImageError, match=re.escape("image is 31x500, smaller")):
        check_limits(ImageInfo("jpeg", 31, 500, 8, 1), max_pixels=10**9, min_side=32)
    with pytest.raises(ImageError, match=re.escape("image is 500x31, smaller")):
        check_limits(ImageInfo("jpeg", 500, 31, 8, 1), max_pixels=10**9, min_side=32)
    check_limits(ImageInfo("dicom", 32, 32, 12, 1), max_pixels=1024, min_side=32)


def test_default_limits():
    assert DEFAULT_MAX_PIXELS == 100_000_000
    assert DEFAULT_MIN_SIDE == 32


# --- JPEG ----------------------------------------------------------------------------------


def real_jpegs(n: int = 6) -> list[Path]:
    paths = sorted(DEV_IMAGES.glob("*.jpg"))[:n]
    if not paths:
        pytest.skip(f"no JPEGs under {DEV_IMAGES}")
    return paths


def test_real_jpegs_match_pillow():
    for path in real_jpegs():
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            expected = ImageInfo("jpeg", img.width, img.height, 8, len(img.getbands()))
        assert probe(data) == expected, path.name


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_reencoded_real_jpeg(mode, progressive, tmp_path):
    with Image.open(real_jpegs(1)[0]) as src:
        img = src.convert(mode)
    path = tmp_path / f"x-{mode}-{progressive}.jpg"
    path.write_bytes(jpeg_bytes(img, progressive=progressive))
    data = path.read_bytes()
    sof_marker = b"\xff\xc2" if progressive else b"\xff\xc0"
    assert sof_marker in data
    assert sniff_format(data) == "jpeg"
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    assert probe(data) == ImageInfo("jpeg", img.width, img.height, 8, channels)


def _sof_offset(data: bytes) -> int:
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        if (pos := data.find(marker)) > 0:
            return pos
    raise AssertionError("no SOF0/SOF2")


def test_jpeg_with_exif_and_comment_before_sof():
    img = rng_image("RGB")
    exif = Image.Exif()
    exif[0x010E] = "chest PA " * 40  # ImageDescription: a long APP1 segment
    data = jpeg_bytes(img, exif=exif, comment=b"x" * 500)
    assert data.find(b"Exif") < _sof_offset(data)
    assert probe(data) == ImageInfo("jpeg", W, H, 8, 3)


def test_jpeg_fill_bytes_and_standalone_markers():
    data = jpeg_bytes(rng_image("L"))
    pos = _sof_offset(data)
    # FF fill bytes before the SOF marker, a TEM and an RST0 marker and fill bytes after SOI.
    patched = data[:2] + b"\xff\x01\xff\xd0\xff\xff\xff" + data[2:pos] + b"\xff" * 5 + data[pos:]
    assert probe(patched) == ImageInfo("jpeg", W, H, 8, 1)


def test_jpeg_extraneous_bytes_between_segments_are_skipped():
    data = jpeg_bytes(rng_image("L"))
    pos = _sof_offset(data)
    assert probe(data[:pos] + b"\x00\x12\x34" + data[pos:]) == ImageInfo("jpeg", W, H, 8, 1)


@pytest.mark.parametrize(
    ("marker", "precision", "nf"),
    [(0xC0, 8, 1), (0xC1, 12, 1), (0xC2, 8, 3), (0xC3, 16, 1), (0xC9, 8, 3), (0xCF, 12, 4)],
)
def test_jpeg_sof_kinds_after_non_sof_c_markers(marker, precision, nf):
    # DHT (C4), JPG (C8) and DAC (CC) sit in the SOF range but are not frame headers.
    data = (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\0" + b"\0" * 9)
        + segment(0xC4, b"\x00" * 17)
        + segment(0xC8, b"\x01\x02")
        + segment(0xCC, b"\x10\x10")
        + sof(marker, width=1234, height=987, precision=precision, nf=nf)
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    )
    assert probe(data) == ImageInfo("jpeg", 1234, 987, precision, nf)


def test_jpeg_real_and_crafted_truncation_points():
    data = jpeg_bytes(rng_image("L"))
    pos = _sof_offset(data)
    for cut in [3, 4, 5, 6, 20, pos, pos + 1, pos + 3, pos + 5, pos + 8, pos + 9]:
        with pytest.raises(ImageError, match=r"^truncated JPEG header"):
            probe(data[:cut])
    for cut in [1, 2]:
        with pytest.raises(ImageError, match="not a PNG, JPEG or DICOM file"):
            probe(data[:cut])
    assert probe(data[: pos + 10]) == ImageInfo("jpeg", W, H, 8, 1)  # SOF complete


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xd8\xff\xd9", "end of image (EOI) before any frame header"),
        (b"\xff\xd8" + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"), "scan (SOS) before any frame"),
        (b"\xff\xd8\xff\xe0\x00\x01", "marker FFE0 has length 1"),
        (b"\xff\xd8\xff\x00\x00\x00", "stuffed byte FF00"),
        (b"\xff\xd8" + sof(width=0), "width 0"),
        (b"\xff\xd8" + sof(height=0), "height 0 in the frame header (DNL marker)"),
        (b"\xff\xd8" + sof(nf=0), "0 components"),
    ],
)
def test_jpeg_corrupt(data, message):
    with pytest.raises(ImageError, match=re.escape(message)):
        probe(data)
