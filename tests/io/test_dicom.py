"""engine.io.dicom (decoding) and engine.io.probe on DICOM bytes, on files built with pydicom."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import dicom_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from engine.errors import ImageError
from engine.io.dicom import DicomImage, decode_dicom, read_dicom_meta
from engine.io.probe import ImageInfo, probe, sniff_format

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
SOP_UID = "1.2.826.0.1.3680043.8.498.1001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.2002"


def make_dicom(pixels: np.ndarray | None, **options) -> bytes:
    """conftest.dicom_file with this module's ids (patient PAT-0042)."""
    return dicom_file(
        pixels, sop_uid=SOP_UID, study_uid=STUDY_UID, patient_id="PAT-0042", **options
    )


def ramp(start: int, step: int, dtype=np.uint16) -> np.ndarray:
    """An 8x8 ramp: start, start+step, ... in row-major order."""
    return (start + step * np.arange(64, dtype=np.int64)).reshape(8, 8).astype(dtype)


# --- grayscale pipeline ----------------------------------------------------------------------


def test_rescale_then_window_exact_pixels():
    # Stored s = 12 + 1000*i; Modality LUT: x = 2*s - 1024 = 2000*i - 1000.
    stored = ramp(12, 1000)
    # LINEAR window (PS3.3 C.11.2.1.2.1), center c = 32768, width w = 65536:
    #   x <= c - 0.5 - (w-1)/2 = 0        -> black
    #   x >  c - 0.5 + (w-1)/2 = 65535    -> white
    #   else ((x - (c - 0.5)) / (w - 1) + 0.5) * 65535 = x
    # so the display value is x itself, clipped to 0..65535.
    data = make_dicom(
        stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=32768, WindowWidth=65536
    )
    img = decode_dicom(data)
    assert isinstance(img, DicomImage)
    assert img.pixels.dtype == np.uint16
    assert img.pixels.shape == (8, 8)
    assert img.pixels.flags.c_contiguous
    assert img.bit_depth == 16
    x = 2000 * np.arange(64).reshape(8, 8) - 1000
    expected = np.clip(x, 0, 65535)
    np.testing.assert_array_equal(img.pixels, expected)
    # spot checks, by hand: i=0 -> x=-1000 -> 0; i=1 -> 1000; i=33 -> 65000; i=34 -> 67000 -> white
    assert img.pixels[0, 0] == 0
    assert img.pixels[0, 1] == 1000
    assert img.pixels[4, 1] == 65000
    assert img.pixels[4, 2] == 65535
    assert img.pixels[7, 7] == 65535


def test_first_of_several_windows_is_used():
    stored = ramp(12, 1000)
    one = make_dicom(
        stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=32768, WindowWidth=65536
    )
    several = make_dicom(
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[32768, 500],
        WindowWidth=[65536, 100],
    )
    np.testing.assert_array_equal(decode_dicom(several).pixels, decode_dicom(one).pixels)


def test_8_bit_window():
    # center 128, width 256: ((s - 127.5) / 255 + 0.5) * 65535 = s * 257 exactly.
    stored = ramp(0, 4, np.uint8)  # 0..252
    img = decode_dicom(make_dicom(stored, WindowCenter=128, WindowWidth=256))
    assert img.bit_depth == 8
    np.testing.assert_array_equal(img.pixels, stored.astype(np.int64) * 257)


def test_no_window_uses_min_max():
    stored = ramp(0, 3)  # 0..189
    img = decode_dicom(make_dicom(stored))
    expected = np.rint(np.arange(64).reshape(8, 8) * 3 / 189 * 65535)
    np.testing.assert_array_equal(img.pixels, expected)
    assert img.pixels[0, 0] == 0
    assert img.pixels[2, 5] == 21845  # i = 21: 63/189 = 1/3 of 65535
    assert img.pixels[7, 7] == 65535


def test_empty_window_elements_mean_no_window():
    stored = ramp(0, 3)
    img = decode_dicom(make_dicom(stored, WindowCenter="", WindowWidth=""))
    np.testing.assert_array_equal(img.pixels, decode_dicom(make_dicom(stored)).pixels)
    assert img.pixels[7, 7] == 65535


def test_no_window_with_rescale_and_12_bits_stored():
    stored = ramp(100, 50)  # 100..3250, fits 12 bits
    img = decode_dicom(make_dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024))
    assert img.bit_depth == 12
    # A positive linear rescale does not change where min..max lands.
    expected = np.rint(np.arange(64).reshape(8, 8) / 63 * 65535)
    np.testing.assert_array_equal(img.pixels, expected)


