"""engine.io.reader: an input's bytes -> its row's reader columns and a pipeline Sample; what
cannot be read becomes an error row naming the image's location."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from conftest import dicom_file
from PIL import Image

from engine.errors import ImageError
from engine.io.archive import ImageRef, Item
from engine.io.parquet import Row
from engine.io.reader import failed, location, prepare, source_stat, to_sample

LIMITS = {"max_pixels": 10_000_000, "min_side": 16}


def png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), 100, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dicom() -> bytes:
    pixels = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48)
    return dicom_file(pixels, sop_uid="1.2.3.4", study_uid="1.2.3", patient_id="PAT-7")


def item(path, data: bytes | None, *, member: str | None = None, error: str | None = None):
    return Item(ImageRef(key=5, source=str(path), member=member), data, error)


def test_location_names_the_archive_member():
    assert location("/in/a.tar", "x/1.png") == "/in/a.tar:x/1.png"
    assert location("/in/1.png", None) == "/in/1.png"


def test_to_sample_decodes_dicom_and_passes_other_bytes_on():
    data = png()
    sample = to_sample(data)
    assert sample.pixels is None and sample.encoded.tobytes() == data
    sample = to_sample(dicom())
    assert sample.encoded is None and sample.pixels.shape == (32, 48)
    with pytest.raises(ImageError):
        to_sample(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)  # a PNG signature, no header


def test_prepare_fills_the_file_and_header_columns(tmp_path):
    data = png(40, 30)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    prepared = prepare(item(path, data), **LIMITS)
    row = prepared.row
    assert (row.key, row.source, row.member, row.status) == (5, str(path), None, None)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert (row.format, row.width, row.height, row.bit_depth) == ("png", 40, 30, 8)
    assert (row.source_size, row.source_mtime_ns) == (len(data), os.stat(path).st_mtime_ns)
    assert prepared.sample is not None and prepared.sample.encoded.tobytes() == data


def test_prepare_reads_the_dicom_tags(tmp_path):
    data = dicom()
    prepared = prepare(item(tmp_path / "scan.dcm", data), **LIMITS)
    row = prepared.row
    assert (row.format, row.width, row.height) == ("dicom", 48, 32)
    assert (row.patient_id, row.study_uid, row.sop_uid) == ("PAT-7", "1.2.3", "1.2.3.4")
    assert row.source_size is None  # no such file: nothing recorded for the change check
    assert prepared.sample.pixels.shape == (32, 48)


def test_what_cannot_be_read_becomes_an_error_row_with_its_location(tmp_path):
    archive = str(tmp_path / "in.tar")
    unread = prepare(item(archive, None, member="m.png", error="cannot read"), **LIMITS)
    assert unread.sample is None
    assert (unread.row.status, unread.row.error) == ("error", f"{archive}:m.png: cannot read")
    assert unread.row.sha256 is None
    tiny = prepare(item(tmp_path / "t.png", png(8, 8)), **LIMITS)  # below min_side
    assert tiny.sample is None and tiny.row.status == "error"
    assert tiny.row.error.startswith(f"{tmp_path / 't.png'}: ")
    assert (tiny.row.width, tiny.row.height) == (8, 8)  # the header was read before the refusal
    garbage = prepare(item(tmp_path / "g.png", b"not an image at all"), **LIMITS)
    assert garbage.sample is None and garbage.row.status == "error"


def test_source_stat_records_only_what_was_read_whole(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    st = os.stat(path)
    whole = {"source_size": 5, "source_mtime_ns": st.st_mtime_ns}
    assert source_stat(str(path), None, 5) == whole
    assert source_stat(str(path), None, 3) == {}  # being written to: the next check reads it
    assert source_stat(str(path), "member.png", 3) == whole  # an archive's own size
    assert source_stat(str(tmp_path / "gone.png"), None, 5) == {}


def test_failed_marks_the_row_as_an_error():
    row = failed(Row(key=1, source="a.png", member=None), "a.png", "cannot decode")
    assert (row.status, row.error) == ("error", "a.png: cannot decode")
