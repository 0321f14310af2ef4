"""engine.io.thumbs: the review page's previews (a JPEG of the image, the lung mask as a 1-bit
PNG) beside each part; previews of shards that never committed are removed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.io import parquet, thumbs


def commit_part(out, number: int, keys: list[int]) -> None:
    rows = [parquet.Row(key=k, source=f"img{k}.png", member=None).columns() for k in keys]
    parquet.write_part(out, number, parquet.rows_frame(rows))


def test_thumbnail_keeps_the_source_aspect_at_the_long_side():
    work = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for (width, height), size in (((2000, 1000), (256, 128)), ((600, 1200), (128, 256))):
        with Image.open(io.BytesIO(thumbs.encode_thumb(work, width, height))) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", size)
    with Image.open(io.BytesIO(thumbs.encode_thumb(work, 4000, 1))) as im:
        assert im.size == (256, 1)  # never a zero-pixel side


def test_thumbnail_maps_zero_and_one_to_black_and_white():
    work = np.zeros((32, 32), np.float32)
    work[:, 16:] = 1.0
    with Image.open(io.BytesIO(thumbs.encode_thumb(work, 32, 32))) as im:
        pixels = np.asarray(im)
    assert pixels[:, :100].max() <= 8 and pixels[:, -100:].min() >= 247  # JPEG, not exact


def test_mask_round_trips_as_a_one_bit_png():
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:7] = True
    with Image.open(io.BytesIO(thumbs.encode_mask(mask))) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "1", (9, 6))
        assert np.array_equal(np.asarray(im), mask)


def test_previews_round_trip_and_the_latest_part_wins(tmp_path):
    assert thumbs.read_previews(tmp_path, 1) is None  # no previews at all
    thumbs.write_thumbs(tmp_path, 0, [1, 2], [b"j1", b"j2"], [b"m1", b"m2"])
    thumbs.write_thumbs(tmp_path, 1, [2], [b"j2-again"], [b"m2-again"])  # rescreened
    assert thumbs.read_previews(tmp_path, 1) == (b"j1", b"m1")
    assert thumbs.read_previews(tmp_path, 2) == (b"j2-again", b"m2-again")
    assert thumbs.read_previews(tmp_path, 3) is None
    assert thumbs.thumbs_path(tmp_path, 1).name == "part-00001.parquet"


def test_orphans_and_interrupted_writes_are_removed_committed_previews_kept(tmp_path):
    assert thumbs.remove_orphans(tmp_path) == 0  # no thumbs folder yet
    commit_part(tmp_path, 0, [1])
    thumbs.write_thumbs(tmp_path, 0, [1], [b"j"], [b"m"])
    thumbs.write_thumbs(tmp_path, 1, [2], [b"j"], [b"m"])  # its part never came
    folder = tmp_path / thumbs.THUMBS
    (folder / ".part-00002.parquet.tmp-77").write_bytes(b"torn")
    (folder / "notes.txt").write_text("not ours")
    assert thumbs.remove_orphans(tmp_path) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "part-00000.parquet"]
