"""A FIFO (named pipe) among the inputs: opening one for reading blocks until a writer comes,
so it must become an error row, never a hang.

Every test bounds its run (a child process with a timeout, or a thread joined with one), so
a regression fails here instead of hanging CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import polars as pl
import pytest
from conftest import dev_images, replace_with_fifo, run_child

import engine.io.archive as archive
from engine.io.archive import iter_items

TIMEOUT_S = 120  # a screen of three tiny-model images takes a few seconds

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def _cxr(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """This checkout's `cxr`, in a child process killed after TIMEOUT_S."""
    what = f"cxr {' '.join(map(str, args[:2]))} on a FIFO"
    return run_child(["-m", "engine.cli", *args], timeout=TIMEOUT_S, what=what)


def test_fifo_in_a_tree_and_named_on_the_command_line_are_error_rows(tmp_path, tiny_models_dir):
    """issue 16 #10: `cxr screen` with a FIFO in a directory tree and one named on the
    command line ends (exit 3) with one error row for each."""
    inp = tmp_path / "in"
    inp.mkdir()
    for src in dev_images(2):
        shutil.copyfile(src, inp / src.name)
    os.mkfifo(inp / "pipe.png")
    named = tmp_path / "named-pipe.dcm"
    os.mkfifo(named)
    out = tmp_path / "out"

    proc = _cxr("screen", inp, named, "--out", out, "--models", tiny_models_dir, "--no-progress")

    assert proc.returncode == 3, proc.stdout + proc.stderr
    df = pl.read_parquet(out / "predictions" / "*.parquet")
    errors = {r["source"]: r["error"] for r in df.iter_rows(named=True) if r["status"] == "error"}
    assert set(errors) == {str(inp / "pipe.png"), str(named)}
    assert all("not a regular file" in e for e in errors.values())
    assert (df["status"] == "ok").sum() == 2


def _items_within_timeout(inputs: list[Path], fifo: Path) -> list[archive.Item]:
    """iter_items in a thread; if it blocks on `fifo`, unblock it and fail the test."""
    result: list[archive.Item] = []
    thread = threading.Thread(target=lambda: result.extend(iter_items(inputs)), daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        # a writer end releases the blocked open(); then the reader sees end of file
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        pytest.fail(f"iter_items blocked opening the FIFO {fifo}")
    return result


@pytest.mark.parametrize("where", ["tree", "named"])
def test_a_file_replaced_by_a_fifo_after_listing_is_not_opened_blocking(
    tmp_path, monkeypatch, where
):
    """issue 16 #10: the type is checked on the opened file itself (fstat on a non-blocking
    open), not only on the listing: a regular file that becomes a FIFO between the directory
    listing (or the stat of a named input) and the open is an error item, not a hang."""
    root = tmp_path / "in"
    root.mkdir()
    target = root / "x.png"
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    if where == "tree":
        real_kind = archive._kind

        def kind(name: str) -> str:  # called once the entry is listed as a regular file
            if name == target.name and not stat_is_fifo(target):
                replace_with_fifo(target)
            return real_kind(name)

        monkeypatch.setattr(archive, "_kind", kind)
        inputs = [root]
    else:
        real_is_archive = archive._is_archive_name

        def is_archive(name: str) -> bool:  # called once os.stat said "regular file"
            if name == str(target) and not stat_is_fifo(target):
                replace_with_fifo(target)
            return real_is_archive(name)

        monkeypatch.setattr(archive, "_is_archive_name", is_archive)
        inputs = [target]

    items = _items_within_timeout(inputs, target)

    assert [(i.ref.source, i.data) for i in items] == [(str(target), None)]
    assert "not a regular file" in (items[0].error or "")


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)
