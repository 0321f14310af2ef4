"""engine/io/members.py: which files and archive members count as images, why one is refused
(unsafe paths, links, devices, encryption, size), and what a read that fails becomes: one error
item, and the run goes on. Through iter_items, as a run sees them."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest
from test_archive import (
    DICOM_LIKE,
    errors,
    listing,
    locations,
    mark_encrypted,
    real_images,
    run,
    tar_info,
    write_tar,
    write_tree,
    write_zip,
)

from engine.errors import ConfigError
from engine.io import members
from engine.io.archive import ArchiveStats, iter_items


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return real_images()


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
