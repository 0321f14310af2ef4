"""Shards: the unit of work of a cluster run, listed on the driver and read on the workers.

A shard is a numbered list of image locations (`Entry`) that becomes one Parquet part, its
thumbnails and its embedding sidecar, all named after the shard's number, so that a retried
shard replaces its own files and can never duplicate a row.

Listing (`list_entries`, on the driver) walks the inputs exactly as `iter_items` does (same
order, keys, duplicates, hidden and non-image files, refusals, error items), but reads no image
bytes: only the first bytes of files whose suffix does not tell (the DICOM sniff), and tar
headers. An uncompressed tar is listed by seeking from header to header, and each member's data
offset is recorded, so the worker that screens it reads exactly its bytes. A compressed tar
(.tar.gz/.tgz) cannot be seeked in: it is decompressed once on the driver to list it, and each
worker streams it from the start up to its shard's members (prefer .tar, zip or directories for
large cluster runs). Zip members are found through the zip's central directory.

Reading (`ShardReader`, on a worker) turns a shard's entries back into `Item`s with the same
bytes and, for unreadable images, the same messages as a local run would produce, so the rows
of a cluster run equal a local run's.
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from engine.io.archive import (
    DEFAULT_MAX_FILE_BYTES,
    ArchiveStats,
    ImageRef,
    Item,
    _as_list,
    _Walker,
    image_key,
)
from engine.io.members import (
    _ARCHIVE_ERRORS,
    _PEEK,
    _SNIFFED,
    _ZIP_MEMBER_ERRORS,
    _forget_members,
    _kind,
    _read_file,
    _read_stream,
    _sniff,
    _tar_refusal,
    _too_big,
    _why,
    _zip_refusal,
)

__all__ = ["Entry", "Shard", "ShardReader", "list_entries", "plan_shards"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One image of a shard: where it is, and what the driver already knows about it."""

    key: int
    source: str
    member: str | None
    error: str | None = None  # known on the driver (refused member, unreadable input ...)
    offset: int = -1  # uncompressed tar: where the member's data starts; else -1
    size: int = -1  # tar and zip members: the stored size; else -1

    @property
    def ref(self) -> ImageRef:
        return ImageRef(self.key, self.source, self.member)


@dataclass(frozen=True, slots=True)
class Shard:
    number: int  # its part's number: part-NNNNN.parquet, thumbs and sidecar alike
    entries: tuple[Entry, ...]

    def to_json(self) -> str:
        # ASCII JSON: file names that are not UTF-8 (surrogate escapes) survive the trip
        rows = [[e.key, e.source, e.member, e.error, e.offset, e.size] for e in self.entries]
        return json.dumps(rows, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, number: int, text: str) -> Shard:
        return cls(number, tuple(Entry(*row) for row in json.loads(text)))


def list_entries(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    skip: Callable[[int], bool] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    stats: ArchiveStats | None = None,
) -> Iterator[Entry]:
    """The entries `iter_items` would yield items for, in its order, without the image bytes."""
    lister = _Lister(skip, max_file_bytes, stats if stats is not None else ArchiveStats())
    for item in lister.run(_as_list(inputs)):
        ref = item.ref
        if isinstance(item, _Listed):
            yield Entry(ref.key, ref.source, ref.member, None, item.offset, item.size)
        else:
            yield Entry(ref.key, ref.source, ref.member, item.error or "no data")


