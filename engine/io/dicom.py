"""Decode a DICOM file to display-ready 16-bit grayscale.

Grayscale images follow the PS3.4 grayscale pipeline, in the standard's order:

1. Modality LUT: Rescale Slope/Intercept, or a Modality LUT Sequence.
2. VOI LUT: a VOI LUT Sequence if present (preferred, as pydicom does), else the first
   Window Center/Width pair (honouring VOI LUT Function: LINEAR, LINEAR_EXACT, SIGMOID), else
   the image's own min..max.
3. The VOI output range is mapped linearly onto 0..65535.
4. MONOCHROME1 is inverted, so that 0 is always black.

All of it in float64, then rounded and clipped to uint16. Every step maps one stored value to
one display value (only the no-window range looks at the whole image), so for integer pixels
whose range is smaller than the image (12-16 bit radiographs: 4096-65536 values, millions of
pixels) the pipeline runs once per value in range, into a uint16 table that the image then
indexes: the same output, bit for bit, at a tenth of the CPU (`grayscale_pixels`).

Colour images (RGB, YBR_FULL, YBR_FULL_422, and YBR_ICT/YBR_RCT which the JPEG 2000 decoders
return as RGB) are converted to luminance with the ITU-R BT.601 weights 0.299/0.587/0.114 (the
ones Pillow's "L" conversion uses, so PNG/JPEG and DICOM colour inputs agree) and their nominal
range 0..2**BitsStored-1 is mapped onto 0..65535; Modality and VOI LUTs do not apply to colour
images. PALETTE COLOR and other photometric interpretations are refused.

Multi-frame images: only the first frame is decoded and returned; nothing in `meta` says there
were more.

Callers should `engine.io.probe.probe` and `check_limits` the bytes first: this module trusts
Rows x Columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import ImageError
from engine.io.probe import sniff_format

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_META_KEYWORDS = {
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
    "sop_uid": "SOPInstanceUID",
    "view_position": "ViewPosition",
    "modality": "Modality",
}
_GRAY = ("MONOCHROME1", "MONOCHROME2")
# After pydicom's default processing (raw=False) these all come out as RGB.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_OUT_MAX = 65535.0


@dataclass(frozen=True, slots=True)
class DicomImage:
    """A decoded DICOM frame.

    pixels: uint16, shape (H, W), C-contiguous, 0 = black .. 65535 = white.
    bit_depth: Bits Stored of the source.
    meta: patient_id, study_uid, sop_uid, view_position, modality (None when absent or empty).
    """

    pixels: np.ndarray
    bit_depth: int
    meta: dict[str, str | None]


def read_dicom_meta(data: bytes) -> dict[str, str | None]:
    """Read the identifying fields, without reading the pixel data."""
    return _meta(_read(data, stop_before_pixels=True))


def decode_dicom(data: bytes) -> DicomImage:
    """Decode the first frame of a DICOM Part 10 file to display-ready uint16 grayscale."""
    ds = _read(data, stop_before_pixels=False)
    if "PixelData" not in ds:
        hint = "; the file appears truncated" if _looks_truncated(ds, len(data)) else ""
        raise ImageError(f"DICOM has no pixel data (PixelData element missing){hint}")
    ts_uid = _check_codec(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GRAY + _COLOUR:
        raise ImageError(
            f"unsupported DICOM photometric interpretation {photometric or '(missing)'!r}; "
            "supported: MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT"
        )
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
    if bits_stored <= 0:
        raise ImageError("DICOM has no Bits Stored / Bits Allocated")

    from pydicom.pixels import pixel_array

    try:
        # index=0 decodes only the first frame of a multi-frame image.
        arr = pixel_array(ds, index=0)
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageError(
            f"cannot decode DICOM pixel data ({_ts_label(ts_uid)}): "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc

    try:
        if photometric in _GRAY:
            if arr.ndim != 2:
                raise ImageError(
                    f"DICOM is {photometric} but has {ds.get('SamplesPerPixel')} samples per pixel"
                )
            pixels = grayscale_pixels(arr, ds, invert=photometric == "MONOCHROME1")
        else:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ImageError(
                    f"DICOM is {photometric} but decoded to an array of shape {arr.shape}"
                )
            pixels = _to_uint16(_colour_display(arr, bits_stored))
    except (ImageError, MemoryError):
        raise
    except Exception as exc:
        # Damaged LUT sequences, a zero window width, an unknown VOI LUT Function...
        raise ImageError(
            f"cannot apply the DICOM grayscale pipeline: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    return DicomImage(pixels=pixels, bit_depth=bits_stored, meta=_meta(ds))


# --- pipeline ----------------------------------------------------------------------------------

_MAX_TABLE = 1 << 17  # values in range; beyond that (32-bit pixels) the pipeline runs per pixel


def grayscale_pixels(
    arr: np.ndarray, ds: Dataset, *, invert: bool, table: bool | None = None
) -> np.ndarray:
    """The grayscale pipeline (module docstring) to C-contiguous uint16. table=None: through a
    table of the values in range when that is cheaper than the image (integer pixels, fewer
    values in range than pixels); True/False force it (the tests compare the two)."""
    if table is None:
        table = arr.dtype.kind in "iu" and _span(arr) <= min(arr.size, _MAX_TABLE)
    if not table:
        return _to_uint16(_grayscale_display(arr, ds), invert=invert)
    lo, hi = int(arr.min()), int(arr.max())
    domain = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
    if arr.dtype.kind == "u":
        index = arr if lo == 0 else np.subtract(arr, arr.dtype.type(lo))
    else:  # signed: the offset may not fit the stored type
        index = arr.astype(np.int64 if arr.dtype.itemsize > 2 else np.int32) - lo
    present = None
    if "ModalityLUTSequence" in ds and not _has_voi_lut_sequence(ds) and not _has_window(ds):
        # the min..max range of a LUT that need not be monotone: over the values that occur
        present = np.bincount(index.ravel(), minlength=len(domain)) > 0
    lut = _to_uint16(_grayscale_display(domain, ds, present), invert=invert)
    return np.ascontiguousarray(lut[index])


def _span(arr: np.ndarray) -> int:
    return int(arr.max()) - int(arr.min()) + 1 if arr.size else 0


def _to_uint16(display: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """float64 display values (0 black .. 65535 white) to uint16; MONOCHROME1 inverted first."""
    if invert:
        np.subtract(_OUT_MAX, display, out=display)
    np.rint(display, out=display)
    np.clip(display, 0, _OUT_MAX, out=display)
    return np.ascontiguousarray(display.astype(np.uint16))


def _grayscale_display(
    arr: np.ndarray, ds: Dataset, present: np.ndarray | None = None
) -> np.ndarray:
    """Modality LUT -> VOI -> linear map of the VOI output range onto 0..65535 (float64).
    present: which entries of arr occur in the image, where arr is a table's domain (the
    no-window range is then the min..max of those)."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(arr, ds)

    if _has_voi_lut_sequence(ds):
        if not np.issubdtype(values.dtype, np.integer):
            # A LUT is indexed by integer input values; pydicom would truncate floats.
            values = np.rint(values).astype(np.int64)
        out = apply_voi(values, ds, index=0)
        # PS3.3 C.11.2.1.1: the third LUT Descriptor value is the bits per output entry.
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        lo, hi = 0.0, float(2**lut_bits - 1)
    elif _has_window(ds):
        out = apply_windowing(values, ds, index=0)
        # pydicom's window output range depends on Bits Stored, Pixel Representation and the
        # Modality LUT; asking the function itself where -inf and +inf land gives exactly that
        # range without copying its rules here.
        lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds, index=0))
    else:
        out = values
        seen = out if present is None else np.asarray(out)[present]
        lo, hi = float(np.min(seen)), float(np.max(seen))

    if hi <= lo:
        # A constant image (or a degenerate LUT): no contrast to show, make it black.
        return np.zeros(out.shape, dtype=np.float64)
    # Every array in this pipeline is a fresh one of ours, so work in place: these images are
    # tens of megabytes as float64.
    out = np.asarray(out, dtype=np.float64)
    out -= lo
    out *= _OUT_MAX / (hi - lo)
    return out