def test_monochrome1_is_inverted():
    stored = ramp(12, 1000)
    kwargs = dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=32768, WindowWidth=65536)
    mono2 = decode_dicom(make_dicom(stored, **kwargs)).pixels
    mono1 = decode_dicom(make_dicom(stored, photometric="MONOCHROME1", **kwargs)).pixels
    np.testing.assert_array_equal(mono1, 65535 - mono2.astype(np.int64))
    # The brightest stored value becomes the darkest display value, and vice versa.
    assert mono1[7, 7] == 0
    assert mono1[0, 0] == 65535


def test_monochrome1_without_window():
    stored = ramp(0, 3)
    img = decode_dicom(make_dicom(stored, photometric="MONOCHROME1"))
    assert img.pixels[0, 0] == 65535
    assert img.pixels[7, 7] == 0


def test_signed_pixels_no_window():
    stored = ramp(-2000, 100, np.int16)  # -2000..4300
    img = decode_dicom(make_dicom(stored, bits_stored=16))
    np.testing.assert_array_equal(img.pixels, np.rint(np.arange(64).reshape(8, 8) / 63 * 65535))


def test_voi_lut_sequence_preferred_over_window():
    stored = ramp(0, 1, np.uint8)  # 0..63
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new(0x00283006, "US", [v * 256 for v in range(256)])  # LUTData
    data = make_dicom(stored, VOILUTSequence=[item], WindowCenter=10, WindowWidth=5)
    img = decode_dicom(data)
    # LUT output range is 0..2**16-1, so the display value is the LUT value itself.
    np.testing.assert_array_equal(img.pixels, stored.astype(np.int64) * 256)


def test_modality_lut_sequence():
    stored = ramp(0, 1)  # 0..63
    item = Dataset()
    item.LUTDescriptor = [64, 0, 16]
    item.add_new(0x00283006, "US", [1000 + 10 * v for v in range(64)])
    item.ModalityLUTType = "US"
    img = decode_dicom(make_dicom(stored, ModalityLUTSequence=[item]))
    np.testing.assert_array_equal(img.pixels, np.rint(np.arange(64).reshape(8, 8) / 63 * 65535))


def test_constant_image_is_black():
    img = decode_dicom(make_dicom(np.full((8, 8), 777, np.uint16)))
    assert not img.pixels.any()


def test_zero_window_width_is_an_image_error():
    with pytest.raises(ImageError, match="grayscale pipeline.*Window Width"):
        decode_dicom(make_dicom(ramp(0, 1), WindowCenter=10, WindowWidth=0))


def test_rgb_becomes_luminance():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    img = decode_dicom(make_dicom(rgb, photometric="RGB"))
    assert img.pixels.shape == (8, 8)
    rgbf = rgb.astype(np.float64)
    luma = 0.299 * rgbf[..., 0] + 0.587 * rgbf[..., 1] + 0.114 * rgbf[..., 2]
    np.testing.assert_allclose(img.pixels, luma * 257, atol=0.5 + 1e-9)
    assert img.pixels[0, 0] == 0
    assert img.pixels[0, 1] == 65535


def test_multi_frame_uses_first_frame():
    frames = np.stack([ramp(k * 1000, 10) for k in range(3)])
    data = make_dicom(frames, frames=3, WindowCenter=32768, WindowWidth=65536)
    img = decode_dicom(data)
    assert img.pixels.shape == (8, 8)
    np.testing.assert_array_equal(img.pixels, frames[0])  # identity window
    assert set(img.meta) == {"patient_id", "study_uid", "sop_uid", "view_position", "modality"}


# --- the table: the same pipeline, once per value in range -------------------------------------


def lut_item(first: int, values: list[int], bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(values), first, bits]
    item.add_new(0x00283006, "US", values)  # LUTData
    return item


def sparse_12_bit(rng: np.random.Generator, dtype=np.uint16, offset: int = 0) -> np.ndarray:
    """A 12-bit image (100 x 90) that does not use every value of its range."""
    pixels = rng.integers(200, 3900, (100, 90)).astype(np.int64) + offset
    return pixels.astype(dtype)


