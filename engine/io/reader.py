"""The reader side of a run: an input's bytes -> its row so far and a pipeline Sample.

`prepare` is the filler of the row's reader columns (engine/io/parquet.py `Row`): where the
image is, its file (sha256, size, mtime), its header (format, size, bit depth) and DICOM tags.

`to_sample` is the one "DICOM? decode it (pydicom, on the CPU), else pass the encoded bytes on"
step: `cxr screen` (through `prepare`), `cxr similar`, the shortcut check, training
(engine/train/data.py) and the review page (engine/serve/images.py) all read images through it,
so each sees the pixels the others saw.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from engine.errors import ImageError
from engine.io.archive import Item
from engine.io.dicom import decode_dicom, read_dicom_meta
from engine.io.parquet import Row
from engine.io.probe import ImageInfo, check_limits, probe
from engine.pipeline import Sample


@dataclass(slots=True)
class Prepared:
    """One input after the reader: its row so far, and a Sample unless it already failed."""

    row: Row
    sample: Sample | None


def location(source: str, member: str | None) -> str:
    return f"{source}:{member}" if member else source


def to_sample(data: bytes, info: ImageInfo | None = None) -> Sample:
    """A Sample of an image's bytes: DICOM decoded to pixels here, anything else left encoded
    for the preprocessor. `info`: the header's probe, if the caller has it (else probed here).
    Raises ImageError for what cannot be read."""
    if (info or probe(data)).format == "dicom":
        return Sample(pixels=decode_dicom(data).pixels)
    return Sample(encoded=np.frombuffer(data, np.uint8))


def prepare(item: Item, *, max_pixels: int, min_side: int) -> Prepared:
    """Reader-side work for one item: hash, probe the header, refuse bombs, decode DICOM."""
    ref = item.ref
    row = Row(key=ref.key, source=ref.source, member=ref.member)
    where = location(ref.source, ref.member)
    if item.error is not None or item.data is None:
        return Prepared(failed(row, where, item.error or "no data"), None)
    data = item.data
    row.sha256 = hashlib.sha256(data).hexdigest()
    row.update(source_stat(ref.source, ref.member, len(data)))
    try:
        info = probe(data)
        row.format, row.width, row.height = info.format, info.width, info.height
        row.bit_depth = info.bit_depth
        if info.format == "dicom":
            row.update(read_dicom_meta(data))
        check_limits(info, max_pixels=max_pixels, min_side=min_side)
        sample = to_sample(data, info)
    except ImageError as exc:
        return Prepared(failed(row, where, str(exc)), None)
    return Prepared(row, sample)


def source_stat(source: str, member: str | None, size_read: int) -> dict[str, int]:
    """Size and mtime of the file (or archive) an image came from, for the nightly change check.

    Taken after the read: a plain file whose size is no longer what was read is being written
    to, so nothing is recorded and the next check reads it (engine/nightly/changes.py).
    """
    try:
        st = os.stat(source)
    except OSError:
        return {}
    if member is None and st.st_size != size_read:
        return {}
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def failed(row: Row, where: str, message: str) -> Row:
    """`row` as an error row: status "error", the message prefixed with the image's location."""
    row.status, row.error = "error", f"{where}: {message}"
    return row
