"""One input file or archive member: what it is, why it is refused, and reading its bytes.

engine/io/archive.py's walk (`iter_items`) and engine/io/shards.py's listing and reader decide on
and read every file and member with these, so a local run and a cluster run give the same items
and the same messages. The rules (what counts as an image, what is refused) are stated in
archive.py's docstring. The private names are the io package's own, not an API.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from typing import IO

try:
    import lzma

    _LZMA_ERRORS: tuple[type[Exception], ...] = (lzma.LZMAError,)
except ImportError:  # Python built without liblzma: tarfile cannot open .xz then either
    _LZMA_ERRORS = ()

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

_PEEK = 132
_SNIFFED = frozenset({"bare", "other"})
_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,  # zip compression methods zipfile lacks (deflate64, ...)
    *_LZMA_ERRORS,
)
_ZIP_MEMBER_ERRORS: tuple[type[Exception], ...] = (*_ARCHIVE_ERRORS, RuntimeError)


# ---------------------------------------------------------------------------------------------
# classification


def _basename(name: str) -> str:
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _kind(name: str) -> str:
    """'hidden', 'archive', 'image' (the name decides), or 'bare' (no suffix) and 'other',
    where the first bytes decide (see _sniff)."""
    base = _basename(name)
    if base.startswith("."):
        return "hidden"
    if _is_archive_name(base):
        return "archive"
    suffix = os.path.splitext(base)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return "bare" if suffix == "" else "other"


def _sniff(kind: str, head: bytes) -> bool:
    """Whether a 'bare' or 'other' file is an image, from its first _PEEK bytes."""
    if head[128:132] == b"DICM":
        return True
    # every image format we read has NUL bytes in its first header fields; text files do not
    return kind == "bare" and b"\0" in head


def _unsafe_reason(name: str) -> str | None:
    """Why a member name could escape an extraction root, even though we never extract:
    such names only come from broken or hostile archives, so the archive deserves a flag."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
        return "absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return "contains '..'"
    return None


# ---------------------------------------------------------------------------------------------
# messages and refusals


def _why(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _too_big(size: int, limit: int) -> str:
    return f"file is {size} bytes, above the limit of {limit}"


_SPECIAL = "special file refused: not a regular file"


def _symlink_message(path: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"symlink refused: points to {target!r} and is not followed"


def _tar_refusal(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"symlink refused: points to {member.linkname!r} and is not followed"
    if member.islnk():
        return f"hard link refused: links to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device refused: not a regular file"
    if member.isfifo():
        return "fifo refused: not a regular file"
    if not member.isreg():
        return f"unsupported tar member type {member.type!r}"
    return None


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink refused: zip member is a symlink and is not followed"
    if info.flag_bits & 0x1:
        return "encrypted member: cannot read without a password"
    return None


# ---------------------------------------------------------------------------------------------
# reading


def _read_file(path: str, limit: int, kind: str) -> tuple[bytes | None, str | None]:
    """(data, None), (None, error), or (None, None) when the first bytes say it is no image."""
    try:
        with open(path, "rb", opener=_open_nonblocking) as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                return None, _SPECIAL
            head = b""
            if kind in _SNIFFED:
                head = stream.read(_PEEK)
                if not _sniff(kind, head):
                    return None, None
            size = os.fstat(stream.fileno()).st_size
            if size > limit:
                return None, _too_big(size, limit)
            # read one byte past the limit: the file may have grown since fstat
            data = head + stream.read(limit + 1 - len(head))
    except FileNotFoundError:
        return None, "no such file or directory"
    except OSError as exc:
        return None, f"cannot read: {_why(exc)}"
    if len(data) > limit:
        return None, _too_big(len(data), limit)
    return data, None


def _open_nonblocking(path: str, flags: int) -> int:
    # Opening a FIFO for reading waits for a writer, forever; with O_NONBLOCK it returns at
    # once, and the caller checks the type on the opened file itself, so a file swapped for a
    # FIFO or a device after the listing (or the stat of a named input) is refused too.
    # Reads of regular files ignore the flag.
    return os.open(path, flags | os.O_NONBLOCK)


def _read_stream(
    stream: IO[bytes], size: int, limit: int, kind: str
) -> tuple[bytes | None, str | None]:
    """Archive-member counterpart of _read_file. The stored size can be trusted: tarfile and
    zipfile both fail a member whose data is shorter or longer. Stream errors propagate."""
    head = b""
    if kind in _SNIFFED:
        head = stream.read(_PEEK)
        if not _sniff(kind, head):
            return None, None
    if size > limit:
        return None, _too_big(size, limit)
    return head + stream.read(), None


def _forget_members(archive: tarfile.TarFile) -> None:
    # TarFile keeps every TarInfo it has read, even in stream mode; over millions of members
    # that list is the only thing that would grow. `members` is public but missing from typeshed.
    archive.members.clear()  # type: ignore[attr-defined]
