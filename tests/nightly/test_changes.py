"""engine.nightly.changes on plain files, with hand-written rows: unchanged files are not read,
a touched one is read once and remembered, a changed or vanished one is reported, rows outside
tonight's inputs are not looked at. (Archives and the whole nightly sequence: test_nightly.py.)"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.io import parquet
from engine.nightly import changes


def screened(out: Path, files: list[Path], *, stat: bool = True) -> dict[Path, int]:
    """One committed part with a row per file as a run records it; the files' keys."""
    rows, keys = [], {}
    for key, path in enumerate(files, start=1):
        data, st = path.read_bytes(), os.stat(path)
        recorded = {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
        row = parquet.Row(key=key, source=str(path), member=None).columns()
        rows.append(row | {"status": "ok", "sha256": hashlib.sha256(data).hexdigest()} | recorded)
        keys[path] = key
    frame = parquet.rows_frame(rows)
    if not stat:  # written before the stat columns existed
        frame = frame.drop("source_size", "source_mtime_ns")
    parquet.write_part(out, 0, frame)
    return keys


def test_changed_vanished_and_touched_files(tmp_path):
    night = tmp_path / "night"
    night.mkdir()
    files = [night / name for name in ("same.png", "changed.png", "touched.png", "gone.png")]
    for i, f in enumerate(files):
        f.write_bytes(b"image %d" % i)
    elsewhere = tmp_path / "other" / "x.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"not tonight's")
    out = tmp_path / "out"
    keys = screened(out, [*files, elsewhere])
    files[1].write_bytes(b"new content")
    os.utime(files[2], ns=(1, 1))  # same bytes, another mtime
    files[3].unlink()
    elsewhere.unlink()  # vanished, but not under tonight's input

    report = changes.check(out, [night], run_id="r2", previous_run_id="r1")
    assert report.checked == 4 and report.touched == 1
    assert report.files_read == 2  # the changed and the touched one; the same one is not read
    assert report.changed_keys() == {keys[files[1]]}
    assert [c.key for c in report.vanished] == [keys[files[3]]] and report.new_vanished == 1
    found = changes.read_changes(out, "r2")
    assert sorted(found["change"].to_list()) == ["changed", "vanished"]
    changed = found.filter(found["change"] == "changed").row(0, named=True)
    assert changed["new_sha256"] == hashlib.sha256(b"new content").hexdigest()
    summary = report.to_json()
    assert (summary["changed"], summary["vanished"], summary["touched"]) == (1, 1, 1)
    assert summary["changed_samples"] == [str(files[1])]

    again = changes.check(out, [night], run_id="r3", previous_run_id="r2")
    assert again.touched == 0 and again.files_read == 1  # the touched file was remembered
    assert again.new_vanished == 0  # reported by r2 already
    assert changes.read_changes(out, "nothing-found").height == 0


def test_rows_without_a_recorded_stat_are_read_only_when_asked(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"old")
    out = tmp_path / "out"
    screened(out, [image], stat=False)
    image.write_bytes(b"new")
    quiet = changes.check(out, [image], run_id="r1")
    assert (quiet.unverified, quiet.files_read, quiet.changes) == (1, 0, [])
    asked = changes.check(out, [image], run_id="r2", hash_unknown=True)
    assert asked.files_read == 1 and asked.changed_keys() == {1}


def test_an_empty_directory_has_nothing_to_check(tmp_path):
    report = changes.check(tmp_path, [tmp_path], run_id="r1")
    assert report.checked == 0 and report.to_json()["changed"] == 0
