"""engine.io.atomic: a file of the output directory is whole or absent; a failing write leaves
no temporary file and becomes one OutputError naming the file, the reason and the fix.

(How the parts and run.json use it under a full disk: test_parquet.py, test_outdir.py.)"""

from __future__ import annotations

import errno
import os

import pytest

from engine.errors import OutputError
from engine.io import atomic


def test_temporary_name_is_hidden_beside_the_final_one_and_per_process(tmp_path):
    tmp = atomic.temporary_name(tmp_path / "part-00001.parquet")
    assert tmp == tmp_path / f".part-00001.parquet.tmp-{os.getpid()}"


def test_write_atomically_makes_the_folder_and_replaces_the_old_file(tmp_path):
    final = tmp_path / "new" / "run.json"
    assert atomic.write_atomically(final, b"first", what="run.json", sync_dir=True) == final
    atomic.write_atomically(final, b"second", what="run.json")
    assert final.read_bytes() == b"second"
    assert [p.name for p in final.parent.iterdir()] == ["run.json"]


def test_a_failing_block_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    final = tmp_path / "index.usearch"
    final.write_bytes(b"old")
    with pytest.raises(OutputError) as err, atomic.replacing(final, what="the index") as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.EROFS, "Read-only file system")
    message = str(err.value)
    assert message.startswith(f"{final}: cannot write the index: Read-only file system.")
    assert "make the filesystem writable" in message and "rerun the same command" in message
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.usearch"]


def test_other_exceptions_pass_through_unchanged(tmp_path):
    final = tmp_path / "a.npz"
    with pytest.raises(KeyboardInterrupt), atomic.replacing(final, what="a sidecar") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.ENOSPC, "free space on that disk"),
        (errno.EDQUOT, "raise the disk quota"),
        (errno.EFBIG, "ulimit -f"),
        (errno.EIO, "fix the cause"),
    ],
)
def test_output_error_gives_the_advice_for_the_errno(tmp_path, code, advice):
    message = str(atomic.output_error(tmp_path / "f", "the previews", OSError(code, "why")))
    assert message.startswith(f"{tmp_path / 'f'}: cannot write the previews: why.")
    assert advice in message and "Nothing half-written is kept" in message


def test_check_room_names_a_full_disk(tmp_path):
    atomic.check_room(tmp_path, 1)
    with pytest.raises(OSError) as err:
        atomic.check_room(tmp_path, 1 << 62)
    assert err.value.errno == errno.ENOSPC and f"{1 << 62} bytes needed" in str(err.value)
