"""engine.io.outdir: one writer holds an output directory's lock; run.json round-trips."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime

import pytest
from conftest import child_env

from engine.errors import EngineError, OutputLocked
from engine.io import outdir
from engine.io.outdir import OutputLock, read_run_json, write_run_json

# --------------------------------------------------------------------------- OutputLock


def test_lock_conflicts_in_the_same_process_and_is_released_on_exit(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        assert (out / outdir.LOCK).read_text() == str(os.getpid())
        # flock belongs to the open file description: a second open conflicts even here
        with pytest.raises(OutputLocked) as err, OutputLock(out):
            pass
        assert f"(pid {os.getpid()})" in str(err.value)
        assert str(out) in str(err.value) and "another --out" in str(err.value)
    with OutputLock(out) as lock:  # released on exit
        assert lock._fd is not None
    # released on exit by an exception too
    with pytest.raises(RuntimeError), OutputLock(out):
        raise RuntimeError("boom")
    with OutputLock(out):
        pass


HOLDER = """
import sys, time
from engine.io.outdir import OutputLock
with OutputLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=rf"\(pid {proc.pid}\)"), OutputLock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)  # even SIGKILL releases a flock
        proc.wait(timeout=10)
        proc.stdout.close()
    with OutputLock(out):
        assert (out / outdir.LOCK).read_text() == str(os.getpid())


def test_lock_on_an_impossible_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EngineError, match="cannot create the output directory"):
        OutputLock(blocker / "out").__enter__()


# --------------------------------------------------------------------------- run.json


def test_run_json_round_trip(tmp_path):
    assert read_run_json(tmp_path) is None
    data = {"run_id": "abc", "out": tmp_path, "counts": {"ok": 3}, "at": datetime(2024, 1, 1)}
    write_run_json(tmp_path, data)
    back = read_run_json(tmp_path)
    assert back == {
        "run_id": "abc",
        "out": str(tmp_path),
        "counts": {"ok": 3},
        "at": "2024-01-01 00:00:00",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp left


def test_run_json_write_is_atomic(tmp_path, monkeypatch):
    import errno

    from engine.errors import OutputError
    from engine.io import atomic

    write_run_json(tmp_path, {"run": 1})
    real_write_all = atomic._write_all

    def torn(fd, data):
        real_write_all(fd, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", torn)
    with pytest.raises(OutputError, match=r"run\.json: cannot write run\.json: No space left"):
        write_run_json(tmp_path, {"run": 2})
    monkeypatch.undo()
    assert read_run_json(tmp_path) == {"run": 1}  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary left


def test_corrupt_run_json_is_an_engine_error(tmp_path):
    (tmp_path / "run.json").write_text('{"run_id": "abc", ')
    with pytest.raises(EngineError, match=r"run\.json: cannot read .*rewritten by the next run"):
        read_run_json(tmp_path)
