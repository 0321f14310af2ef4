"""Atomic writes into the output directory, and what a failing write becomes.

Every file of a run (Parquet parts, previews, embedding sidecars, the index, run.json) is
written to a temporary name beside its final one, fsynced and renamed, so a reader sees a whole
file or none. When a write fails (a full disk, a spent quota, a read-only filesystem, a
file-size limit), the temporary file is removed and one OutputError names the file, the reason
and the way forward: rerunning the same command resumes, as after a crash.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from engine.errors import OutputError

# What to do about the failures a user can fix; anything else gets the system's words alone.
_ADVICE = {
    errno.ENOSPC: "free space on that disk (or choose another --out)",
    errno.EDQUOT: "free space or raise the disk quota (or choose another --out)",
    errno.EROFS: "make the filesystem writable (or choose another --out)",
    errno.EFBIG: "lift the file-size limit (ulimit -f)",
}


def temporary_name(final: Path) -> Path:
    """The temporary name of `final`: hidden, and unique per process (see remove_temporaries)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_atomically(final: Path, data: bytes, *, what: str, sync_dir: bool = False) -> Path:
    """Write `data` to `final` through a temporary file (fsynced; the directory too if asked)."""
    with replacing(final, what=what, sync_dir=sync_dir) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextmanager
def replacing(
    final: Path, *, what: str, sync_file: bool = False, sync_dir: bool = False
) -> Iterator[Path]:
    """Yield the temporary path to write `final` to; rename it over `final` when the block ends.

    If the block or the rename fails, the temporary file is removed, and an OSError becomes
    an OutputError naming `final` and `what` it is.
    """
    tmp = temporary_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if sync_file:
            fsync_path(tmp)
        os.replace(tmp, final)
        if sync_dir:
            fsync_path(final.parent)
    except BaseException as exc:
        with suppress(OSError):  # a read-only filesystem cannot hold a temporary file either
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(final, what, exc) from None
        raise


def output_error(path: Path, what: str, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _ADVICE.get(exc.errno or 0, "fix the cause")
    return OutputError(
        f"{path}: cannot write {what}: {reason}. Nothing half-written is kept: {advice}, then "
        "rerun the same command; it resumes where this run stopped"
    )


def check_room(directory: Path, needed: int) -> None:
    """Raise OSError(ENOSPC / EROFS) when `directory`'s filesystem cannot take `needed` bytes.

    For writers that give no errno when they fail (usearch), so that a full disk is named.
    """
    st = os.statvfs(directory)
    if st.f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    if st.f_bavail * st.f_frsize < needed:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} ({needed} bytes needed, "
            f"{st.f_bavail * st.f_frsize} free)",
        )


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
