"""Turn `cxr screen INPUT...` arguments into a deterministic, streaming sequence of Items.

Inputs are image files, directory trees, .tar, .tar.gz/.tgz and .zip archives, in any mix.

Order and keys
  Inputs are visited in the order given. Directories are walked depth first with the entries of
  each directory sorted by name, so the order does not depend on the filesystem. Archive members
  come in stored order. Every item has `key = image_key(source, member)`, a pure function of where
  the image lives (absolute path, symlinks not resolved, plus member name), so the same location
  gets the same key on every run and machine, and the same bytes at two locations get two keys.
  A key is yielded at most once per iteration: later duplicates (a directory and a file inside it
  both named, an archive named twice) are dropped silently.

What counts as an image
  A file named on the command line always counts (a `notes.txt` becomes an error row downstream)
  unless its name ends in an ARCHIVE_SUFFIXES entry, in which case it is expanded. A named input
  that is a symlink is followed: the user asked for it. Inside directories and archives a file
  counts when
    - its suffix is in IMAGE_SUFFIXES (any case), or
    - bytes 128..132 of it are b"DICM" (DICOM files named after their UIDs have suffixes like
      ".1234"), or
    - it has no suffix and its first 132 bytes are binary (hold a NUL byte): DICOM files often
      have no suffix, while README, SHA256SUMS or LICENSE are text and are not images.
  Archives found while walking a directory are expanded; archives inside archives are not.
  Hidden entries (name starting with ".": .DS_Store, macOS `._x.png` resource forks, .git) are
  neither read nor descended into. Everything else is ignored and counted in
  `ArchiveStats.ignored`.

Resume
  `skip(key) -> True` means the caller already has that key: nothing is yielded for it and its
  bytes are not read (a tar stream still advances past them). Error items go through skip too,
  so an error row written by an earlier run is not written again.

Errors
  Trouble with one input never raises: it becomes an Item with `error` set, and the run goes on.
  Refused: symlinks inside trees and archives (never followed), members whose path is absolute
  or contains "..", tar hard links, devices and fifos, encrypted zip members, files above
  `max_file_bytes`. A nonexistent or unreadable input, an unreadable directory and a corrupt or
  truncated archive each give one error item, and iteration continues with what follows.

Memory
  Nothing is extracted to disk; members are read into memory one at a time. Tar archives are read
  in one sequential pass (mode "r|*"), so a .tar.gz is never decompressed twice or seeked in.
  What grows with the input is the set of keys already seen (per item: docs/measurements.md).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.errors import ConfigError
from engine.io.members import (
    _ARCHIVE_ERRORS,
    _SPECIAL,
    _ZIP_MEMBER_ERRORS,
    ARCHIVE_SUFFIXES,
    IMAGE_SUFFIXES,
    _forget_members,
    _is_archive_name,
    _kind,
    _read_file,
    _read_stream,
    _symlink_message,
    _tar_refusal,
    _unsafe_reason,
    _why,
    _zip_refusal,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DEFAULT_MAX_FILE_BYTES",
    "IMAGE_SUFFIXES",
    "ArchiveStats",
    "ImageRef",
    "Item",
    "count_candidates",
    "image_key",
    "iter_items",
]

DEFAULT_MAX_FILE_BYTES = 1 << 30

_KEY_MASK = (1 << 63) - 1
_COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")


@dataclass(frozen=True, slots=True)
class ImageRef:
    key: int
    source: str
    member: str | None


@dataclass(frozen=True, slots=True)
class Item:
    ref: ImageRef
    data: bytes | None
    error: str | None


@dataclass(slots=True)
class ArchiveStats:
    """Counts filled in while `iter_items` runs; final once the iterator is exhausted.

    ignored: files and members that are not images (labels.csv, README, nested archives,
        hidden entries; a hidden directory counts once).
    skipped: keys for which `skip(key)` returned True.
    duplicates: keys dropped because they were already yielded in this iteration.
    empty_inputs: inputs (absolute paths) that held no image at all: nothing yielded, skipped
        or dropped as a duplicate (an empty directory, one of text files, an empty archive).
    """

    ignored: int = 0
    skipped: int = 0
    duplicates: int = 0
    empty_inputs: list[str] = field(default_factory=list)


def image_key(source: str, member: str | None) -> int:
    """Stable 63-bit key of an image location: fits uint64 and int64 columns alike."""
    location = f"{source}\0{member or ''}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(location).digest()
    return int.from_bytes(digest[:8], "little") & _KEY_MASK


def iter_items(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    skip: Callable[[int], bool] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    stats: ArchiveStats | None = None,
) -> Iterator[Item]:
    """Yield one Item per image (or per unreadable input) in deterministic order.

    Pass an `ArchiveStats` as `stats` to learn how many files were ignored, skipped or dropped
    as duplicates. Raises ConfigError at once (not on first `next`) for a bad max_file_bytes.
    """
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int):
        raise ConfigError(f"max_file_bytes must be an integer, got {max_file_bytes!r}")
    if max_file_bytes < 1:
        raise ConfigError(f"max_file_bytes must be at least 1, got {max_file_bytes}")
    walker = _Walker(skip, max_file_bytes, stats if stats is not None else ArchiveStats())
    return walker.run(_as_list(inputs))


def count_candidates(inputs: Iterable[str | os.PathLike[str]]) -> int | None:
    """Cheap total for a progress bar, or None where counting means decompressing (.tar.gz/.tgz).

    Counts every non-hidden file in directories and member of zip and uncompressed tar
    archives, without reading or deduplicating, so it may exceed what `iter_items` yields by the
    ignored files (labels.csv ...). A missing or unreadable input counts 1, like its error item.
    """
    total = 0
    for raw in _as_list(inputs):
        path = _abspath(raw)
        if os.path.isdir(path):
            found = _count_tree(path)
        elif _is_archive_name(path):
            found = _count_archive(path)
        else:
            found = 1
        if found is None:
            return None
        total += found
    return total


# ---------------------------------------------------------------------------------------------
# inputs and the directory walk


class _Unlistable(NamedTuple):
    path: str
    reason: str


def _as_list(inputs: Iterable[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    # a bare path is a Sequence[str] too; iterating its characters would be a silent mess
    if isinstance(inputs, str | bytes | os.PathLike):
        return [inputs]
    return list(inputs)


def _abspath(raw: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fsdecode(os.fspath(raw)))


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda entry: entry.name)


def _walk(root: str) -> Iterator[os.DirEntry[str] | _Unlistable]:
    """Depth-first, name-sorted; yields every non-directory entry plus hidden and symlinked
    directories (which the caller ignores or refuses); never follows a symlink."""
    try:
        stack = [iter(_sorted_entries(root))]
    except OSError as exc:
        yield _Unlistable(root, f"cannot list directory: {_why(exc)}")
        return
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            yield entry
            continue
        try:
            stack.append(iter(_sorted_entries(entry.path)))
        except OSError as exc:
            yield _Unlistable(entry.path, f"cannot list directory: {_why(exc)}")


# ---------------------------------------------------------------------------------------------
# iteration


@dataclass(slots=True)
class _Walker:
    skip: Callable[[int], bool] | None
    max_bytes: int
    stats: ArchiveStats
    seen: set[int] = field(default_factory=set)

    def run(self, inputs: Sequence[str | os.PathLike[str]]) -> Iterator[Item]:
        for raw in inputs:
            path = _abspath(raw)
            seen_before = self._accounted()
            yielded = False
            for item in self._input(path):
                yielded = True
                yield item
            if not yielded and self._accounted() == seen_before:
                self.stats.empty_inputs.append(path)

    def _accounted(self) -> int:
        return self.stats.skipped + self.stats.duplicates

    def _claim(self, key: int) -> bool:
        """True when `key` should produce an item now. Checked before any read, so a skipped
        or duplicate image costs no I/O."""
        if key in self.seen:
            self.stats.duplicates += 1
            return False
        self.seen.add(key)
        if self.skip is not None and self.skip(key):
            self.stats.skipped += 1
            return False
        return True

    def _error(self, source: str, member: str | None, message: str) -> Iterator[Item]:
        key = image_key(source, member)
        if self._claim(key):
            yield Item(ImageRef(key, source, member), None, message)

    def _input(self, path: str) -> Iterator[Item]:
        try:
            mode = os.stat(path).st_mode  # follows a named symlink on purpose
        except FileNotFoundError:
            yield from self._error(path, None, "no such file or directory")
            return
        except OSError as exc:
            yield from self._error(path, None, f"cannot read: {_why(exc)}")
            return
        if stat.S_ISDIR(mode):
            yield from self._tree(path)
        elif not stat.S_ISREG(mode):
            yield from self._error(path, None, "not a regular file")
        elif _is_archive_name(path):
            yield from self._archive(path)
        else:
            yield from self._plain(path, "image")  # named files always count

    def _tree(self, root: str) -> Iterator[Item]:
        for entry in _walk(root):
            if isinstance(entry, _Unlistable):
                yield from self._error(entry.path, None, entry.reason)
            else:
                yield from self._dir_entry(entry)

    def _dir_entry(self, entry: os.DirEntry[str]) -> Iterator[Item]:
        kind = _kind(entry.name)
        if kind == "hidden":
            self.stats.ignored += 1
        elif entry.is_symlink():
            yield from self._error(entry.path, None, _symlink_message(entry.path))
        elif not entry.is_file(follow_symlinks=False):
            # opening a fifo would block the whole run
            yield from self._error(entry.path, None, _SPECIAL)
        elif kind == "archive":
            yield from self._archive(entry.path)
        else:
            yield from self._plain(entry.path, kind)

    def _plain(self, path: str, kind: str) -> Iterator[Item]:
        key = image_key(path, None)
        if not self._claim(key):
            return
        data, error = _read_file(path, self.max_bytes, kind)
        if data is None and error is None:
            self.seen.discard(key)  # not an image after all; a later explicit mention counts
            self.stats.ignored += 1
            return
        yield Item(ImageRef(key, path, None), data, error)

    def _archive(self, path: str) -> Iterator[Item]:
        if path.lower().endswith(".zip"):
            yield from self._zip(path)
        else:
            yield from self._tar(path)

    # -- tar ----------------------------------------------------------------------------------

    def _tar(self, path: str) -> Iterator[Item]:
        try:
            # opened apart from the `with` below so an open failure gets its own message
            archive = tarfile.open(path, mode="r|*")  # noqa: SIM115
        except _ARCHIVE_ERRORS as exc:
            yield from self._error(path, None, f"cannot open archive: {_why(exc)}")
            return
        with archive:
            yield from self._tar_members(path, archive)

    def _tar_members(self, path: str, archive: tarfile.TarFile) -> Iterator[Item]:
        """Every member's item in stored order; a read error ends the archive with one error
        item that says where (the shard listing runs this loop on a tar opened for seeking)."""
        where = "at the start"
        while True:
            try:
                member = archive.next()
                if member is None:
                    return
                _forget_members(archive)
                where = f"at member {member.name!r}"
                item = self._tar_member(path, archive, member)
                where = f"after member {member.name!r}"
            except _ARCHIVE_ERRORS as exc:
                message = f"corrupt or truncated archive {where}: {_why(exc)}"
                yield from self._error(path, None, message)
                return
            if item is not None:
                yield item

    def _tar_member(
        self, path: str, archive: tarfile.TarFile, member: tarfile.TarInfo
    ) -> Item | None:
        """Read errors propagate: after one, the tar stream cannot go on."""
        if member.isdir():
            return None

        def read() -> tuple[bytes | None, str | None]:
            stream = archive.extractfile(member)
            if stream is None:  # only regular members reach here; keep the type checker honest
                return None, "cannot read member: no data"
            return _read_stream(stream, member.size, self.max_bytes, _kind(member.name))

        return self._member(path, member.name, _tar_refusal(member), read)

    # -- zip ----------------------------------------------------------------------------------

    def _zip(self, path: str) -> Iterator[Item]:
        try:
            archive = zipfile.ZipFile(path)
        except _ARCHIVE_ERRORS as exc:
            yield from self._error(path, None, f"corrupt or unreadable archive: {_why(exc)}")
            return
        with archive:
            for info in archive.infolist():
                item = self._zip_member(path, archive, info)
                if item is not None:
                    yield item

    def _zip_member(
        self, path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo
    ) -> Item | None:
        if info.is_dir():
            return None

        def read() -> tuple[bytes | None, str | None]:
            kind = _kind(info.filename)
            try:
                with archive.open(info) as stream:
                    return _read_stream(stream, info.file_size, self.max_bytes, kind)
            except _ZIP_MEMBER_ERRORS as exc:
                # zip members are independent: a bad one does not stop the rest
                return None, f"cannot read member: {_why(exc)}"

        return self._member(path, info.filename, _zip_refusal(info), read)

    # -- shared by tar and zip ----------------------------------------------------------------

    def _member(
        self,
        path: str,
        name: str,
        refusal: str | None,
        read: Callable[[], tuple[bytes | None, str | None]],
    ) -> Item | None:
        kind = _kind(name)
        unsafe = _unsafe_reason(name)
        if unsafe is not None:
            # flagged even where the name would be ignored: only broken or hostile archives
            # carry such names, and the user should hear about it
            refusal = f"unsafe member path {name!r}: {unsafe}"
        elif kind == "hidden" or (kind == "archive" and refusal is None):
            self.stats.ignored += 1
            return None
        key = image_key(path, name)
        if not self._claim(key):
            return None
        if refusal is not None:
            return Item(ImageRef(key, path, name), None, refusal)
        data, error = read()
        if data is None and error is None:
            self.seen.discard(key)  # not an image after all
            self.stats.ignored += 1
            return None
        return Item(ImageRef(key, path, name), data, error)


# ---------------------------------------------------------------------------------------------
# counting


def _count_tree(root: str) -> int | None:
    total = 0
    for entry in _walk(root):
        if isinstance(entry, _Unlistable):
            total += 1
            continue
        kind = _kind(entry.name)
        if kind == "hidden":
            continue
        if kind == "archive" and entry.is_file(follow_symlinks=False):
            found = _count_archive(entry.path)
            if found is None:
                return None
            total += found
        else:
            total += 1
    return total


def _count_archive(path: str) -> int | None:
    if path.lower().endswith(_COMPRESSED_TAR_SUFFIXES):
        return None
    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                return sum(
                    1 for info in archive.infolist() if _countable(info.filename, info.is_dir())
                )
        return _count_tar(path)
    except _ARCHIVE_ERRORS:
        return 1  # the error item iter_items will yield


def _count_tar(path: str) -> int | None:
    total = 0
    try:
        # "r:" seeks over member data instead of reading it, and refuses compressed bytes
        with tarfile.open(path, mode="r:") as archive:
            while (member := archive.next()) is not None:
                _forget_members(archive)
                total += _countable(member.name, member.isdir())
    except tarfile.ReadError:
        return None  # compressed under a .tar name, or corrupt: no cheap answer
    return total


def _countable(name: str, is_dir: bool) -> bool:
    return not is_dir and _kind(name) not in ("hidden", "archive")