TABLE_CASES = {
    "window + rescale": dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2048,
                             WindowWidth=3000),
    "window, MONOCHROME1": dict(photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=1000),
    "sigmoid window": dict(WindowCenter=2000, WindowWidth=1500, VOILUTFunction="SIGMOID"),
    "linear exact window": dict(WindowCenter=1800, WindowWidth=900,
                                VOILUTFunction="LINEAR_EXACT"),
    "no window (min..max)": dict(),
    "no window, negative slope": dict(RescaleSlope=-0.5, RescaleIntercept=100),
    "no window, MONOCHROME1, 12 bits stored": dict(photometric="MONOCHROME1", bits_stored=12),
    "VOI LUT sequence": dict(VOILUTSequence=[lut_item(0, [(v * 17) % 65536 for v in
                                                           range(4096)])]),
    # not monotone: the no-window range must come from the values that occur
    "modality LUT sequence, no window": dict(ModalityLUTSequence=[lut_item(
        0, [((v * 7919) % 5000) for v in range(4096)])]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TABLE_CASES))
@pytest.mark.parametrize("signed", [False, True])
def test_the_table_gives_the_per_pixel_pipeline_bit_for_bit(case, signed):
    from pydicom import dcmread
    from pydicom.pixels import pixel_array

    from engine.io.dicom import grayscale_pixels

    options = dict(TABLE_CASES[case])
    if "ModalityLUTSequence" in options:
        options["ModalityLUTSequence"][0].ModalityLUTType = "US"
        if signed:
            pytest.skip("a modality LUT indexes unsigned values here")
    dtype, offset = (np.int16, -2000) if signed else (np.uint16, 0)
    stored = sparse_12_bit(np.random.default_rng(len(case)), dtype, offset)
    if signed:
        options.setdefault("bits_stored", 16)
    data = make_dicom(stored, **options)
    ds = dcmread(__import__("io").BytesIO(data))
    arr = pixel_array(ds, index=0)
    invert = options.get("photometric") == "MONOCHROME1"
    slow = grayscale_pixels(arr, ds, invert=invert, table=False)
    fast = grayscale_pixels(arr, ds, invert=invert, table=True)
    assert fast.dtype == np.uint16 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, slow)
    assert len(np.unique(slow)) > 100  # a real spread of display values, not a trivial image
    # and decode_dicom takes the table for such an image (fewer values in range than pixels)
    np.testing.assert_array_equal(decode_dicom(data).pixels, slow)


def test_the_table_is_taken_only_when_it_is_cheaper():
    import engine.io.dicom as dicom

    calls = []
    real = dicom._grayscale_display
    try:
        dicom._grayscale_display = lambda arr, ds, present=None: (
            calls.append(arr.size) or real(arr, ds, present)
        )
        big = sparse_12_bit(np.random.default_rng(0))
        decode_dicom(make_dicom(big, WindowCenter=2048, WindowWidth=4096))
        decode_dicom(make_dicom(ramp(12, 1000), WindowCenter=32768, WindowWidth=65536))
    finally:
        dicom._grayscale_display = real
    assert calls[0] == int(big.max()) - int(big.min()) + 1  # the values in range, not 9000 pixels
    assert calls[1] == 64  # 8 x 8 pixels spanning 63 001 values: per pixel


# --- metadata ------------------------------------------------------------------------------


EXPECTED_META = {
    "patient_id": "PAT-0042",
    "study_uid": STUDY_UID,
    "sop_uid": SOP_UID,
    "view_position": "PA",
    "modality": "DX",
}


def test_meta_read_back(tmp_path):
    path = tmp_path / "study.dcm"
    path.write_bytes(make_dicom(ramp(0, 1)))
    data = path.read_bytes()
    assert read_dicom_meta(data) == EXPECTED_META
    assert decode_dicom(data).meta == EXPECTED_META


def test_meta_missing_and_empty_fields_are_none():
    data = make_dicom(ramp(0, 1), ViewPosition="", PatientID="  ")
    meta = read_dicom_meta(data)
    assert meta["view_position"] is None
    assert meta["patient_id"] is None
    assert meta["modality"] == "DX"


def test_meta_does_not_need_pixel_data():
    assert read_dicom_meta(make_dicom(None)) == EXPECTED_META


# --- errors --------------------------------------------------------------------------------


def test_no_pixel_data():
    data = make_dicom(None)
    with pytest.raises(ImageError) as err:
        decode_dicom(data)
    assert str(err.value) == "DICOM has no pixel data (PixelData element missing)"


def test_jpeg2000_with_junk_data_names_transfer_syntax():
    data = make_dicom(
        None, transfer_syntax=JPEG2000_LOSSLESS, encapsulated=encapsulate([b"junk" * 16])
    )
    with pytest.raises(ImageError) as err:
        decode_dicom(data)
    message = str(err.value)
    assert JPEG2000_LOSSLESS in message
    assert "JPEG 2000 Image Compression (Lossless Only)" in message


