"""engine/io/archive.py: keys, order and archive formats, resume, counts.

What one file or member is, why it is refused and how it is read: test_members.py."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import DEV_IMAGES

from engine.io import archive, members
from engine.io.archive import (
    ArchiveStats,
    ImageRef,
    Item,
    count_candidates,
    image_key,
    iter_items,
)

# a fixed handful: PNG and JPEG, a few tens to hundreds of kB each
IMAGE_NAMES = (
    "ieee8023-000001-12.png",
    "ieee8023-000001-17.png",
    "ieee8023-000001-2.jpg",
    "ieee8023-000001-24.jpg",
)
DICOM_LIKE = bytes(128) + b"DICM" + bytes(range(256)) * 2


def real_images() -> list[bytes]:
    """The bytes of IMAGE_NAMES; skips the calling test when the data is missing."""
    paths = [DEV_IMAGES / name for name in IMAGE_NAMES]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"real images not found under {DEV_IMAGES}")
    return [path.read_bytes() for path in paths]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return real_images()


# ---------------------------------------------------------------------------------------------
# builders


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tar_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime, info.mode = size, kind, link, 0, 0o644
    return info


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            tar.addfile(tar_info(name, len(data)), io.BytesIO(data))
    return path


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def mark_encrypted(path: Path) -> None:
    """zipfile cannot write encrypted members; set the flag bit in both headers instead."""
    raw = bytearray(path.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(signature)
        while at != -1:
            raw[at + flag_offset] |= 0x01
            at = raw.find(signature, at + 4)
    path.write_bytes(bytes(raw))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run(inputs, **kwargs) -> list[Item]:
    return list(iter_items([str(i) for i in inputs], **kwargs))


def locations(items: list[Item], base: Path) -> list[tuple[str, str | None]]:
    return [(os.path.relpath(i.ref.source, base), i.ref.member) for i in items]


def errors(items: list[Item]) -> dict[str | None, str]:
    return {i.ref.member or os.path.basename(i.ref.source): i.error for i in items if i.error}


# ---------------------------------------------------------------------------------------------
# keys


def test_image_key_follows_its_spec_and_is_pinned():
    digest = hashlib.blake2b(b"/data/batch.tar\0x/1.png").digest()
    expected = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    assert image_key("/data/batch.tar", "x/1.png") == expected
    # pinned: changing the function would orphan every key already written by earlier runs
    assert image_key("/data/batch.tar", "x/1.png") == 0x3B31E69D2F651E3B
    assert image_key("/data/a.png", None) == image_key("/data/a.png", "")
    assert image_key("/data/a.png", None) != image_key("/data", "a.png")


def test_keys_are_stable_distinct_and_fit_int64(tmp_path, images):
    write_tree(tmp_path / "d", {f"{n}.png": data for n, data in enumerate(images)})
    tar = write_tar(tmp_path / "b.tar", [("x.png", images[0]), ("y.png", images[1])])
    first, second = run([tmp_path / "d", tar]), run([tmp_path / "d", tar])
    keys = [i.ref.key for i in first]
    assert keys == [i.ref.key for i in second]
    assert len(set(keys)) == len(keys) == 6
    assert all(0 <= k < 2**63 for k in keys)
    assert all(i.ref.key == image_key(i.ref.source, i.ref.member) for i in first)


def test_same_bytes_at_two_locations_get_two_keys(tmp_path, images):
    write_tree(tmp_path, {"a/x.png": images[0], "b/x.png": images[0]})
    items = run([tmp_path])
    assert [i.data for i in items] == [images[0], images[0]]
    assert items[0].ref.key != items[1].ref.key


# ---------------------------------------------------------------------------------------------
# order and formats


def test_directory_walk_is_recursive_and_sorted_by_name(tmp_path, images):
    # created out of order; code-point order puts "B" before "a"
    files = {"c.png": images[0], "b/2.png": images[1], "a.jpg": images[2]}
    files |= {"b/1.JPEG": images[3], "B.dcm": DICOM_LIKE, "b/sub/0.png": images[0]}
    write_tree(tmp_path / "d", files)
    items = run([tmp_path / "d"])
    expected = ["B.dcm", "a.jpg", "b/1.JPEG", "b/2.png", "b/sub/0.png", "c.png"]
    assert [os.path.relpath(i.ref.source, tmp_path / "d") for i in items] == expected
    assert all(i.ref.member is None and i.error is None for i in items)
    assert items[1].data == images[2]
    assert all(os.path.isabs(i.ref.source) for i in items)


@pytest.mark.parametrize(("suffix", "mode"), [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_members_come_in_stored_order(tmp_path, images, suffix, mode):
    members = [("z.png", images[0]), ("a.jpg", images[2]), ("sub/b.png", images[1])]
    path = write_tar(tmp_path / f"batch{suffix}", members, mode)
    items = run([path])
    assert [(i.ref.member, i.data) for i in items] == members
    assert {i.ref.source for i in items} == {str(path)}


def test_zip_members_in_stored_order_and_directories_skipped(tmp_path, images):
    path = tmp_path / "batch.ZIP"  # suffix case does not matter
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("z.png", images[0])
        zf.writestr("sub/", b"")
        zf.writestr("sub/a.jpg", images[2])
    items = run([path])
    assert [(i.ref.member, i.data) for i in items] == [
        ("z.png", images[0]),
        ("sub/a.jpg", images[2]),
    ]


def test_mixed_inputs_keep_the_given_order(tmp_path, images):
    single = write_tree(tmp_path, {"single.jpg": images[2]}) / "single.jpg"
    tree = write_tree(tmp_path / "tree", {"m.png": images[0]})
    write_tar(tree / "inner.tgz", [("t.png", images[1])], "w:gz")
    write_zip(tree / "k.zip", [("z.jpg", images[3])])
    tar = write_tar(tmp_path / "last.tar", [("l.png", images[0])])
    items = run([tar, single, tree])
    assert locations(items, tmp_path) == [
        ("last.tar", "l.png"),
        ("single.jpg", None),
        ("tree/inner.tgz", "t.png"),
        ("tree/k.zip", "z.jpg"),
        ("tree/m.png", None),
    ]
    assert [i.data for i in items] == [images[0], images[2], images[1], images[3], images[0]]


def test_iteration_is_lazy_and_tar_is_read_as_a_stream(tmp_path, images, monkeypatch):
    modes = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode", args[1] if len(args) > 1 else None))
        return real_open(*args, **kwargs)

    path = write_tar(tmp_path / "s.tar.gz", [("a.png", images[0]), ("b.png", images[1])], "w:gz")
    monkeypatch.setattr(archive.tarfile, "open", spy)
    items = iter_items([str(path)])
    assert modes == []  # nothing is touched before the first next()
    assert next(items).ref.member == "a.png"
    assert modes == ["r|*"]


# ---------------------------------------------------------------------------------------------
# resume and duplicates


def test_skip_means_no_item_and_no_read(tmp_path, images, monkeypatch):
    tree = write_tree(tmp_path / "d", {"a.png": images[0], "unreadable.png": images[1]})
    tar = write_tar(tmp_path / "t.tar.gz", [(f"{n}.png", d) for n, d in enumerate(images)], "w:gz")
    zf = write_zip(tmp_path / "z.zip", [(f"{n}.png", d) for n, d in enumerate(images)])
    unreadable = str(tree / "unreadable.png")
    real_open, reads = open, []

    def guarded(path, *args, **kwargs):
        if os.fspath(path) == unreadable:
            raise PermissionError(13, "Permission denied", unreadable)
        return real_open(path, *args, **kwargs)

    def counting(stream, *args):
        reads.append(stream)
        return real_read_stream(stream, *args)

    real_read_stream = archive._read_stream
    monkeypatch.setattr(members, "open", guarded, raising=False)
    monkeypatch.setattr(archive, "_read_stream", counting)
    have = {image_key(unreadable, None)}
    have |= {image_key(str(tar), m) for m in ("0.png", "2.png")}
    have |= {image_key(str(zf), m) for m in ("1.png", "3.png")}
    stats = ArchiveStats()
    items = list(iter_items([tree, tar, zf], skip=have.__contains__, stats=stats))
    assert locations(items, tmp_path) == [
        ("d/a.png", None),
        ("t.tar.gz", "1.png"),
        ("t.tar.gz", "3.png"),
        ("z.zip", "0.png"),
        ("z.zip", "2.png"),
    ]
    assert all(i.error is None for i in items)
    assert len(reads) == 4  # only the members yielded were read
    assert stats.skipped == 5


def test_duplicates_are_dropped_silently(tmp_path, images):
    tree = write_tree(tmp_path / "d", {"a.png": images[0], "b.png": images[1]})
    tar = write_tar(tree / "t.tar", [("x.png", images[2]), ("x.png", images[3])])
    stats = ArchiveStats()
    inputs = [tree, tree / "a.png", str(tree) + "/", tar, tmp_path / "d" / ".." / "d" / "b.png"]
    items = list(iter_items(inputs, stats=stats))
    assert locations(items, tree) == [("a.png", None), ("b.png", None), ("t.tar", "x.png")]
    assert items[2].data == images[2]  # the first of two same-named members wins
    # second x.png in the walk; a.png; the whole tree again (a, b, x, x); the tar (x, x); b.png
    assert stats.duplicates == 1 + 1 + 4 + 2 + 1
    assert len({i.ref.key for i in items}) == len(items)


def test_a_bare_path_is_not_iterated_character_by_character(tmp_path, images):
    path = write_tree(tmp_path, {"a.png": images[0]}) / "a.png"
    assert [i.data for i in iter_items(str(path))] == [images[0]]
    assert [i.ref for i in iter_items(path)] == [
        ImageRef(image_key(str(path), None), str(path), None)
    ]


# ---------------------------------------------------------------------------------------------
# count_candidates


def test_count_candidates(tmp_path, images):
    tree = write_tree(tmp_path / "d", {"a.png": images[0], "b/c.jpg": images[2], ".hidden": b""})
    write_zip(tree / "z.zip", [("1.png", images[0]), ("dir/", b""), ("2.png", images[1])])
    tar = write_tar(tmp_path / "t.tar", [("x.png", images[0]), ("y.png", images[1])])
    assert count_candidates([tree, tar, tmp_path / "missing.png"]) == 2 + 2 + 2 + 1
    write_tar(tree / "late.tgz", [("g.png", images[0])], "w:gz")
    assert count_candidates([tree]) is None
    gz_as_tar = write_tar(tmp_path / "lies.tar", [("g.png", images[0])], "w:gz")
    assert count_candidates([gz_as_tar]) is None
    assert [i.ref.member for i in run([gz_as_tar])] == ["g.png"]  # r|* still reads it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_in_a_tree_is_refused_without_opening_it(tmp_path, images):
    tree = write_tree(tmp_path, {"a.png": images[0]})
    os.mkfifo(tree / "pipe.png")  # opening it for reading would block forever
    assert errors(run([tree])) == {"pipe.png": "special file refused: not a regular file"}