def _colour_display(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    rgb = arr.astype(np.float64)
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return luma * (_OUT_MAX / float(2**bits_stored - 1))


def _has_voi_lut_sequence(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _has_window(ds: Dataset) -> bool:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    # Empty elements read as None or "": treat them as no window at all.
    return center not in (None, "") and width not in (None, "")


# --- reading and errors ------------------------------------------------------------------------


def _read(data: bytes, *, stop_before_pixels: bool) -> Dataset:
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if sniff_format(data) != "dicom":
        raise ImageError(
            f"not a DICOM Part 10 file: no 'DICM' at byte 128 (first bytes: {data[:8]!r}); "
            "datasets without the 128-byte preamble are not supported"
        )
    from pydicom import dcmread

    try:
        return dcmread(BytesIO(data), stop_before_pixels=stop_before_pixels)
    except MemoryError:
        raise
    except Exception as exc:
        # pydicom raises many types on damaged input; each means this one file is bad.
        raise ImageError(f"corrupt DICOM: {type(exc).__name__}: {_one_line(exc)}") from exc


def _check_codec(ds: Dataset) -> str:
    """Return the transfer syntax UID; raise ImageError if no installed plugin can decode it."""
    from pydicom.pixels import get_decoder

    file_meta = getattr(ds, "file_meta", None)
    ts_uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts_uid:
        raise ImageError("DICOM file meta has no Transfer Syntax UID (0002,0010)")
    try:
        decoder = get_decoder(ts_uid)
    except NotImplementedError as exc:
        raise ImageError(
            f"DICOM transfer syntax {_ts_label(ts_uid)} is not supported by pydicom"
        ) from exc
    if not decoder.is_available:
        # pydicom's own list, e.g. "pylibjpeg - requires pylibjpeg>=2.0 and
        # pylibjpeg-libjpeg>=2.1", stays right as plugins come and go.
        options = "; ".join(decoder.missing_dependencies) or "none known"
        gdcm_note = (
            " (the gdcm package on PyPI is python-gdcm)"
            if any(dep.startswith("gdcm") for dep in decoder.missing_dependencies)
            else ""
        )
        raise ImageError(
            f"no installed codec can decode DICOM transfer syntax {_ts_label(ts_uid)}; "
            f"install one of: {options}{gdcm_note}"
        )
    return str(ts_uid)


def _ts_label(ts_uid: str) -> str:
    from pydicom.uid import UID

    uid = UID(str(ts_uid))
    name = uid.name
    return f"{uid} ({name})" if name and name != str(uid) else f"{uid} (unknown)"


def _looks_truncated(ds: Dataset, size: int) -> bool:
    """True if the dataset's last element does not end where the file does.

    pydicom reads a file cut short without complaint: the last value is simply shorter than
    its header says, and a partial element header at the end is silently dropped.
    """
    from pydicom.dataelem import RawDataElement

    if not len(ds):
        return False
    raw = ds.get_item(max(ds.keys()))
    if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
        return False  # already converted, or a sequence of undefined length: cannot tell
    return raw.value_tell + raw.length != size


def _meta(ds: Dataset) -> dict[str, str | None]:
    meta: dict[str, str | None] = {}
    for key, keyword in _META_KEYWORDS.items():
        try:
            value = ds.get(keyword)
        except Exception:
            # An undecodable value in one field should not cost the image.
            value = None
        text = "" if value is None else str(value).strip()
        meta[key] = text or None
    return meta


def _one_line(exc: BaseException) -> str:
    # One line, and without object addresses ("<_io.BytesIO object at 0x7f...>") so that equal
    # errors read the same in the output table.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split()))