def test_missing_codec_message_names_transfer_syntax_and_packages():
    if get_decoder(JPEG_LOSSLESS_SV1).is_available:
        pytest.skip("a JPEG Lossless codec is installed here")
    data = make_dicom(
        None, transfer_syntax=JPEG_LOSSLESS_SV1, encapsulated=encapsulate([b"\xff\xd8" * 8])
    )
    with pytest.raises(ImageError) as err:
        decode_dicom(data)
    message = str(err.value)
    assert message.startswith(
        f"no installed codec can decode DICOM transfer syntax {JPEG_LOSSLESS_SV1}"
    )
    assert "JPEG Lossless, Non-Hierarchical, First-Order Prediction" in message
    assert "pylibjpeg" in message
    assert "python-gdcm" in message


def test_unknown_transfer_syntax():
    private = "1.2.826.0.1.3680043.8.498.99"
    data = make_dicom(ramp(0, 1), transfer_syntax=private)
    with pytest.raises(ImageError, match=re.escape(f"transfer syntax {private} (unknown)")):
        decode_dicom(data)


def test_unsupported_photometric():
    with pytest.raises(ImageError, match="photometric interpretation 'PALETTE COLOR'"):
        decode_dicom(make_dicom(ramp(0, 1), photometric="PALETTE COLOR"))


def test_truncated_files():
    data = make_dicom(ramp(0, 1000))
    pixel_start = len(data) - 128  # 8x8 uint16
    cuts = [0, 1, 64, 131, 132, 140, 200, 300, pixel_start - 12, pixel_start, pixel_start + 1]
    cuts += [len(data) - 64, len(data) - 1]
    for cut in cuts:
        with pytest.raises(ImageError):
            decode_dicom(data[:cut])
    # pydicom reads a cut dataset without complaint; decode_dicom notices the ragged end.
    inside_value = data.find(b"PAT-0042") + 3
    for cut in [inside_value, pixel_start - 60, pixel_start - 5]:
        with pytest.raises(ImageError, match="no pixel data.*appears truncated"):
            decode_dicom(data[:cut])
    with pytest.raises(ImageError, match="less than expected"):
        decode_dicom(data[: len(data) - 64])


def test_garbage_after_dicm_prefix():
    rng = np.random.default_rng(3)
    for seed_bytes in range(5):
        junk = rng.integers(0, 256, 300 + seed_bytes * 37, dtype=np.uint8).tobytes()
        data = b"\0" * 128 + b"DICM" + junk
        with pytest.raises(ImageError):
            decode_dicom(data)


def test_not_dicom_bytes():
    with pytest.raises(ImageError, match="not a DICOM Part 10 file"):
        decode_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(ImageError, match=re.escape("empty file (0 bytes)")):
        decode_dicom(b"")


# --- probe on DICOM bytes -------------------------------------------------------------------


def test_dicom_without_extension_is_sniffed_and_probed(tmp_path):
    path = tmp_path / "IM000001"  # archives often hold DICOMs with no extension
    path.write_bytes(make_dicom(ramp(0, 1), bits_stored=12))
    data = path.read_bytes()
    assert sniff_format(data) == "dicom"
    assert probe(data) == ImageInfo("dicom", 8, 8, 12, 1)


def test_probe_dicom_non_square_and_rgb():
    gray = np.zeros((5, 9), np.uint16)
    assert probe(make_dicom(gray)) == ImageInfo("dicom", 9, 5, 16, 1)
    rgb = np.zeros((6, 4, 3), np.uint8)
    assert probe(make_dicom(rgb, photometric="RGB")) == ImageInfo("dicom", 4, 6, 8, 3)


def test_dicom_without_preamble_is_not_sniffed():
    data = make_dicom(ramp(0, 1))
    bare = data[132:]  # file meta group and dataset, no preamble, no "DICM"
    assert sniff_format(bare) is None
    with pytest.raises(ImageError, match="not a PNG, JPEG or DICOM file.*not supported"):
        probe(bare)
    with pytest.raises(ImageError, match="not a DICOM Part 10 file"):
        decode_dicom(bare)


def test_probe_dicom_without_image_size():
    ds_bytes = make_dicom(None)
    # Rows/Columns are present, so probe succeeds on a header-only look...
    assert probe(ds_bytes).format == "dicom"
    # ...but a dataset cut before Rows has no size to check.
    with pytest.raises(ImageError, match="no image size"):
        probe(ds_bytes[:300])
