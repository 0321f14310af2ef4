"""Opening a file only when it is a regular file, without blocking on a FIFO or a device.

`open()` on a FIFO waits for a writer, possibly forever; a path checked with stat() first can
still be swapped for a FIFO before the open. Opening with O_NONBLOCK never waits, and fstat on
the open descriptor says what was really opened.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


class NotRegularFile(OSError):
    """The path names a FIFO, a device, a socket or a directory."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """`open(path, "rb")` for regular files (symlinks followed); NotRegularFile otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{os.fspath(path)}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