def plan_shards(entries: Iterable[Entry], shard_size: int, first_number: int) -> list[Shard]:
    """Consecutive runs of `shard_size` entries, numbered from `first_number`."""
    shards: list[Shard] = []
    chunk: list[Entry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == shard_size:
            shards.append(Shard(first_number + len(shards), tuple(chunk)))
            chunk = []
    if chunk:
        shards.append(Shard(first_number + len(shards), tuple(chunk)))
    return shards


# ---------------------------------------------------------------------------------------------
# listing


@dataclass(frozen=True, slots=True)
class _Listed(Item):
    """An image whose bytes are left to the worker (data stays None)."""

    offset: int = -1
    size: int = -1


_UNREAD = b""  # what the listing's read callables return for "an image, read it later"


@dataclass(slots=True)
class _Lister(_Walker):
    """`_Walker` with its three reads replaced by sniffs: order, keys and refusals are its own."""

    seekable: bool = False  # the tar being listed was opened for seeking ("r:")
    tar_size: int = 0

    def _plain(self, path: str, kind: str) -> Iterator[Item]:
        key = self._claim_plain(path)
        if key is None:
            return
        if kind in _SNIFFED:
            head, error = _peek_file(path)
            if error is not None:
                yield Item(ImageRef(key, path, None), None, error)
                return
            if not _sniff(kind, head):
                self.seen.discard(key)  # not an image after all (as _Walker._plain)
                self.stats.ignored += 1
                return
        yield _Listed(ImageRef(key, path, None), None, None)

    def _claim_plain(self, path: str) -> int | None:
        key = image_key(path, None)
        return key if self._claim(key) else None

    def _tar(self, path: str) -> Iterator[Item]:
        try:
            archive = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below
        except _ARCHIVE_ERRORS:
            # compressed, or not a tar at all: the stream walk lists it (and words its error)
            self.seekable = False
            yield from _Walker._tar(self, path)
            return
        self.seekable = True
        self.tar_size = os.path.getsize(path)
        with archive:
            yield from self._tar_members(path, archive)
        self.seekable = False

    def _tar_member(
        self, path: str, archive: tarfile.TarFile, member: tarfile.TarInfo
    ) -> Item | None:
        if member.isdir():
            return None
        kind = _kind(member.name)

        def read() -> tuple[bytes | None, str | None]:
            if kind in _SNIFFED:
                stream = archive.extractfile(member)
                if stream is None:
                    return None, "cannot read member: no data"
                if not _sniff(kind, stream.read(_PEEK)):
                    return None, None
            if self.seekable:
                if member.offset_data + member.size > self.tar_size:
                    # what the stream walk meets reading this member's data
                    raise tarfile.ReadError("unexpected end of data")
            elif member.size <= self.max_bytes:
                # A stream is decompressed past the data anyway; reading it here meets a
                # truncation exactly where iter_items meets it, with the same message.
                _drain(archive.extractfile(member))
            return _UNREAD, None

        item = self._member(path, member.name, _tar_refusal(member), read)
        if item is None or item.data is None:
            return item
        offset = member.offset_data if self.seekable else -1
        return _Listed(item.ref, None, None, offset, member.size)

    def _zip_member(
        self, path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo
    ) -> Item | None:
        if info.is_dir():
            return None
        kind = _kind(info.filename)

        def read() -> tuple[bytes | None, str | None]:
            if kind in _SNIFFED:
                try:
                    with archive.open(info) as stream:
                        head = stream.read(_PEEK)
                except _ZIP_MEMBER_ERRORS as exc:
                    return None, f"cannot read member: {_why(exc)}"
                if not _sniff(kind, head):
                    return None, None
            return _UNREAD, None

        item = self._member(path, info.filename, _zip_refusal(info), read)
        if item is None or item.data is None:
            return item
        return _Listed(item.ref, None, None, -1, info.file_size)


def _drain(stream: IO[bytes] | None) -> None:
    while stream is not None and stream.read(1 << 20):
        pass


def _peek_file(path: str) -> tuple[bytes, str | None]:
    """The first bytes of a file, or the error `_read_file` would give for it."""
    try:
        with open(path, "rb") as stream:
            return stream.read(_PEEK), None
    except FileNotFoundError:
        return b"", "no such file or directory"
    except OSError as exc:
        return b"", f"cannot read: {_why(exc)}"


# ---------------------------------------------------------------------------------------------
# reading (on the worker)


class ShardReader:
    """Reads shards' entries back into Items; keeps a few archives open between shards."""

    KEEP_OPEN = 4

    def __init__(self, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.limit = max_file_bytes
        self._open: dict[str, _OpenArchive] = {}

    def items(self, entries: Iterable[Entry]) -> Iterator[Item]:
        for entry in entries:
            yield Item(entry.ref, *self._read(entry))

    def close(self) -> None:
        for archive in self._open.values():
            archive.close()
        self._open.clear()

    def _read(self, e: Entry) -> tuple[bytes | None, str | None]:
        if e.error is not None:
            return None, e.error
        if e.member is None:
            return _read_file(e.source, self.limit, "image")
        if e.size > self.limit:
            return None, _too_big(e.size, self.limit)
        try:
            archive = self._archive(e.source)
        except _ARCHIVE_ERRORS as exc:
            return None, f"cannot open archive: {_why(exc)}"
        return archive.read(e, self.limit)

    def _archive(self, source: str) -> _OpenArchive:
        archive = self._open.pop(source, None)
        if archive is None:
            if source.lower().endswith(".zip"):
                archive = _ZipArchive(source)
            else:
                archive = _TarArchive(source)
            while len(self._open) >= self.KEEP_OPEN:
                self._open.pop(next(iter(self._open))).close()
        self._open[source] = archive  # most recently used last
        return archive


class _OpenArchive:
    def read(self, e: Entry, limit: int) -> tuple[bytes | None, str | None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ZipArchive(_OpenArchive):
    def __init__(self, path: str) -> None:
        self.zip = zipfile.ZipFile(path)
        self.first: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():  # the first of equal names, as the listing kept it
            self.first.setdefault(info.filename, info)

    def read(self, e: Entry, limit: int) -> tuple[bytes | None, str | None]:
        info = self.first.get(e.member or "")
        if info is None:
            return None, "cannot read member: no longer in the archive (changed since listing?)"
        try:
            with self.zip.open(info) as stream:
                return _read_stream(stream, info.file_size, limit, "image")
        except _ZIP_MEMBER_ERRORS as exc:
            return None, f"cannot read member: {_why(exc)}"

    def close(self) -> None:
        self.zip.close()


class _TarArchive(_OpenArchive):
    """Seeks to recorded offsets; a compressed tar is streamed, forward, to the member."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.stream: tarfile.TarFile | None = None

    def read(self, e: Entry, limit: int) -> tuple[bytes | None, str | None]:
        if e.offset >= 0:
            self.file.seek(e.offset)
            data = self.file.read(e.size)
            if len(data) < e.size:
                return None, (
                    f"corrupt or truncated archive at member {e.member!r}: unexpected end of data"
                )
            return data, None
        # Shards list members in stream order, so one pass serves a shard; a member before the
        # stream's position (another shard ran first on this worker) restarts it, once.
        for restart in (False, True):
            fresh = restart or self.stream is None
            if fresh:
                self._drop_stream()
            try:
                found = self._forward_to(e, limit)
            except _ARCHIVE_ERRORS as exc:
                self._drop_stream()
                if fresh:
                    return None, f"corrupt or truncated archive at member {e.member!r}: {_why(exc)}"
                continue
            if found is not None:
                return found
            if fresh:
                break
        self._drop_stream()
        return None, "cannot read member: no longer in the archive (changed since listing?)"

    def _forward_to(self, e: Entry, limit: int) -> tuple[bytes | None, str | None] | None:
        """The member's read from the stream's position on; None at the stream's end."""
        if self.stream is None:
            self.stream = tarfile.open(self.path, mode="r|*")  # noqa: SIM115 - closed by _drop
        while (member := self.stream.next()) is not None:
            _forget_members(self.stream)
            if member.name == e.member and member.isreg():
                data = self.stream.extractfile(member)
                if data is None:
                    return None, "cannot read member: no data"
                return _read_stream(data, member.size, limit, "image")
        return None

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def close(self) -> None:
        self._drop_stream()
        self.file.close()
