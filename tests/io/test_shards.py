"""engine/io/shards.py: a cluster run's listing and reading give exactly what iter_items gives.

The driver lists (no image bytes read), the workers read their shards' entries back; the
Items they get must equal a local run's, item for item: keys, order, bytes and error messages,
for every kind of input and every kind of bad input. Needs no Ray.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from conftest import DEV_IMAGES
from test_archive import DICOM_LIKE, mark_encrypted, tar_info, write_tar, write_tree, write_zip

from engine.io import archive, shards
from engine.io.archive import ArchiveStats, iter_items
from engine.io.shards import Shard, ShardReader, list_entries, plan_shards

IMAGE_NAMES = ("ieee8023-000001-12.png", "ieee8023-000001-2.jpg", "ieee8023-000001-17.png")


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    paths = [DEV_IMAGES / name for name in IMAGE_NAMES]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"real images not found under {DEV_IMAGES}")
    return [path.read_bytes() for path in paths]


def kitchen_sink(root: Path, images: list[bytes]) -> list[str]:
    """Every input kind and most bad inputs the archive module knows, in one list."""
    a, b, c = images
    tree = write_tree(
        root / "tree",
        {
            "x/1.png": a,
            "x/2.jpg": b,
            "x/notes.txt": b"not an image",
            "x/.DS_Store": b"\0\0",
            "x/DICOMFILE": DICOM_LIKE,
            "x/README": b"plain text",
            "y/broken.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
            "y/3.png": c,
        },
    )
    os.symlink(tree / "x" / "1.png", tree / "y" / "link.png")
    members = [("m/1.png", a), ("m/2.jpg", b), ("m/dcm", DICOM_LIKE), ("m/readme.txt", b"t")]
    plain_tar = write_tar(root / "plain.tar", members)
    with tarfile.open(root / "odd.tar", "w") as tar:
        tar.addfile(tar_info("ok.png", len(a)), __import__("io").BytesIO(a))
        tar.addfile(tar_info("ln.png", 0, tarfile.SYMTYPE, "ok.png"))
        tar.addfile(tar_info("../escape.png", len(b)), __import__("io").BytesIO(b))
    gz = write_tar(root / "pack.tar.gz", [(f"g/{i}.png", d) for i, d in enumerate(images)], "w:gz")
    zipped = write_zip(root / "pack.zip", [("z/1.png", a), ("z/dcm", DICOM_LIKE), ("z/2.jpg", b)])
    locked = write_zip(root / "locked.zip", [("secret.png", a)])
    mark_encrypted(locked)
    full = write_tar(
        root / "full.tar", [(f"t/{i}.png", d) for i, d in enumerate(images)]
    ).read_bytes()
    (root / "cut-data.tar").write_bytes(full[: 512 + len(a) // 2])  # inside member 0's data
    (root / "cut-header.tar").write_bytes(full[: 512 + ((len(a) + 511) // 512) * 512 + 100])
    gzfull = (root / "pack.tar.gz").read_bytes()
    (root / "cut.tar.gz").write_bytes(gzfull[: len(gzfull) // 2])
    (root / "junk.zip").write_bytes(b"not a zip" * 40)
    return [
        str(tree),
        str(plain_tar),
        str(root / "odd.tar"),
        str(gz),
        str(zipped),
        str(locked),
        str(root / "cut-data.tar"),
        str(root / "cut-header.tar"),
        str(root / "cut.tar.gz"),
        str(root / "junk.zip"),
        str(root / "missing.png"),
        str(tree / "x" / "1.png"),  # a duplicate: dropped
        str(tree / "x" / "notes.txt"),  # named: always counts (an error row downstream)
    ]


def triples(items) -> list[tuple]:
    return [(i.ref, i.data, i.error) for i in items]


def test_listing_then_reading_equals_iter_items(tmp_path, images):
    inputs = kitchen_sink(tmp_path, images)
    local_stats, listed_stats = ArchiveStats(), ArchiveStats()
    local = triples(iter_items(inputs, stats=local_stats))
    entries = list(list_entries(inputs, stats=listed_stats))
    reader = ShardReader()
    try:
        cluster = triples(reader.items(entries))
    finally:
        reader.close()
    assert cluster == local
    assert listed_stats == local_stats
    # the uncompressed tars were listed by seeking, with data offsets for the workers
    plain = [e for e in entries if e.source.endswith("plain.tar") and e.error is None]
    assert plain and all(e.offset > 0 and e.size > 0 for e in plain)
    assert all(e.offset == -1 for e in entries if e.source.endswith(".tar.gz"))
    # a tar cut inside a member's data: listed by seeking, it gives the stream walk's error
    errors = {e.source.rsplit("/", 1)[-1]: e.error for e in entries if e.error}
    assert errors["cut-data.tar"].startswith("corrupt or truncated archive at member 't/0.png'")


def test_listing_reads_no_image_bytes(tmp_path, images, monkeypatch):
    inputs = kitchen_sink(tmp_path, images)

    def no_reading(*args, **kwargs):
        raise AssertionError("the listing read an image's bytes")

    monkeypatch.setattr(archive, "_read_file", no_reading)
    monkeypatch.setattr(archive, "_read_stream", no_reading)
    entries = list(list_entries(inputs))
    assert len(entries) > 20


def test_shards_out_of_order_and_skips(tmp_path, images):
    """Shards read in any order on one worker (a compressed tar restarts its stream), and
    a skip set drops keys as iter_items' does."""
    inputs = kitchen_sink(tmp_path, images)
    skip = {i.ref.key for i in iter_items(inputs)}
    skip = set([i.ref.key for i in iter_items(inputs)][1::3])
    local = triples(iter_items(inputs, skip=skip.__contains__))
    planned = plan_shards(list_entries(inputs, skip=skip.__contains__), 2, first_number=7)
    assert [s.number for s in planned] == list(range(7, 7 + len(planned)))
    assert sum(len(s.entries) for s in planned) == len(local)
    reader = ShardReader()
    try:
        got = {
            s.number: triples(reader.items(Shard.from_json(s.number, s.to_json()).entries))
            for s in reversed(planned)
        }
    finally:
        reader.close()
    assert [t for n in sorted(got) for t in got[n]] == local


