"""engine/io/archive.py: order, keys, archive formats, refusals, resume, limits."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import DEV_IMAGES

from engine.errors import ConfigError
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


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    paths = [DEV_IMAGES / name for name in IMAGE_NAMES]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"real images not found under {DEV_IMAGES}")
    return [path.read_bytes() for path in paths]


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
# which files count


def test_non_images_are_ignored_and_counted(tmp_path, images):
    files = {"a.png": images[0], "labels.csv": b"name,label\n", "SHA256SUMS": b"00  a.png\n"}
    files |= {"README": b"read me\n", ".DS_Store": b"\0\0\0\1Bud1", "._a.png": b"\0\5\26\7"}
    files |= {".git/config": b"[core]\n", "notes.bin": b"x" * 200}
    write_tree(tmp_path / "d", files)
    stats = ArchiveStats()
    items = list(iter_items([tmp_path / "d"], stats=stats))
    assert [os.path.basename(i.ref.source) for i in items] == ["a.png"]
    # labels.csv, SHA256SUMS, README, notes.bin, .DS_Store, ._a.png, .git (once)
    assert stats.ignored == 7


def test_dicom_magic_and_binary_bare_names_count(tmp_path):
    bare_dicom_no_preamble = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
    files = {
        "scan.bin": DICOM_LIKE,
        "1.2.840.10008.5": DICOM_LIKE,
        "IM0001": bare_dicom_no_preamble,
    }
    files |= {"other.bin": bytes(200), "LICENSE": b"text\n"}
    write_tree(tmp_path, files)
    stats = ArchiveStats()
    items = list(iter_items([tmp_path], stats=stats))
    assert [os.path.basename(i.ref.source) for i in items] == [
        "1.2.840.10008.5",
        "IM0001",
        "scan.bin",
    ]
    assert items[2].data == DICOM_LIKE  # the peeked bytes are not lost
    assert stats.ignored == 2


def test_dicom_magic_inside_archives(tmp_path):
    members = [("scan.bin", DICOM_LIKE), ("labels.csv", b"a,b\n"), ("IM1", b"\x08\x00\x10\x00")]
    tar = write_tar(tmp_path / "a.tar.gz", members, "w:gz")
    zf = write_zip(tmp_path / "a.zip", members)
    stats = ArchiveStats()
    items = list(iter_items([tar, zf], stats=stats))
    assert [(i.ref.member, i.data) for i in items] == [members[0], members[2]] * 2
    assert stats.ignored == 2


def test_explicit_file_always_counts_even_if_not_an_image(tmp_path):
    notes = write_tree(tmp_path, {"notes.txt": b"hello"}) / "notes.txt"
    # first seen (and ignored) inside the walk, then named: the naming still counts
    items = run([tmp_path, notes])
    assert [(i.ref.source, i.data) for i in items] == [(str(notes), b"hello")]


def test_nested_archives_are_not_expanded(tmp_path, images):
    inner = write_tar(tmp_path / "inner.tar", [("i.png", images[0])])
    outer = write_zip(
        tmp_path / "outer.zip", [("inner.tar", inner.read_bytes()), ("o.png", images[1])]
    )
    stats = ArchiveStats()
    items = list(iter_items([outer], stats=stats))
    assert [i.ref.member for i in items] == ["o.png"]
    assert stats.ignored == 1


# ---------------------------------------------------------------------------------------------
# refusals and errors


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_unsafe_member_paths_are_refused_and_nothing_is_written(tmp_path, images, fmt):
    work = tmp_path / "work"
    work.mkdir()
    members = [("../x.png", images[0]), ("/abs/x.png", images[1]), ("ok.png", images[2])]
    members += [("a/../../y.png", images[3]), ("../labels.csv", b"a,b\n")]
    builder = write_tar if fmt == "tar" else write_zip
    path = builder(work / f"evil.{fmt}", members)
    outside = tmp_path.parent
    before, abs_existed = listing(outside), os.path.exists("/abs")
    items = run([path])
    assert [i.ref.member for i in items] == [m for m, _ in members]
    bad = errors(items)
    assert bad["../x.png"] == "unsafe member path '../x.png': contains '..'"
    assert bad["/abs/x.png"] == "unsafe member path '/abs/x.png': absolute"
    assert bad["a/../../y.png"].startswith("unsafe member path")
    assert bad["../labels.csv"].startswith("unsafe member path")
    assert "ok.png" not in bad and items[2].data == images[2]
    assert all(i.data is None for i in items if i.error)
    assert listing(outside) == before
    assert listing(work) == [f"evil.{fmt}"]
    assert os.path.exists("/abs") == abs_existed


def test_symlinks_inside_a_tree_are_refused_not_followed(tmp_path, images):
    target = write_tree(tmp_path / "elsewhere", {"secret.png": images[0]})
    tree = write_tree(tmp_path / "d", {"a.png": images[1]})
    (tree / "link.png").symlink_to(target / "secret.png")
    (tree / "linkdir").symlink_to(target, target_is_directory=True)
    (tree / "dangling.png").symlink_to(tmp_path / "missing.png")
    items = run([tree])
    assert locations(items, tree) == [
        ("a.png", None),
        ("dangling.png", None),
        ("link.png", None),
        ("linkdir", None),
    ]
    assert items[0].data == images[1]
    for item in items[1:]:
        assert item.data is None
        assert item.error.startswith("symlink refused")
    assert str(target / "secret.png") in errors(items)["link.png"]


def test_a_symlink_named_explicitly_is_followed_without_resolving_the_source(tmp_path, images):
    real = write_tree(tmp_path / "real", {"a.png": images[0]})
    (tmp_path / "alias.png").symlink_to(real / "a.png")
    (tmp_path / "aliasdir").symlink_to(real, target_is_directory=True)
    items = run([tmp_path / "alias.png", tmp_path / "aliasdir"])
    assert locations(items, tmp_path) == [("alias.png", None), ("aliasdir/a.png", None)]
    assert [i.data for i in items] == [images[0], images[0]]


def test_tar_links_devices_and_fifos_are_refused(tmp_path, images):
    path = tmp_path / "special.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(tar_info("a.png", len(images[0])), io.BytesIO(images[0]))
        tar.addfile(tar_info("sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd"))
        tar.addfile(tar_info("hard.png", kind=tarfile.LNKTYPE, link="a.png"))
        tar.addfile(tar_info("dev", kind=tarfile.CHRTYPE))
        tar.addfile(tar_info("pipe", kind=tarfile.FIFOTYPE))
        tar.addfile(tar_info("b.png", len(images[1])), io.BytesIO(images[1]))
    items = run([path])
    assert [i.ref.member for i in items] == ["a.png", "sym.png", "hard.png", "dev", "pipe", "b.png"]
    assert errors(items) == {
        "sym.png": "symlink refused: points to '/etc/passwd' and is not followed",
        "hard.png": "hard link refused: links to 'a.png'",
        "dev": "device refused: not a regular file",
        "pipe": "fifo refused: not a regular file",
    }
    assert items[-1].data == images[1]


def test_zip_symlink_and_encrypted_members_are_refused(tmp_path, images):
    path = tmp_path / "special.zip"
    with zipfile.ZipFile(path, "w") as zf:
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3  # unix, so external_attr carries the file type
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("a.png", images[0])
    items = run([path])
    assert errors(items) == {
        "link.png": "symlink refused: zip member is a symlink and is not followed"
    }
    assert items[1].data == images[0]

    mark_encrypted(path)
    assert errors(run([path])) == {
        "link.png": "symlink refused: zip member is a symlink and is not followed",
        "a.png": "encrypted member: cannot read without a password",
    }


def test_nonexistent_input_is_an_error_and_the_run_goes_on(tmp_path, images):
    good = write_tree(tmp_path, {"a.png": images[0]}) / "a.png"
    items = run([tmp_path / "missing.png", good])
    assert (items[0].ref.source, items[0].ref.member) == (str(tmp_path / "missing.png"), None)
    assert (items[0].data, items[0].error) == (None, "no such file or directory")
    assert items[1].data == images[0]


def test_truncated_targz_gives_an_error_and_the_next_input_is_read(tmp_path, images):
    members = [(f"{n}.png", data) for n, data in enumerate(images)]
    full = write_tar(tmp_path / "full.tar.gz", members, "w:gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full[: len(full) // 2])
    good = write_tree(tmp_path, {"after.png": images[0]}) / "after.png"
    items = run([cut, good])
    assert [i.ref.source for i in items[-2:]] == [str(cut), str(good)]
    broken = items[-2]
    assert broken.ref.member is None and broken.data is None
    assert broken.error.startswith("corrupt or truncated archive at member ")
    assert all(i.error is None and i.data == dict(members)[i.ref.member] for i in items[:-2])
    assert items[-1].data == images[0]


@pytest.mark.parametrize("name", ["junk.zip", "junk.tar", "junk.tgz", "empty.tar"])
def test_corrupt_archives_give_one_error_item(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not an archive" * 50)
    items = run([path])
    assert len(items) == 1
    assert (items[0].ref.member, items[0].data) == (None, None)
    assert items[0].error.startswith(("corrupt", "cannot open archive"))


def test_permission_denied_becomes_an_error_item(tmp_path, images, monkeypatch):
    locked = write_tree(tmp_path, {"locked.png": images[0], "ok.png": images[1]}) / "locked.png"
    real_open = open

    def deny(path, *args, **kwargs):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(members, "open", deny, raising=False)
    items = run([tmp_path])
    assert errors(items) == {"locked.png": "cannot read: permission denied"}
    assert items[1].data == images[1]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_real_permission_denied(tmp_path, images):
    locked = write_tree(tmp_path, {"locked.png": images[0]}) / "locked.png"
    locked.chmod(0)
    try:
        assert errors(run([locked])) == {"locked.png": "cannot read: permission denied"}
    finally:
        locked.chmod(0o644)


def test_max_file_bytes_is_enforced_everywhere(tmp_path, images):
    small, big = images[3], images[1]  # 38883 and 136146 bytes
    limit = 100_000
    write_tree(tmp_path / "d", {"small.jpg": small, "big.png": big})
    tar = write_tar(tmp_path / "a.tar.gz", [("big.png", big), ("small.jpg", small)], "w:gz")
    zf = write_zip(tmp_path / "a.zip", [("big.png", big), ("small.jpg", small)])
    items = run([tmp_path / "d", tar, zf], max_file_bytes=limit)
    message = f"file is {len(big)} bytes, above the limit of {limit}"
    assert [(i.ref.member or os.path.basename(i.ref.source), i.error) for i in items] == [
        ("big.png", message),
        ("small.jpg", None),
        ("big.png", message),
        ("small.jpg", None),
        ("big.png", message),
        ("small.jpg", None),
    ]
    assert all(i.data == small for i in items if i.error is None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_file_bytes_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="max_file_bytes"):
        iter_items([], max_file_bytes=bad)


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
