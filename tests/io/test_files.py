"""engine.io.files: open_regular opens regular files (through symlinks) and refuses FIFOs,
directories and devices without ever blocking on them."""

from __future__ import annotations

import os

import pytest

from engine.io.files import NotRegularFile, open_regular


def test_a_regular_file_opens_for_reading_through_a_symlink(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"pixels")
    (tmp_path / "alias.png").symlink_to(path)
    for name in ("a.png", "alias.png"):
        with open_regular(tmp_path / name) as f:
            assert f.read() == b"pixels"
            assert os.get_blocking(f.fileno())  # reads block again, as open() would


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NotRegularFile, match=r"pipe\.png: not a regular file"):
        open_regular(fifo)  # open() would wait here for a writer, forever
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the descriptor was closed


@pytest.mark.parametrize("path", ["DIR", "/dev/null"])
def test_directories_and_devices_are_refused(tmp_path, path):
    target = tmp_path if path == "DIR" else path
    with pytest.raises(NotRegularFile):
        open_regular(target)


def test_not_regular_is_an_os_error_and_a_missing_file_stays_one():
    assert issubclass(NotRegularFile, OSError)  # callers handle both as "cannot read"
    with pytest.raises(FileNotFoundError):
        open_regular("/nonexistent/a.png")