def test_entries_survive_json_with_undecodable_names(tmp_path, images):
    name = os.fsdecode(b"caf\xe9.png")  # not UTF-8: a surrogate escape
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(images[0])
    entries = list(list_entries([str(tmp_path / "d")]))
    shard = Shard.from_json(0, plan_shards(entries, 8, 0)[0].to_json())
    assert shard.entries == tuple(entries)
    assert next(ShardReader().items(shard.entries)).data == images[0]


def test_reader_reports_an_archive_changed_since_listing(tmp_path, images):
    z = write_zip(tmp_path / "a.zip", [("a.png", images[0])])
    entries = list(list_entries([str(z)]))
    write_zip(z, [("b.png", images[0])])
    item = next(shards.ShardReader().items(entries))
    assert item.data is None and "changed since listing" in (item.error or "")


def test_compressed_tar_members_read_backwards(tmp_path, images):
    """A worker that gets a later shard of a .tar.gz first restarts the stream for an earlier
    one, also when the stream ends in a truncation after both."""
    gz = write_tar(tmp_path / "a.tar.gz", [(f"{i}.png", d) for i, d in enumerate(images)], "w:gz")
    raw = gz.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(raw[: int(len(raw) * 0.8)])
    for path in (gz, cut):
        local = triples(iter_items([str(path)]))
        entries = list(list_entries([str(path)]))
        reader = ShardReader()
        try:
            backwards = [triples(reader.items([e]))[0] for e in reversed(entries)]
        finally:
            reader.close()
        assert backwards[::-1] == local
